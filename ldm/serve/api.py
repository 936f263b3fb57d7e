"""The `/sdapi/v1/...` routes: A1111 requests -> a `GenerationRequest` -> a worker job -> A1111 responses.

Every argument is checked here, before the job is queued: the payload becomes a request
(`ldm.pipeline.request.from_a1111`), resolved against the model's spec as the CLI resolves its own (plus the
server's limits), so a bad request is answered at once with 422 and never takes a place in the queue. Two checks
need the model's weights and happen in the job instead, answered the same way (422, one line): a LoRA that does not
fit the model, and clip skip over the text encoder's layers on a model the worker has not loaded yet (once loaded,
its limit is known here).

A request's IP-Adapters (A1111 ControlNet-extension units, ldm/serve/controlnet.py) are checked here too, from their
headers; the job puts them on the model before it runs (`Pipeline.use_ip_adapters`), and takes them off for a request
without any, so that each request gets exactly the adapters it names.

The checks read files (LoRA tags are looked up in --lora-dir, init images are decoded), so they run in a worker
thread of the event loop's pool, never on the loop itself: `/progress` and `/interrupt` answer while they run.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response
from PIL import Image, ImageOps
from starlette.concurrency import run_in_threadpool

from ldm.controlnet.load import check_units
from ldm.errors import UserError
from ldm.image_io import decode_base64_image, decode_base64_mask
from ldm.lora.prompt_tags import check_lora_inputs
from ldm.models.ip_adapter import IPAdapterSpec
from ldm.models.spec import ModelSpec
from ldm.pipeline.metadata import format_parameters, png_bytes
from ldm.pipeline.refiner import check_refiner_pair
from ldm.pipeline.request import GenerationRequest, from_a1111
from ldm.pipeline.samplers import AUTOMATIC, SAMPLERS, SCHEDULES, full_label, sampler_label, schedule_label
from ldm.serve.controlnet import check_unit_names, decode_unit_images, ip_adapter_specs
from ldm.serve.schemas import (
    EmbeddingsResponse,
    Img2ImgRequest,
    ImagesResponse,
    ProgressResponse,
    SamplerItem,
    SchedulerItem,
    SDModelItem,
    Txt2ImgRequest,
)
from ldm.text.embedding_files import EmbeddingLibrary
from ldm.text.embeddings import check_references, fits_model
from ldm.serve.worker import Interrupted, Job, Worker

DISCONNECT_POLL_S = 0.25


@dataclass(frozen=True)
class Limits:
    max_pixels: int = 1024 * 1024  # width x height of one image
    max_steps: int = 150
    max_images: int = 16  # batch_size x n_iter per request
    max_body_bytes: int = 32 * 2**20


@dataclass(frozen=True)
class IPAdapterDirs:
    directory: str | None = None  # --ip-adapter-dir: the adapters requests may name
    image_encoder: str | None = None  # --ip-image-encoder: for every adapter, in place of the one next to it


def build_router(models: dict[str, ModelSpec], worker: Worker, limits: Limits,
                 lora_dir: str | None = None, embeddings_dir: str | None = None,
                 controlnet_dir: str | None = None, ip: IPAdapterDirs = IPAdapterDirs()) -> APIRouter:
    router = APIRouter(prefix="/sdapi/v1")
    # the textual-inversion embeddings prompts may name (each model's pipeline reads the same files)
    embeddings = EmbeddingLibrary.read(embeddings_dir) if embeddings_dir is not None else None
    # the model and clip skip chosen with POST /options; a request's override_settings change them for that request
    # only, as A1111 restores overridden settings afterwards (the worker loads whichever model the next job needs)
    selected: dict[str, Any] = {"name": worker.model_name, "clip_skip": 1}
    # model name -> the largest clip skip its text encoder allows, known once the worker has loaded the model
    clip_limits: dict[str, int] = {}
    _note_clip_limit(clip_limits, worker.model_name, worker.pipeline)

    @router.post("/txt2img", response_model=ImagesResponse)
    async def txt2img(req: Txt2ImgRequest, request: Request):
        name = _model_for(req, models, selected["name"])
        r = await run_in_threadpool(_request, req, name, models[name], limits, init=None, mask=None,
                                    lora_dir=lora_dir, clip_skip=selected["clip_skip"], clip_limit=clip_limits.get(name),
                                    models=models, embeddings=embeddings, controlnet_dir=controlnet_dir)
        specs = await run_in_threadpool(ip_adapter_specs, r.ip_adapters, models[name], ip.directory,
                                        ip.image_encoder)
        return await _run(request, worker, name, req, r, "txt2img", clip_limits, lora_dir, models, specs)

    @router.post("/img2img", response_model=ImagesResponse)
    async def img2img(req: Img2ImgRequest, request: Request):
        name = _model_for(req, models, selected["name"])
        r = await run_in_threadpool(_img2img_request, req, name, models[name], limits, lora_dir,
                                    selected["clip_skip"], clip_limits.get(name), models, embeddings, controlnet_dir)
        specs = await run_in_threadpool(ip_adapter_specs, r.ip_adapters, models[name], ip.directory,
                                        ip.image_encoder)
        return await _run(request, worker, name, req, r, "img2img", clip_limits, lora_dir, models, specs)

    @router.get("/samplers", response_model=list[SamplerItem])
    def samplers():
        return [{"name": full_label(name), "aliases": [name],
                 "options": {"scheduler": s.schedule} if s.schedule else {}} for name, s in SAMPLERS.items()]

    @router.get("/schedulers", response_model=list[SchedulerItem])
    def schedulers():
        # A1111's entries for the schedules we have (modules/sd_schedulers.py: rho 7 for Karras; SGM Uniform reads
        # the model's timesteps, its "inner model"); a request's `scheduler` takes the name or the label
        automatic = {"name": "automatic", "label": AUTOMATIC, "aliases": None, "default_rho": -1,
                     "need_inner_model": False}
        return [automatic, *({"name": name, "label": s.label, "aliases": list(s.aliases) or None,
                              "default_rho": 7.0 if name == "karras" else -1,
                              "need_inner_model": name == "sgm_uniform"} for name, s in SCHEDULES.items())]

    @router.get("/sd-models", response_model=list[SDModelItem])
    def sd_models():
        return [{"title": name, "model_name": name, "hash": None, "sha256": None, "filename": str(m.root),
                 "config": None} for name, m in models.items()]

    @router.get("/embeddings", response_model=EmbeddingsResponse)
    def list_embeddings():
        """A1111's listing for the selected model: the embeddings that fit it, and those skipped."""
        return _embeddings(embeddings, models[selected["name"]])

    @router.get("/options")
    def get_options():
        return {"sd_model_checkpoint": selected["name"], "CLIP_stop_at_last_layers": selected["clip_skip"],
                "samples_format": "png"}

    @router.post("/options")
    async def set_options(options: dict[str, Any]):
        name = options.get("sd_model_checkpoint")
        chosen = _listed(name, models) if name is not None else selected["name"]
        clip_skip = None
        if "CLIP_stop_at_last_layers" in options:
            clip_skip = _clip_skip(options["CLIP_stop_at_last_layers"], chosen, clip_limits.get(chosen))
        if name is not None:  # other options are accepted and ignored, as unknown request fields are
            if chosen != worker.model_name:  # load it now, so the next generation does not wait for it
                job = worker.submit(Job(chosen, lambda pipe, on_step: _note_clip_limit(clip_limits, chosen, pipe),
                                        description="load model"))
                await asyncio.wrap_future(job.future)
            selected["name"] = chosen
        if clip_skip is not None:
            selected["clip_skip"] = clip_skip
        return None

    @router.get("/progress", response_model=ProgressResponse)
    def progress():
        return worker.progress()

    @router.post("/interrupt")
    def interrupt():
        worker.interrupt()
        return {}

    return router


