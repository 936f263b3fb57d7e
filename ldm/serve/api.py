"""The `/sdapi/v1/...` routes: A1111 requests -> `Pipeline` arguments -> a worker job -> A1111 responses.

Every argument is checked here, before the job is queued, with the same `check_request` the CLI runs (plus the
server's limits), so a bad request is answered at once with 422 and never takes a place in the queue. Two checks
need the model's weights and happen in the job instead, answered the same way (422, one line): a LoRA that does not
fit the model, and clip skip over the text encoder's layers on a model the worker has not loaded yet (once loaded,
its limit is known here).

The checks read files (LoRA tags are looked up in --lora-dir, init images are decoded), so they run in a worker
thread of the event loop's pool, never on the loop itself: `/progress` and `/interrupt` answer while they run.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool

from ldm.errors import UserError
from ldm.lora.prompt_tags import check_lora_inputs
from ldm.pipeline.metadata import PNG_KEY, GenerationParams, format_parameters
from ldm.pipeline.pipeline import DEFAULT_CFG, DEFAULT_MASK_BLUR, DEFAULT_STEPS, DEFAULT_STRENGTH
from ldm.pipeline.samplers import DEFAULT_SAMPLER, SAMPLERS, sampler_from_label, sampler_label
from ldm.pipeline.seeds import random_seed
from ldm.pipeline.validation import check_request, pick_size
from ldm.serve.models import ModelEntry
from ldm.serve.schemas import Img2ImgRequest, ImagesResponse, ProgressResponse, SamplerItem, SDModelItem, Txt2ImgRequest
from ldm.serve.worker import Interrupted, Job, Worker
from ldm.text.prompt_syntax import check_prompt

# A1111's "Schedule type" values that leave the sigmas as the sampler spaces them, and the one that is Karras'
_PLAIN_SCHEDULES = {"", "automatic", "uniform", "default"}
DISCONNECT_POLL_S = 0.25


@dataclass(frozen=True)
class Limits:
    max_pixels: int = 1024 * 1024  # width x height of one image
    max_steps: int = 150
    max_images: int = 16  # batch_size x n_iter per request
    max_body_bytes: int = 32 * 2**20


def build_router(models: dict[str, ModelEntry], worker: Worker, limits: Limits,
                 lora_dir: str | None = None) -> APIRouter:
    router = APIRouter(prefix="/sdapi/v1")
    # the model and clip skip chosen with POST /options; a request's override_settings change them for that request
    # only, as A1111 restores overridden settings afterwards (the worker loads whichever model the next job needs)
    selected: dict[str, Any] = {"name": worker.model_name, "clip_skip": 1}
    # model name -> the largest clip skip its text encoder allows, known once the worker has loaded the model
    clip_limits: dict[str, int] = {}
    _note_clip_limit(clip_limits, worker.model_name, worker.pipeline)

    @router.post("/txt2img", response_model=ImagesResponse)
    async def txt2img(req: Txt2ImgRequest, request: Request):
        entry = _model_for(req, models, selected["name"])
        args = await run_in_threadpool(_pipeline_args, req, entry, limits, init=None, mask=None, lora_dir=lora_dir,
                                       clip_skip=selected["clip_skip"], clip_limit=clip_limits.get(entry.name))
        return await _run(request, worker, entry, req, args, "txt2img", clip_limits)

    @router.post("/img2img", response_model=ImagesResponse)
    async def img2img(req: Img2ImgRequest, request: Request):
        entry = _model_for(req, models, selected["name"])
        args = await run_in_threadpool(_img2img_args, req, entry, limits, lora_dir, selected["clip_skip"],
                                       clip_limits.get(entry.name))
        return await _run(request, worker, entry, req, args, "img2img", clip_limits)

    @router.get("/samplers", response_model=list[SamplerItem])
    def samplers():
        return [{"name": sampler_label(name), "aliases": [name],
                 "options": {"scheduler": "karras"} if s.karras else {}} for name, s in SAMPLERS.items()]

    @router.get("/sd-models", response_model=list[SDModelItem])
    def sd_models():
        return [{"title": m.name, "model_name": m.name, "hash": None, "sha256": None, "filename": str(m.root),
                 "config": None} for m in models.values()]

    @router.get("/options")
    def get_options():
        return {"sd_model_checkpoint": selected["name"], "CLIP_stop_at_last_layers": selected["clip_skip"],
                "samples_format": "png"}

    @router.post("/options")
    async def set_options(options: dict[str, Any]):
        name = options.get("sd_model_checkpoint")
        entry = _listed(name, models) if name is not None else models[selected["name"]]
        clip_skip = None
        if "CLIP_stop_at_last_layers" in options:
            clip_skip = _clip_skip(options["CLIP_stop_at_last_layers"], entry.name, clip_limits.get(entry.name))
        if name is not None:  # other options are accepted and ignored, as unknown request fields are
            if entry.name != worker.model_name:  # load it now, so the next generation does not wait for it
                job = worker.submit(Job(entry.name, lambda pipe, on_step: _note_clip_limit(clip_limits, entry.name,
                                                                                           pipe),
                                        description="load model"))
                await asyncio.wrap_future(job.future)
            selected["name"] = entry.name
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


def _listed(name: str, models: dict[str, ModelEntry]) -> ModelEntry:
    if not isinstance(name, str) or name not in models:
        raise HTTPException(404, f"model {name!r} not found; listed models: {', '.join(models)}")
    return models[name]


def _model_for(req: Txt2ImgRequest, models: dict[str, ModelEntry], selected: str) -> ModelEntry:
    name = req.override_settings.get("sd_model_checkpoint")
    return _listed(name, models) if name is not None else models[selected]


def decode_image(data: str, what: str, limits: Limits) -> Image.Image:
    """A base64 image (with or without a 'data:image/...;base64,' prefix) -> RGB, EXIF rotation applied."""
    if data.startswith("data:") and "," in data:
        data = data.split(",", 1)[1]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise UserError(f"{what} is not valid base64") from None
    try:
        image = Image.open(io.BytesIO(raw))
        if image.width * image.height > 4 * limits.max_pixels:  # before decoding: a small file can unpack huge
            raise UserError(f"{what} is {image.width}x{image.height}, over the limit of {4 * limits.max_pixels} pixels")
        image.load()
        return ImageOps.exif_transpose(image).convert("RGB")
    except UnidentifiedImageError:
        raise UserError(f"{what} is base64 but not an image (send a PNG, JPEG or WebP file)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{what} is not an image PIL can read: {e}") from None


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


def _img2img_args(req: Img2ImgRequest, entry: ModelEntry, limits: Limits, lora_dir: str | None, clip_skip: int,
                  clip_limit: int | None) -> dict[str, Any]:
    """The init image and mask decoded, then `_pipeline_args` (in the thread pool: decoding is slow work)."""
    if not req.init_images:
        raise UserError("init_images is empty: send the init image as a base64 PNG or JPEG")
    init = decode_image(req.init_images[0], "init_images[0]", limits)
    mask = None
    if req.mask:
        mask = decode_image(req.mask, "mask", limits).convert("L")
        if req.inpainting_mask_invert:
            mask = ImageOps.invert(mask)
    return _pipeline_args(req, entry, limits, init=init, mask=mask, lora_dir=lora_dir, clip_skip=clip_skip,
                          clip_limit=clip_limit)


def _pipeline_args(req: Txt2ImgRequest, entry: ModelEntry, limits: Limits, init: Image.Image | None,
                   mask: Image.Image | None, lora_dir: str | None = None, clip_skip: int = 1,
                   clip_limit: int | None = None) -> dict[str, Any]:
    """The request as `Pipeline.__call__` keyword arguments, every value checked as the CLI checks it: prompt
    syntax, LoRA tags (names in the server's --lora-dir only), sizes, steps, clip skip (when `clip_limit`, the
    model's, is known) and the server's limits. Blocking (file reads): call it from the thread pool."""
    check_prompt(req.prompt, "prompt")
    check_prompt(req.negative_prompt, "negative prompt")
    check_lora_inputs([], req.prompt, lora_dir)
    if "CLIP_stop_at_last_layers" in req.override_settings:
        clip_skip = req.override_settings["CLIP_stop_at_last_layers"]
    clip_skip = _clip_skip(clip_skip, entry.name, clip_limit)  # the server-wide one too: it may be another model's
    name = req.sampler_name or req.sampler_index or DEFAULT_SAMPLER
    try:
        sampler, karras = sampler_from_label(name)  # A1111's names ("DPM++ 2M Karras") and ours ("dpmpp_2m")
    except UserError:
        known = ", ".join(sampler_label(n) for n in SAMPLERS)
        raise UserError(f"unknown sampler '{name}'; known samplers: {known} (GET /sdapi/v1/samplers)") from None
    for field in ("batch_size", "n_iter"):
        if getattr(req, field) < 1:
            raise UserError(f"{field} must be at least 1, got {getattr(req, field)}")
    schedule = (req.scheduler or "").strip().lower()
    if schedule == "karras":
        karras = True
    elif schedule not in _PLAIN_SCHEDULES:
        raise UserError(f"unknown scheduler '{req.scheduler}'; use Automatic or Karras")
    steps = DEFAULT_STEPS if req.steps is None else req.steps
    cfg = DEFAULT_CFG if req.cfg_scale is None else req.cfg_scale
    seed = random_seed() if req.seed == -1 else req.seed
    num_images = req.batch_size * req.n_iter
    height, width = pick_size(init.size if init else None, req.height, req.width, entry.vae_factor,
                              entry.default_size)
    strength = mask_blur = None
    if isinstance(req, Img2ImgRequest):
        strength = req.denoising_strength
        if strength is None:
            strength = 1.0 if mask is not None else DEFAULT_STRENGTH
        mask_blur = DEFAULT_MASK_BLUR if req.mask_blur is None else req.mask_blur
    check_request(steps=steps, cfg=cfg, height=height, width=width, vae_factor=entry.vae_factor, strength=strength,
                  sampler=sampler, karras=karras, num_images=num_images, batch_size=req.batch_size, seed=seed,
                  mask_blur=mask_blur or 0, max_steps=entry.max_steps)
    if steps > limits.max_steps:
        raise UserError(f"steps {steps} is over this server's limit of {limits.max_steps} (ldm-serve --max-steps)")
    if width * height > limits.max_pixels:
        raise UserError(f"{width}x{height} is over this server's limit of {limits.max_pixels} pixels per image "
                        "(ldm-serve --max-pixels)")
    if num_images > limits.max_images:
        raise UserError(f"batch_size x n_iter = {num_images} images is over this server's limit of "
                        f"{limits.max_images} per request (ldm-serve --max-images)")
    args = dict(prompt=req.prompt, negative_prompt=req.negative_prompt, steps=steps, cfg=cfg, sampler=sampler,
                karras=karras, seed=seed, num_images=num_images, batch_size=req.batch_size, height=height,
                width=width, clip_skip=clip_skip, lora_dir=lora_dir)
    if init is not None:
        args.update(init_image=init, mask=mask, strength=strength, mask_blur=mask_blur)
    return args


def png_bytes(image: Image.Image, params: GenerationParams) -> bytes:
    """The PNG the CLI would write for this image: the same 'parameters' text chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_KEY, format_parameters(params))
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def _generate(args: dict[str, Any], note_limit: Callable[[Any], None]):
    """The job: run the pipeline, keeping each image as it is finished; an interrupt keeps those finished so far.
    `note_limit(pipe)` first records the model's clip-skip limit for the requests that follow."""

    def run(pipe, on_step):
        note_limit(pipe)
        done: list[tuple[Image.Image, GenerationParams]] = []
        try:
            pipe(**args, show_progress=False, on_image=lambda image, p: done.append((image, p)), on_step=on_step)
            interrupted = False
        except Interrupted:
            interrupted = True
        return done, interrupted

    return run


