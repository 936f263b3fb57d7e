"""`Pipeline`: a generation request (+ its init image and mask) -> images, over the one loop in `denoise.py`.

    pipe = Pipeline.from_pretrained("path/to/model", device="cuda", dtype="fp16")
    result = pipe("a red car", negative_prompt="blurry", cfg=7.5, seed=42, num_images=4)
    result.images[0].save("car.png")  # PIL images; result.params[i] is image i's resolved request (its seed)

`Pipeline.open(spec, ...)` is the one way to open a model for generation (the CLI, prompt lists, the server and
`ldm-eval` all call it); `generate(request)` runs a `GenerationRequest` (`ldm.pipeline.request`), and `__call__` is
the keyword form of the same.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm.controlnet.apply import Control, ControlNets
from ldm.errors import UserError
from ldm.image_io import to_rgb
from ldm.lora.apply import AppliedLora, LoraStack
from ldm.lora.prompt_tags import format_lora_hashes, parse_lora_hashes
from ldm.models.components import Components
from ldm.models.ip_adapter import IPAdapters, IPAdapterSpec, switch_ip_adapters
from ldm.models.load import load_components, load_vae_for
from ldm.models.spec import ModelSpec, inspect_model
from ldm.pipeline import images as im
from ldm.pipeline.denoise import denoise
from ldm.pipeline.device import pick_device, pick_dtype
from ldm.pipeline.guidance import guidance_scale_embedding
from ldm.pipeline.hires import HiresFix
from ldm.pipeline.latent_codec import LatentCodec
from ldm.pipeline.job import Job, finish, inpaint_state, prepare_job
from ldm.pipeline.micro_conditioning import arch_of, time_id_count, time_ids
from ldm.pipeline.refiner import base_timesteps, check_refiner_pair, refiner_schedule, switch_cutoff
from ldm.pipeline.request import GenerationRequest
from ldm.pipeline.result import GenerationResult
from ldm.pipeline.samplers import make_scheduler
from ldm.pipeline.seeds import batch_noise, generators, per_image_noise
from ldm.pipeline.unet_calls import unet_calls_per_batch
from ldm.pipeline.validation import steps_to_run
from ldm.pixels import float_to_uint8, tensor_to_float_images
from ldm.progress import progress_bar
from ldm.text.conditioning import Conditioning
from ldm.text.embeddings import EmbeddingDatabase, open_database, ti_hashes
from ldm.text.prompt_encoding import encode_prompt_pair, prompt_embeddings
from ldm.vae.load_vae import vae_factor

log = logging.getLogger(__name__)


class Pipeline:
    def __init__(
        self,
        components: Components,
        device: torch.device,
        dtype: torch.dtype,
        vae_tiling: bool = False,
        compile_unet: bool | str = False,
        lora_dir: str | Path | None = None,
        controlnet_dir: str | Path | None = None,
    ) -> None:
        self.unet = components.unet
        self.vae = components.vae
        self.text_encoder = components.text_encoder
        self.scheduler_config = components.scheduler_config
        self.model_name = components.name
        self.device, self.dtype = device, dtype
        self.lora_dir = lora_dir  # where a prompt's <lora:NAME:W> tags find NAME.safetensors
        self.codec = LatentCodec(self.vae, device, dtype)
        self.vae_name, self.opened_vae = "", (self.vae, "")  # a request's `vae`; what `use_vae(None)` goes back to
        # the facts a request is resolved against (`ldm.pipeline.request.ModelFacts`), from the loaded parts
        self.vae_factor = vae_factor(self.vae.config)
        sample = self.unet.config.sample_size
        self.default_size = (sample[0] if isinstance(sample, (list, tuple)) else sample) * self.vae_factor
        self.train_timesteps = int(self.scheduler_config.get("num_train_timesteps", 1000))
        # a 9-channel U-Net is an inpainting model (latents + mask + masked-image latents); 4 channels is ordinary
        self.inpainting_unet = self.unet.config.in_channels == 2 * self.vae.config.latent_channels + 1
        components.check_fit()
        # SDXL: the U-Net's time ids, 6 (base) or 5 (refiner: an aesthetic score in place of the target size)
        self.time_id_count = time_id_count(self.unet.config, self.text_encoder)
        self.arch = arch_of(self.time_id_count)
        self.refiner: Pipeline | None = None  # an SDXL refiner a request's `refiner` hands over to (`open(refiner=)`)
        if vae_tiling:
            self.vae.enable_tiling()  # decode (and encode) in overlapping tiles: memory grows with tile, not image
        # diffusers' default attention processor is already AttnProcessor2_0 (torch SDPA); nothing to set here
        # compile_unet True/"regional": diffusers' regional compilation (`compile_repeated_blocks`, in place): the
        # transformer blocks' code is compiled once and reused by every block, with dynamic shapes so that a new
        # image size (a hires pass, a prompts file's sizes) does not compile again; same pixels to ~1e-6, a fraction
        # of the whole U-Net's warm-up (bench/RESULTS.md). "full": torch.compile of the whole U-Net.
        self._unet_fn = torch.compile(self.unet) if compile_unet == "full" else self.unet
        if compile_unet and compile_unet != "full":
            self.unet.compile_repeated_blocks(dynamic=True)
        self.loras = LoraStack(self.unet, self.text_encoder)  # merged LoRAs (ldm/lora/apply.py)
        self.embeddings: EmbeddingDatabase | None = None  # textual-inversion embeddings prompts may name
        self.ip_adapters = IPAdapters()  # IP-Adapters on the U-Net (`use_ip_adapters`, ldm/ip_adapter)
        self.controlnets = ControlNets(self.unet.config, self.vae_factor, device, dtype, controlnet_dir)

    @classmethod
    def open(
        cls,
        spec: ModelSpec,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        *,
        loras: list[tuple[Path, float]] | tuple = (),
        lora_dir: str | Path | None = None,
        vae_tiling: bool = False,
        compile_unet: bool | str | None = False,
        refiner: ModelSpec | None = None,
        embeddings_dir: str | Path | None = None,
        embeddings: Sequence[str | Path] = (),
        ip_adapters: tuple[IPAdapterSpec, ...] = (),
        controlnet_dir: str | Path | None = None,
    ) -> Pipeline:
        """The one way to open a model for generation: load what `spec` (`ldm.models.spec.inspect_model`) describes
        on `device` in `dtype` ('fp32' | 'fp16' | 'bf16' | None = auto), then merge `loras` ((path, scale) pairs,
        `--lora`). `lora_dir` is where prompt tags find their files. `refiner`: an SDXL refiner's spec, opened the
        same way, for requests that name it (`--refiner`). `embeddings_dir` and `embeddings` (files): the
        textual-inversion embeddings prompts may name (ldm/text/embeddings.py). `ip_adapters`: IP-Adapter specs;
        `controlnet_dir`, where ControlNets are found."""
        check_refiner_pair(spec, refiner)
        dev = device if isinstance(device, torch.device) else pick_device(device)
        dt = dtype if isinstance(dtype, torch.dtype) else pick_dtype(dtype, dev)
        pipe = cls(load_components(spec, dev, dt), dev, dt, vae_tiling=vae_tiling, compile_unet=compile_unet or False,
                   lora_dir=lora_dir, controlnet_dir=controlnet_dir)
        pipe.vae_name = spec.vae or ""  # --vae as the user named it
        pipe.opened_vae = (pipe.vae, pipe.vae_name)
        for path, scale in loras:
            pipe.load_lora(path, scale)
        pipe.embeddings = open_database(embeddings_dir, embeddings, pipe.text_encoder)
        pipe.use_ip_adapters(ip_adapters)
        if refiner is not None:
            pipe.attach_refiner(refiner, compile_unet=compile_unet)
        return pipe

    def attach_refiner(self, spec: ModelSpec, compile_unet: bool | str | None = False) -> None:
        """Open the SDXL refiner `spec` on this pipeline's device and dtype, for requests that name it (replacing
        one attached before)."""
        if spec.arch != "sdxl-refiner" or self.arch != "sdxl":
            raise UserError(f"'{spec.name}' ({spec.kind}) cannot refine '{self.model_name}': a refiner needs an "
                            "SDXL base model and an SDXL refiner")
        self.refiner = None  # free the old one first
        self.refiner = Pipeline(load_components(spec, self.device, self.dtype), self.device, self.dtype,
                                vae_tiling=self.vae.use_tiling, compile_unet=compile_unet or False)
        if self.embeddings is not None:  # the same files, for the refiner's text tower
            self.refiner.embeddings = EmbeddingDatabase(self.embeddings.library, self.refiner.text_encoder)

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path | None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        vae_tiling: bool = False,
        compile_unet: bool | str = False,
        vae: str | Path | None = None,
        prediction_type: str | None = None,
    ) -> Pipeline:
        """A diffusers-format SD 1.x/2.x or SDXL directory (or hub id), or a single .safetensors file in the original
        layout.
        `vae`: a VAE file or directory replacing the model's; `prediction_type`: 'epsilon' | 'v_prediction',
        overriding the model's."""
        spec = inspect_model(model, prediction_type=prediction_type, vae=vae)
        return cls.open(spec, device, dtype, vae_tiling=vae_tiling, compile_unet=compile_unet)

    def load_lora(self, path: str | Path, scale: float = 1.0, name: str | None = None) -> AppliedLora:
        """Merge a LoRA (diffusers/peft or kohya .safetensors) into the weights for every later call; several
        stack. `name` (default: the file's stem) is how the PNG metadata names it. `unload_loras()` undoes all."""
        return self.loras.load(path, scale, name)

    def unload_loras(self) -> None:
        self.loras.unload()

    def use_ip_adapters(self, specs: Sequence[IPAdapterSpec]) -> None:
        """Put the IP-Adapters `specs` on the U-Net in place of those on it (kept when the same; none: taken off)."""
        self.ip_adapters = switch_ip_adapters(self.ip_adapters, specs, self.unet, self.device, self.dtype)

    def use_vae(self, source: str | Path | None, name: str = "") -> None:
        """Encode and decode with the VAE `source` (as --vae), which requests call `name`, in place of the one on
        (kept when it has that name; None: the one the pipeline was opened with). `load_vae_for` refuses a VAE
        whose latents are not this model's."""
        vae, name = self.opened_vae if source is None else (None, name)
        if name != self.vae_name:
            vae = load_vae_for(self.opened_vae[0], source, name, self.device, self.dtype) if vae is None else vae
            if self.vae.use_tiling:
                vae.enable_tiling()
            self.vae, self.codec.vae, self.vae_name = vae, vae, name

    def __call__(
        self,
        prompt: str,
        negative_prompt: str = "",
        *,
        init_image: Image.Image | str | Path | None = None,
        mask: Image.Image | str | Path | None = None,
        hires: HiresFix | None = None,
        seed: int | None = None,
        lora_hashes: dict[str, str] | None = None,
        lora_dir: str | Path | None = None,
        show_progress: bool = True,
        on_image: Callable[[Image.Image, GenerationRequest], None] | None = None,
        on_step: Callable[[int, int], None] | None = None,
        **settings,
    ) -> GenerationResult:
        """`generate` with the request's fields as keywords (`ldm.pipeline.request.GenerationRequest`: steps, cfg,
        sampler, schedule, eta, num_images, batch_size, height, width, strength, mask_blur, guidance_rescale,
        clip_skip), images as paths or PIL images, `hires` as a `HiresFix` and `lora_hashes` as {name: short hash}."""
        if isinstance(init_image, (str, Path)):
            init_image = im.load_image(init_image)
        if isinstance(mask, (str, Path)):
            mask = im.load_mask(mask)
        if hires is not None:
            settings.update(hires_scale=hires.scale, hires_strength=hires.strength, hires_steps=hires.steps,
                            hires_upscaler=hires.upscaler)
        settings = {k: v for k, v in settings.items() if v is not None}
        request = GenerationRequest(
            prompt=prompt, negative_prompt=negative_prompt, seed=-1 if seed is None else seed,
            init_image=None if init_image is None else to_rgb(init_image), mask=mask,
            lora_hashes=format_lora_hashes(list((lora_hashes or {}).items())), **settings)
        return self.generate(request, lora_dir=lora_dir, show_progress=show_progress, on_image=on_image,
                             on_step=on_step)

    @torch.inference_mode()
    def generate(
        self,
        request: GenerationRequest,
        *,
        lora_dir: str | Path | None = None,
        show_progress: bool = True,
        on_image: Callable[[Image.Image, GenerationRequest], None] | None = None,
        on_step: Callable[[int, int], None] | None = None,
    ) -> GenerationResult:
        """Generate `request.num_images` images, `batch_size` at a time; image i uses seed + i whatever the batching
        (with `noise="comfy"`, ComfyUI's convention: the initial noise of all images is one draw from `seed`).

        txt2img without an init image; img2img with one (`strength`: the share of the schedule re-noised,
        diffusers' convention); inpainting with an init image and a mask (white = repaint). A request with
        `hires_scale` adds a hires-fix pass to txt2img (`ldm.pipeline.hires`). The request is resolved against this
        model unless it already is. `on_image(image, params)` is called as each image is finished (the CLI saves
        there); `on_step(done, total)` after each U-Net evaluation, counted over the whole run (the server reports
        progress there, and stops a job at the next step by raising from it).
        A1111 LoRA tags in the prompt (`<lora:name:0.8>`) are taken out of the encoded text and merged from
        `lora_dir` (default: the one the pipeline was opened with); the request's `lora_hashes` find renamed files
        and warn on changed ones. Prompts use A1111's emphasis syntax and may be longer than 77 tokens
        (ldm/text/prompt_encoding.py); `clip_skip` is A1111's "Clip skip".
        """
        text, prompt, used_loras = self.loras.use_prompt(request.prompt, lora_dir or self.lora_dir,
                                                         parse_lora_hashes(request.lora_hashes))
        r = request.resolve(self)
        refiner = self._refiner_for(r)
        if r.vae and r.vae != self.vae_name:
            raise UserError(f"the request names the VAE '{r.vae}' but the pipeline has {self.vae_name or 'its own'} "
                            "on: pass --vae (Pipeline.use_vae)")
        job, control = prepare_job(r), self.controlnets.use(r.controlnets)  # ControlNets opened and checked once
        # what each image's PNG records: the resolved request, its prompt with a tag per loaded LoRA
        base = replace(r, prompt=prompt, model=self.model_name, vae=self.vae_name, lora_hashes=used_loras,
                       init_image=None, mask=None)
        base = replace(base, ip_adapters=self.ip_adapters.recorded(r.ip_adapters),  # hashes, not images
                       controlnets=control.recorded)
        hires = r.hires()
        second = hires.second_pass(r.steps, r.height, r.width, self.vae_factor) if hires is not None else None

        cond, uncond = self._encode(text, r)
        cond, uncond = self.ip_adapters.condition(cond, uncond, r.ip_adapters)  # + the image prompts' embeds
        refined = refiner._encode(text, r) if refiner is not None else None
        used = prompt_embeddings(self.text_encoder, [text] + [r.negative_prompt] * (r.cfg != 1.0), self.embeddings)
        base = replace(base, ti_hashes=ti_hashes(used, r.ti_hashes))  # A1111's TI hashes; a replay's checked
        image_latents = self.codec.encode(job.image) if job.image is not None else None
        steps_run = r.steps if r.strength is None else steps_to_run(r.steps, r.strength)
        if r.strength is not None:
            # strength cuts the schedule; say by how much instead of doing it silently
            mode = "inpainting" if job.mask is not None else "img2img"
            log.info("%s: strength %s -> %d of %d steps", mode, r.strength, steps_run, r.steps)

        out_images: list[Image.Image] = []
        out_params: list[GenerationRequest] = []
        decoded_all: list[np.ndarray] = []
        latents_all: list[torch.Tensor] = []
        # one bar for the whole run, counting U-Net evaluations over all batches (Heun takes 2 per step)
        per_batch = unet_calls_per_batch(r, self.scheduler_config, self.train_timesteps, steps_run, refiner is not None,
                                         hires, second)
        num_batches = -(-r.num_images // r.batch_size)
        progress = progress_bar(total=num_batches * per_batch, disable=not show_progress, desc="denoising",
                                unit="step", file=sys.stderr, leave=False)
        total, done = num_batches * per_batch, 0

        def step() -> None:
            nonlocal done
            progress.update()
            done += 1
            if on_step is not None:
                on_step(done, total)

        # ComfyUI's convention (noise="comfy"): the whole run's initial noise in one draw from the seed's generator,
        # sliced per batch; that generator goes on as image 0's (so one image is ldm-generate's, pixel for pixel)
        first, shared = generators([r.seed])[0], None
        if r.noise == "comfy":
            shared = batch_noise(first, (r.num_images, self.vae.config.latent_channels, job.height // self.vae_factor,
                                         job.width // self.vae_factor))
        for start in range(0, r.num_images, r.batch_size):
            seeds = [r.seed + i for i in range(start, min(start + r.batch_size, r.num_images))]
            gens = generators(seeds)
            if shared is not None and start == 0:
                gens[0] = first
            latents = self._sample(gens, cond, uncond, image_latents, job, r.steps, r.strength, r, step, control,
                                   switch=None if refiner is None else r.refiner_switch,
                                   noise=None if shared is None else shared[start:start + len(seeds)])
            if refiner is not None:  # the rest of the schedule on the refiner, the same generators going on
                latents = refiner._refine(gens, latents, *refined, job, r, step)
            if second is not None:  # img2img of the upscaled first pass, same seeds
                upscaled = self.codec.resize(latents, second.height, second.width, hires.upscaler)
                latents = self._sample(generators(seeds), cond, uncond, upscaled, Job(second.height, second.width),
                                       second.steps, second.strength, r, step, control)
            codec = self.codec if refiner is None else refiner.codec
            latents_all.append(codec.unscale(latents).float().cpu())
            decoded = tensor_to_float_images(codec.decode(latents))  # (b, H, W, 3) in [0, 1]
            decoded_all.append(decoded)
            for s, pixels in zip(seeds, float_to_uint8(decoded)):
                image = finish(pixels, job)
                params = base if r.noise == "comfy" else base.with_seed(s)  # ComfyUI's images share the seed
                out_images.append(image)
                out_params.append(params)
                if on_image is not None:
                    on_image(image, params)
        progress.close()
        return GenerationResult(out_images, out_params, np.concatenate(decoded_all), steps_run, torch.cat(latents_all))

    def _encode(self, text: str, r: GenerationRequest) -> tuple[Conditioning, Conditioning | None]:
        """(cond, uncond), contexts (1, 77 * chunks, D) in the pipeline's dtype: A1111 prompt syntax
        (ldm/text/prompt_encoding.py) on the text without its LoRA tags; the unconditional branch only when guidance
        uses it. Textual-inversion embeddings from the directory as it is now (read again if it changed). An
        LCM-distilled U-Net takes w = cfg - 1 as an input instead, as diffusers' pipelines run it."""
        if self.embeddings is not None:
            self.embeddings.refresh()
        embedded = self.unet.config.time_cond_proj_dim  # LCM-distilled: guidance learnt, one branch whatever the cfg
        if embedded and r.negative_prompt:
            log.warning("this U-Net is LCM-distilled (guidance is its input, no unconditional branch): the negative "
                        "prompt is not used")
        cond, uncond = encode_prompt_pair(self.text_encoder, text, None if r.cfg == 1.0 or embedded
                                          else r.negative_prompt, r.clip_skip, self.embeddings)
        if embedded:
            cond = replace(cond, timestep_cond=guidance_scale_embedding(r.cfg - 1.0, embedded).to(self.device))
        return cond.to(self.dtype), None if uncond is None else uncond.to(self.dtype)

    def _refiner_for(self, r: GenerationRequest) -> Pipeline | None:
        """The opened refiner a request names, checked."""
        if not r.refiner:
            return None
        if self.refiner is None or self.refiner.model_name != r.refiner:
            raise UserError(f"the request names the refiner '{r.refiner}' but it was not opened with this model: "
                            "pass --refiner MODEL (Pipeline.open(refiner=...) or attach_refiner)")
        return self.refiner

    def _with_time_ids(self, cond: Conditioning, uncond: Conditioning | None, r: GenerationRequest, height: int,
                       width: int, img2img: bool) -> tuple[Conditioning, Conditioning | None]:
        """SDXL's conditionings with the time ids of a height x width pass; SD's as they are."""
        if not self.time_id_count:
            return cond, uncond
        positive, negative = time_ids(r, height, width, self.time_id_count, img2img)
        return cond.with_time_ids(positive), None if uncond is None else uncond.with_time_ids(negative)

    def _refine(self, gens: list[torch.Generator], latents: torch.Tensor, cond: Conditioning,
                uncond: Conditioning | None, job: Job, r: GenerationRequest, on_step: Callable[[], None]):
        """(On the refiner) the schedule from `r.refiner_switch` on, from the base's latents (b, C, h, w), as
        diffusers' img2img pipeline runs it with `denoising_start`; the base's generators go on drawing."""
        b = latents.shape[0]
        scheduler, timesteps = refiner_schedule(r.sampler, self.scheduler_config, r.schedule, r.eta, r.steps,
                                                r.strength, r.refiner_switch, self.train_timesteps, self.device)
        cond, uncond = self._with_time_ids(cond, uncond, r, job.height, job.width, img2img=True)
        return denoise(self._unet_fn, scheduler, latents, timesteps, cond.expand(b),
                       None if uncond is None else uncond.expand(b), r.cfg, r.guidance_rescale, generators=gens,
                       on_step=on_step)

    def _sample(
        self,
        gens: list[torch.Generator],
        cond: Conditioning,
        uncond: Conditioning | None,
        image_latents: tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None,  # posterior, or latents as they are
        job: Job,
        steps: int,
        strength: float | None,
        r: GenerationRequest,
        on_step: Callable[[], None],
        control: Control,
        switch: float | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One batch (one generator per image): starting latents for its mode, then the loop. Returns the final
        latents (b, C, h, w); with `switch` (a refiner's), those at that point of the schedule. `noise` (b, C, h, w)
        on the CPU: the initial noise, in place of a draw from each generator (ComfyUI's convention)."""
        b = len(gens)
        scheduler = make_scheduler(r.sampler, self.scheduler_config, r.schedule, r.eta)  # fresh: state is per run
        scheduler.set_timesteps(steps, device=self.device)
        timesteps = scheduler.timesteps
        c = self.vae.config.latent_channels
        shape = (c, job.height // self.vae_factor, job.width // self.vae_factor)

        inpaint = None
        if image_latents is None:  # txt2img: pure noise at the scheduler's initial sigma
            noise = self._to_device(per_image_noise(gens, shape) if noise is None else noise)
            latents = noise * scheduler.init_noise_sigma
        else:
            steps_run = steps_to_run(steps, strength)
            t_start = (steps - steps_run) * scheduler.order
            timesteps = timesteps[t_start:]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(t_start)  # sigma-based samplers look their noise level up by index
            from_scratch = job.mask is not None and strength == 1.0
            if isinstance(image_latents, torch.Tensor):
                known = image_latents
            elif from_scratch and self.inpainting_unet:
                # a 9-channel U-Net repainting from noise never uses the init image's latents: they are not drawn,
                # as diffusers' inpainting pipelines skip them, so the same seed gives the same noise
                known = None
            else:
                known = self.codec.sample(image_latents, gens)  # (b, C, h, w): draw 1 of each generator
            noise = self._to_device(per_image_noise(gens, shape) if noise is None else noise)  # draw 2
            if from_scratch:
                # inpainting from scratch starts from pure noise, as StableDiffusionInpaintPipeline does
                latents = noise * scheduler.init_noise_sigma
            else:
                latents = scheduler.add_noise(known, noise, timesteps[:1].repeat(b))
            if job.mask is not None:
                inpaint = inpaint_state(job, known, noise, gens, self.codec, nine_channel=self.inpainting_unet)

        if switch is not None:  # diffusers' `denoising_end`: the base stops where the refiner takes over
            timesteps = base_timesteps(timesteps, switch_cutoff(switch, self.train_timesteps))
        cond, uncond = self._with_time_ids(cond, uncond, r, job.height, job.width, img2img=image_latents is not None)

        def expand(e: Conditioning | None) -> Conditioning | None:
            return None if e is None else e.expand(b)  # (1, 77 * chunks, D) -> (b, 77 * chunks, D)

        return denoise(
            self._unet_fn, scheduler, latents, timesteps, expand(cond), expand(uncond), r.cfg, r.guidance_rescale,
            generators=gens, inpaint=inpaint, on_step=on_step, extra_kwargs=control.hook(job.height, job.width, b),
        )

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, self.dtype)