def _listed(name: str, models: dict[str, ModelSpec]) -> str:
    if not isinstance(name, str) or name not in models:
        raise HTTPException(404, f"model {name!r} not found; listed models: {', '.join(models)}")
    return name


def _model_for(req: Txt2ImgRequest, models: dict[str, ModelSpec], selected: str) -> str:
    name = req.override_settings.get("sd_model_checkpoint")
    return _listed(name, models) if name is not None else selected


def _note_clip_limit(clip_limits: dict[str, int], name: str | None, pipeline: Any) -> None:
    """Remember the loaded model's clip-skip limit (`FrozenTextEncoder.max_clip_skip`), so that requests over it are
    refused before they are queued. Runs in the worker thread; one dict assignment."""
    max_clip_skip = getattr(getattr(pipeline, "text_encoder", None), "max_clip_skip", None)
    if name is not None and callable(max_clip_skip):
        clip_limits[name] = int(max_clip_skip())


def _clip_skip(value: Any, model: str, limit: int | None = None) -> int:
    """A1111's option `CLIP_stop_at_last_layers` (its "Clip skip"), 1 = the text encoder's own layer; `limit` is the
    model's largest, when it has been loaded (otherwise the text encoder checks it in the job)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"CLIP_stop_at_last_layers must be an integer of at least 1 (1 = no clip skip), got {value!r}")
    if limit is not None and value != 1 and value > limit:
        raise UserError(f"clip skip {value} is out of range: model '{model}' allows 1..{limit} "
                        "(CLIP_stop_at_last_layers)")
    return value


def _img2img_request(req: Img2ImgRequest, name: str, spec: ModelSpec, limits: Limits, lora_dir: str | None,
                     clip_skip: int, clip_limit: int | None, models: dict[str, ModelSpec] | None = None,
                     embeddings: EmbeddingLibrary | None = None,
                     controlnet_dir: str | None = None) -> GenerationRequest:
    """The init image and mask decoded, then `_request` (in the thread pool: decoding is slow work)."""
    if not req.init_images:
        raise UserError("init_images is empty: send the init image as a base64 PNG or JPEG")
    # a small file can unpack into a huge image: the limit is checked before decoding (4 x the output limit)
    init = decode_base64_image(req.init_images[0], "init_images[0]", 4 * limits.max_pixels)
    mask = None
    if req.mask:
        mask = decode_base64_mask(req.mask, "mask", 4 * limits.max_pixels)
        if req.inpainting_mask_invert:
            mask = ImageOps.invert(mask)
    return _request(req, name, spec, limits, init=init, mask=mask, lora_dir=lora_dir, clip_skip=clip_skip,
                    clip_limit=clip_limit, models=models, embeddings=embeddings, controlnet_dir=controlnet_dir)


def _request(req: Txt2ImgRequest, name: str, spec: ModelSpec, limits: Limits, init: Image.Image | None,
             mask: Image.Image | None, lora_dir: str | None = None, clip_skip: int = 1,
             clip_limit: int | None = None, models: dict[str, ModelSpec] | None = None,
             embeddings: EmbeddingLibrary | None = None, controlnet_dir: str | None = None) -> GenerationRequest:
    """The payload as a request resolved against the model's spec, every value checked as the CLI checks it:
    prompt syntax, LoRA tags (names in the server's --lora-dir only), embedding:NAME (in --embeddings-dir),
    ControlNet units (names in its --controlnet-dir only), sizes, steps, clip skip (when `clip_limit`, the model's,
    is known) and the server's limits. Blocking (file reads): call it from the thread pool."""
    if "CLIP_stop_at_last_layers" in req.override_settings:
        clip_skip = req.override_settings["CLIP_stop_at_last_layers"]
    clip_skip = _clip_skip(clip_skip, name, clip_limit)  # the server-wide one too: it may be another model's
    payload = {**req.model_dump(), "init_image": init, "mask": mask,
               "alwayson_scripts": decode_unit_images(req.alwayson_scripts, 4 * limits.max_pixels)}
    known = ", ".join(full_label(n) for n in SAMPLERS)
    request = GenerationRequest.layered(from_a1111(payload, clip_skip=clip_skip, known_samplers=known))
    check_lora_inputs([], request.prompt, lora_dir)
    check_unit_names(request.controlnets, controlnet_dir)
    check_refiner_pair(spec, None)
    if request.refiner:  # A1111's refiner_checkpoint: a listed model, recorded as the model is (its spec's name)
        refiner = (models or {})[_listed(request.refiner, models or {})]
        check_refiner_pair(spec, refiner)
        request = replace(request, refiner=refiner.name)
    r = request.resolve(spec)
    if embeddings is not None:
        embeddings.refresh()
    check_references(embeddings, [r.prompt, r.negative_prompt], spec.arch,  # embedding:NAME
                     getattr(spec, "unet_config", {}).get("cross_attention_dim"))
    if r.controlnets:  # each fits the model
        check_units(r.controlnets, spec.unet_config, spec.vae_factor, controlnet_dir)
    check_limits(r, limits)
    return r


def check_limits(r: GenerationRequest, limits: Limits, images_field: str = "batch_size x n_iter") -> None:
    """The server's limits on a resolved request (the A1111 and ComfyUI APIs' both), one line each."""
    if r.steps > limits.max_steps:
        raise UserError(f"steps {r.steps} is over this server's limit of {limits.max_steps} (ldm-serve --max-steps)")
    if r.width * r.height > limits.max_pixels:
        raise UserError(f"{r.width}x{r.height} is over this server's limit of {limits.max_pixels} pixels per image "
                        "(ldm-serve --max-pixels)")
    if r.num_images > limits.max_images:
        raise UserError(f"{images_field} = {r.num_images} images is over this server's limit of "
                        f"{limits.max_images} per request (ldm-serve --max-images)")


def _embeddings(library: EmbeddingLibrary | None, spec: ModelSpec) -> dict:
    """A1111's `/sdapi/v1/embeddings` (modules/api/api.py `get_embeddings`): {"loaded": {name: item}, "skipped":
    {...}} for the model, each item {step, sd_checkpoint, sd_checkpoint_name, shape, vectors}, sorted by name."""
    out: dict[str, dict] = {"loaded": {}, "skipped": {}}
    if library is None:
        return out
    library.refresh()
    cross_attention_dim = spec.unet_config.get("cross_attention_dim")
    for kind, named in zip(out, library.split(lambda e: fits_model(e, spec.arch, cross_attention_dim))):
        for name, e in sorted(named.items(), key=lambda item: item[0].lower()):
            out[kind][name] = {"step": e.step, "sd_checkpoint": e.sd_checkpoint,
                               "sd_checkpoint_name": e.sd_checkpoint_name, "shape": e.shape, "vectors": e.num_vectors}
    return out


def _generate(r: GenerationRequest, note_limit: Callable[[Any], None], lora_dir: str | None = None,
              refiner: ModelSpec | None = None, ip_adapters: tuple[IPAdapterSpec, ...] = ()):
    """The job: run the pipeline, keeping each image as it is finished; an interrupt keeps those finished so far.
    `note_limit(pipe)` first records the model's clip-skip limit for the requests that follow; `refiner` (the
    request's) is opened next to the model unless it already is; `ip_adapters` (the request's, or none) replace
    those on the model unless they are the same."""

    def run(pipe, on_step):
        note_limit(pipe)
        if refiner is not None and (pipe.refiner is None or pipe.refiner.model_name != refiner.name):
            pipe.attach_refiner(refiner)
        pipe.use_ip_adapters(ip_adapters)
        pipe.use_vae(None)  # the model's own VAE (a ComfyUI request may have put another on)
        done: list[tuple[Image.Image, GenerationRequest]] = []
        try:
            pipe.generate(r, lora_dir=lora_dir, show_progress=False, on_image=lambda image, p: done.append((image, p)), on_step=on_step)
            interrupted = False
        except Interrupted:
            interrupted = True
        return done, interrupted

    return run


async def _run(request: Request, worker: Worker, name: str, req: Txt2ImgRequest, r: GenerationRequest,
               mode: str, clip_limits: dict[str, int], lora_dir: str | None = None,
               models: dict[str, ModelSpec] | None = None, ip_adapters: tuple[IPAdapterSpec, ...] = ()):
    note = lambda pipe: _note_clip_limit(clip_limits, name, pipe)  # noqa: E731
    refiner = next((m for m in (models or {}).values() if m.name == r.refiner), None) if r.refiner else None
    job = worker.submit(Job(name, _generate(r, note, lora_dir, refiner, ip_adapters), description=mode))
    waiting = asyncio.wrap_future(job.future)
    while not waiting.done():
        await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S)
        if not waiting.done() and await request.is_disconnected():
            job.cancel.set()  # nobody will read the result: free the device at the next step
            waiting.add_done_callback(lambda f: f.cancelled() or f.exception())  # its Interrupted is expected
            return Response(status_code=499)
    done, interrupted = waiting.result()
    params = [p for _, p in done]
    images = [base64.b64encode(png_bytes(image, p)).decode() for image, p in done] if req.send_images else []
    echo = req.model_dump()
    if isinstance(req, Img2ImgRequest) and not req.include_init_images:
        echo["init_images"] = echo["mask"] = None
    echo.update(seed=r.seed, steps=r.steps, cfg_scale=r.cfg, width=r.width, height=r.height,
                sampler_name=sampler_label(r.sampler),
                scheduler=schedule_label(r.schedule or SAMPLERS[r.sampler].schedule), eta=r.eta)
    return {"images": images, "parameters": echo, "info": json.dumps(_info(r, params, name, interrupted))}


def _info(r: GenerationRequest, params: list[GenerationRequest], name: str, interrupted: bool) -> dict:
    """A1111's `Processed.js()` fields that this package has values for."""
    seeds = [r.seed + i for i in range(r.num_images)]
    return {
        "prompt": r.prompt, "all_prompts": [r.prompt] * len(seeds),
        "negative_prompt": r.negative_prompt, "all_negative_prompts": [r.negative_prompt] * len(seeds),
        "seed": r.seed, "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(seeds),
        "width": r.width, "height": r.height, "sampler_name": sampler_label(r.sampler),
        "cfg_scale": r.cfg, "steps": r.steps, "batch_size": r.batch_size,
        "sd_model_name": name, "denoising_strength": r.strength, "index_of_first_image": 0,
        "infotexts": [format_parameters(p) for p in params], "interrupted": interrupted,
    }