async def _run(request: Request, worker: Worker, entry: ModelEntry, req: Txt2ImgRequest, args: dict[str, Any],
               mode: str, clip_limits: dict[str, int]):
    note = lambda pipe: _note_clip_limit(clip_limits, entry.name, pipe)  # noqa: E731
    job = worker.submit(Job(entry.name, _generate(args, note), description=mode))
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
    echo.update(seed=args["seed"], steps=args["steps"], cfg_scale=args["cfg"], width=args["width"],
                height=args["height"], sampler_name=sampler_label(args["sampler"], args["karras"]))
    return {"images": images, "parameters": echo, "info": json.dumps(_info(args, params, entry, interrupted))}


def _info(args: dict[str, Any], params: list[GenerationParams], entry: ModelEntry, interrupted: bool) -> dict:
    """A1111's `Processed.js()` fields that this package has values for."""
    seeds = [args["seed"] + i for i in range(args["num_images"])]
    return {
        "prompt": args["prompt"], "all_prompts": [args["prompt"]] * len(seeds),
        "negative_prompt": args["negative_prompt"], "all_negative_prompts": [args["negative_prompt"]] * len(seeds),
        "seed": args["seed"], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(seeds),
        "width": args["width"], "height": args["height"], "sampler_name": sampler_label(args["sampler"], args["karras"]),
        "cfg_scale": args["cfg"], "steps": args["steps"], "batch_size": args["batch_size"],
        "sd_model_name": entry.name, "denoising_strength": args.get("strength"), "index_of_first_image": 0,
        "infotexts": [format_parameters(p) for p in params], "interrupted": interrupted,
    }
