"""`Pipeline`: text (+ optional init image and mask) -> images, over the one loop in `denoise.py`.

    pipe = Pipeline.from_pretrained("path/to/model", device="cuda", dtype="fp16")
    result = pipe("a red car", negative_prompt="blurry", cfg=7.5, seed=42, num_images=4)
    result.images[0].save("car.png")  # PIL images; result.params[i] holds image i's settings (its seed)
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from PIL import Image

from ldm.errors import UserError
from ldm.lora.apply import AppliedLora, LoraStack
from ldm.pipeline import images as im
from ldm.pipeline.denoise import Inpaint, denoise
from ldm.pipeline.device import pick_device, pick_dtype
from ldm.pipeline.hires import HiresFix
from ldm.components import Components
from ldm.pipeline.loading import load_components, resolve_model
from ldm.pipeline.metadata import GenerationParams
from ldm.pipeline.samplers import DEFAULT_SAMPLER, make_scheduler
from ldm.pipeline.seeds import generators, per_image_noise, random_seed
from ldm.pipeline.validation import check_request, check_size, pick_size, steps_to_run
from ldm.pixels import float_to_uint8, pil_to_tensor, tensor_to_float_images
from ldm.progress import progress_bar
from ldm.text.prompt_encoding import encode_prompt_pair
from ldm.vae.loading import vae_factor

log = logging.getLogger(__name__)

DEFAULT_STEPS = 25
DEFAULT_CFG = 7.5
DEFAULT_STRENGTH = 0.75  # img2img; inpainting defaults to 1.0 (the masked region is repainted from noise)
DEFAULT_MASK_BLUR = 4


@dataclass
class GenerationResult:
    images: list[Image.Image]  # final images (inpainting: pasted back onto the init image)
    params: list[GenerationParams]  # one per image, with that image's seed
    decoded: np.ndarray  # (N, H, W, 3) float32 in [0, 1]: the VAE's output before rounding and paste-back
    steps_run: int  # denoising steps actually run (fewer than `steps` for img2img with strength < 1)
    latents: torch.Tensor  # (N, C, h, w) float32 on the CPU: the final latents as the VAE decodes them (unscaled)


@dataclass
class _Job:
    """The per-run inputs every batch shares, resolved once."""

    height: int
    width: int
    image: torch.Tensor | None = None  # (1, 3, H, W) in [-1, 1]
    mask: torch.Tensor | None = None  # (1, 1, H, W) 1 = repaint
    original: Image.Image | None = None  # the init image as given (inpainting pastes back onto it)
    original_mask: Image.Image | None = None  # the mask at the original's size
    alpha: np.ndarray | None = None  # (H0, W0) paste-back weight: 0 outside the mask, feathered inward


class Pipeline:
    def __init__(
        self,
        components: Components,
        device: torch.device,
        dtype: torch.dtype,
        vae_tiling: bool = False,
        compile_unet: bool | str = False,
    ) -> None:
        self.unet = components.unet
        self.vae: AutoencoderKL = components.vae
        self.text_encoder = components.text_encoder
        self.scheduler_config = components.scheduler_config
        self.model_name = components.name
        self.device, self.dtype = device, dtype
        self.vae_factor = vae_factor(self.vae.config)
        sample = self.unet.config.sample_size
        self.default_size = (sample[0] if isinstance(sample, (list, tuple)) else sample) * self.vae_factor
        # a 9-channel U-Net is an inpainting model (latents + mask + masked-image latents); 4 channels is ordinary
        self.inpainting_unet = self.unet.config.in_channels == 2 * self.vae.config.latent_channels + 1
        self._check_parts_fit()
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

    def load_lora(self, path: str | Path, scale: float = 1.0, name: str | None = None) -> AppliedLora:
        """Merge a LoRA (diffusers/peft or kohya .safetensors) into the weights for every later call; several
        stack. `name` (default: the file's stem) is how the PNG metadata names it. `unload_loras()` undoes all."""
        return self.loras.load(path, scale, name)

    def unload_loras(self) -> None:
        self.loras.unload()

    def _check_parts_fit(self) -> None:
        """Parts that do not fit each other would fail deep inside the U-Net; say which ones, before any work."""
        c, unet = self.vae.config.latent_channels, self.unet.config
        if unet.out_channels != c or unet.in_channels not in (c, 2 * c + 1):
            raise UserError(
                f"the U-Net ({unet.in_channels} in / {unet.out_channels} out channels) does not fit the VAE's "
                f"{c} latent channels (expected {c} or {2 * c + 1} in, {c} out)"
            )
        if unet.cross_attention_dim != self.text_encoder.hidden_size:
            raise UserError(
                f"the U-Net attends to {unet.cross_attention_dim}-dim text features but the text encoder gives "
                f"{self.text_encoder.hidden_size}-dim ones: text encoder and U-Net come from different models"
            )

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
        """A diffusers-format SD 1.x/2.x directory (or hub id), or a single .safetensors file in the original layout.
        dtype: 'fp32' | 'fp16' | 'bf16' | None (auto). `vae`: a VAE file or directory replacing the model's;
        `prediction_type`: 'epsilon' | 'v_prediction', overriding the model's."""
        dev = device if isinstance(device, torch.device) else pick_device(device)
        dt = dtype if isinstance(dtype, torch.dtype) else pick_dtype(dtype, dev)
        root = resolve_model(None if model is None else str(model))
        components = load_components(root, str(model), dev, dt, vae=vae, prediction_type=prediction_type)
        return cls(components, dev, dt, vae_tiling=vae_tiling, compile_unet=compile_unet)

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str,
        negative_prompt: str = "",
        *,
        steps: int = DEFAULT_STEPS,
        cfg: float = DEFAULT_CFG,
        sampler: str = DEFAULT_SAMPLER,
        karras: bool = False,
        seed: int | None = None,
        num_images: int = 1,
        batch_size: int = 1,
        height: int | None = None,
        width: int | None = None,
        init_image: Image.Image | str | Path | None = None,
        mask: Image.Image | str | Path | None = None,
        strength: float | None = None,
        mask_blur: int = DEFAULT_MASK_BLUR,
        guidance_rescale: float = 0.0,
        hires: HiresFix | None = None,
        clip_skip: int = 1,
        show_progress: bool = True,
        on_image: Callable[[Image.Image, GenerationParams], None] | None = None,
        lora_dir: str | Path | None = None,
        lora_hashes: dict[str, str] | None = None,
        on_step: Callable[[int, int], None] | None = None,
    ) -> GenerationResult:
        """Generate `num_images` images, `batch_size` at a time; image i uses seed + i whatever the batching.

        txt2img without `init_image`; img2img with it (`strength` in (0, 1], default 0.75: the share of the schedule
        re-noised, diffusers' convention); inpainting with `init_image` and `mask` (white = repaint, default
        strength 1.0). `hires` adds a hires-fix pass to txt2img (`ldm.pipeline.hires`). `on_image(image, params)`
        is called as each image is finished (the CLI saves there);
        `on_step(done, total)` after each U-Net evaluation, counted over the whole run (the server reports progress
        there, and stops a job at the next step by raising from it).
        A1111 LoRA tags in the prompt (`<lora:name:0.8>`) are taken out of the encoded text and merged from
        `lora_dir`; `lora_hashes` ({name: short hash}, from a PNG) finds renamed files and warns on changed ones.
        Prompts use A1111's emphasis syntax and may be longer than 77 tokens (ldm/text/prompt_encoding.py);
        `clip_skip` is A1111's "Clip skip" (1 = the text encoder's configured layer).
        """
        if hires is not None and init_image is not None:
            raise UserError("the hires fix is for txt2img: drop --hires-scale or --init-image")
        if mask is not None and init_image is None:
            raise UserError("a mask needs an init image (--init-image) to inpaint")
        if init_image is not None and strength is None:
            strength = 1.0 if mask is not None else DEFAULT_STRENGTH
        if init_image is None and strength is not None:
            raise UserError("strength only applies with an init image (--init-image)")
        if self.inpainting_unet and mask is None:
            raise UserError("this model has an inpainting U-Net (9 input channels): pass --init-image and --mask")
        seed = random_seed() if seed is None or seed == -1 else seed
        text, prompt, used_loras = self.loras.use_prompt(prompt, lora_dir, lora_hashes)
        job = self._prepare_job(init_image, mask, height, width, mask_blur)
        check_request(
            steps=steps, cfg=cfg, height=job.height, width=job.width, vae_factor=self.vae_factor, strength=strength,
            sampler=sampler, karras=karras, num_images=num_images, batch_size=batch_size, seed=seed,
            guidance_rescale=guidance_rescale, mask_blur=mask_blur,
            max_steps=int(self.scheduler_config.get("num_train_timesteps", 1000)),
        )
        base = GenerationParams(
            prompt=prompt, negative_prompt=negative_prompt, steps=steps, sampler=sampler, karras=karras, cfg=cfg,
            seed=seed, width=job.width, height=job.height, model=self.model_name, strength=strength,
            guidance_rescale=guidance_rescale, mask_blur=mask_blur if job.mask is not None else None,
            lora_hashes=used_loras, clip_skip=clip_skip,
        )
        if hires is not None:
            hires.check(steps, job.height, job.width, self.vae_factor)
            base = hires.record(base)

        # (1, 77 * chunks, D) each, A1111 prompt syntax (ldm/text/prompt_encoding.py) on the text without its LoRA
        # tags; the unconditional branch is only computed when guidance uses it
        cond, uncond = encode_prompt_pair(self.text_encoder, text, None if cfg == 1.0 else negative_prompt, clip_skip)
        cond, uncond = cond.to(self.dtype), None if uncond is None else uncond.to(self.dtype)
        image_latents = self._encode(job.image) if job.image is not None else None
        steps_run = steps if strength is None else steps_to_run(steps, strength)
        if strength is not None:
            # strength cuts the schedule; say by how much instead of doing it silently
            mode = "inpainting" if job.mask is not None else "img2img"
            log.info("%s: strength %s -> %d of %d steps", mode, strength, steps_run, steps)

        out_images: list[Image.Image] = []
        out_params: list[GenerationParams] = []
        decoded_all: list[np.ndarray] = []
        latents_all: list[torch.Tensor] = []
        # one bar for the whole run, counting U-Net evaluations over all batches (Heun takes 2 per step)
        probe = make_scheduler(sampler, self.scheduler_config, karras)
        probe.set_timesteps(steps)
        per_batch = len(probe.timesteps) - (steps - steps_run) * probe.order
        if hires is not None:
            second = hires.second_pass(base, self.vae_factor)
            probe.set_timesteps(second.steps)
            per_batch += hires.unet_calls(probe, second)
        num_batches = -(-num_images // batch_size)
        progress = progress_bar(total=num_batches * per_batch, disable=not show_progress, desc="denoising",
                                unit="step", file=sys.stderr, leave=False)
        total, done = num_batches * per_batch, 0

        def step() -> None:
            nonlocal done
            progress.update()
            done += 1
            if on_step is not None:
                on_step(done, total)

        for start in range(0, num_images, batch_size):
            seeds = [seed + i for i in range(start, min(start + batch_size, num_images))]
            latents = self._sample(seeds, cond, uncond, image_latents, job, base, step)
            if hires is not None:  # img2img of the upscaled first pass, same seeds
                second = hires.second_pass(base, self.vae_factor)
                upscaled = hires.upscale(self, latents, (second.height, second.width))
                latents = self._sample(seeds, cond, uncond, upscaled, _Job(second.height, second.width), second,
                                       step)
            latents_all.append(self._unscale(latents).float().cpu())
            decoded = tensor_to_float_images(self._decode(latents))  # (b, H, W, 3) in [0, 1]
            decoded_all.append(decoded)
            for s, pixels in zip(seeds, float_to_uint8(decoded)):
                image = self._finish(pixels, job)
                params = base.with_seed(s)
                out_images.append(image)
                out_params.append(params)
                if on_image is not None:
                    on_image(image, params)
        progress.close()
        return GenerationResult(out_images, out_params, np.concatenate(decoded_all), steps_run, torch.cat(latents_all))

    def _prepare_job(self, init_image, mask, height: int | None, width: int | None, mask_blur: int) -> _Job:
        """Sizes, and the init image and mask as tensors at the generation size."""
        if init_image is None:
            height, width = pick_size(None, height, width, self.vae_factor, self.default_size)
            return _Job(height, width)
        original = init_image if isinstance(init_image, Image.Image) else im.load_image(init_image)
        original = original.convert("RGB")
        height, width = pick_size(original.size, height, width, self.vae_factor, self.default_size)
        try:
            check_size(height, width, self.vae_factor)
        except UserError:
            return _Job(height, width)  # check_request reports it; do not resize to an impossible size first
        image = im.fit_to_size(original, (width, height))
        job = _Job(height, width, image=pil_to_tensor(image), original=original)
        if mask is not None:
            mask_image = mask if isinstance(mask, Image.Image) else im.load_mask(mask)
            original_mask = im.fit_mask(mask_image, original.size)
            job.original_mask = original_mask
            job.mask = im.mask_to_tensor(original_mask.resize((width, height), Image.NEAREST))
            if mask_blur >= 0:  # a negative blur is reported by check_request
                job.alpha = im.feather(im.mask_to_tensor(original_mask), mask_blur)[0, 0].numpy()
        return job

    def _sample(
        self,
        seeds: list[int],
        cond: torch.Tensor,
        uncond: torch.Tensor | None,
        image_latents: tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None,  # posterior, or latents as they are
        job: _Job,
        p: GenerationParams,
        on_step: Callable[[], None],
    ) -> torch.Tensor:
        """One batch: starting latents for its mode, then the loop. Returns the final latents (b, C, h, w)."""
        b = len(seeds)
        gens = generators(seeds)
        scheduler = make_scheduler(p.sampler, self.scheduler_config, p.karras)  # fresh: multistep state is per run
        scheduler.set_timesteps(p.steps, device=self.device)
        timesteps = scheduler.timesteps
        c = self.vae.config.latent_channels
        shape = (c, job.height // self.vae_factor, job.width // self.vae_factor)

        inpaint = None
        if image_latents is None:  # txt2img: pure noise at the scheduler's initial sigma
            noise = self._to_device(per_image_noise(gens, shape))
            latents = noise * scheduler.init_noise_sigma
        else:
            steps_run = steps_to_run(p.steps, p.strength)
            t_start = (p.steps - steps_run) * scheduler.order
            timesteps = timesteps[t_start:]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(t_start)  # sigma-based samplers look their noise level up by index
            known = (image_latents if isinstance(image_latents, torch.Tensor)
                     else self._sample_posterior(image_latents, gens))  # (b, C, h, w): draw 1 of each generator
            noise = self._to_device(per_image_noise(gens, shape))  # draw 2
            if job.mask is not None and p.strength == 1.0:
                # inpainting from scratch starts from pure noise, as StableDiffusionInpaintPipeline does
                latents = noise * scheduler.init_noise_sigma
            else:
                latents = scheduler.add_noise(known, noise, timesteps[:1].repeat(b))
            if job.mask is not None:
                inpaint = self._inpaint_state(job, known, noise, gens)

        def expand(e: torch.Tensor | None) -> torch.Tensor | None:
            return None if e is None else e.expand(b, *e.shape[1:])  # (1, 77 * chunks, D) -> (b, 77 * chunks, D)

        latents = denoise(
            self._unet_fn, scheduler, latents, timesteps, expand(cond), expand(uncond), p.cfg, p.guidance_rescale,
            generators=gens, inpaint=inpaint, on_step=on_step,
        )
        return latents

    def _inpaint_state(self, job: _Job, known: torch.Tensor, noise: torch.Tensor, gens) -> Inpaint:
        b = known.shape[0]
        h, w = known.shape[-2:]
        mask = job.mask.to(self.device)  # (1, 1, H, W)
        # blend: repaint a latent pixel if any pixel under it is masked, so no masked pixel keeps the old content
        blend = F.max_pool2d(mask, self.vae_factor).to(self.dtype).expand(b, 1, h, w)  # (b, 1, h, w)
        state = Inpaint(blend_mask=blend, known_latents=known, noise=noise)
        if self.inpainting_unet:
            # 9-channel U-Nets were trained on a nearest-downsampled mask and the masked image's latents
            state.unet_mask = F.interpolate(mask, size=(h, w)).to(self.dtype).expand(b, 1, h, w)
            masked_image = job.image * (job.mask < 0.5)  # (1, 3, H, W), masked pixels set to 0 (grey)
            state.masked_image_latents = self._sample_posterior(self._encode(masked_image), gens)  # draw 3
        return state

    def _encode(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, 3, H, W) in [-1, 1] -> the VAE posterior's (mean, std), each (1, C, h, w); once per run, not per image."""
        x = image.to(self.device, self.dtype)
        dist = self.vae.encode(x).latent_dist
        if self.dtype == torch.float16 and not torch.isfinite(dist.mean).all():
            log.warning("VAE encode in fp16 gave NaN/inf; encoding again in fp32")
            with _vae_in_fp32(self.vae):
                dist = self.vae.encode(x.float()).latent_dist
            return dist.mean.to(self.dtype), dist.std.to(self.dtype)
        return dist.mean, dist.std

    def _sample_posterior(self, posterior: tuple[torch.Tensor, torch.Tensor], gens) -> torch.Tensor:
        """z_i = mean + std * eps_i with eps_i from generator i, then into the diffusion model's latent scale."""
        mean, std = posterior
        eps = self._to_device(per_image_noise(gens, tuple(mean.shape[1:])))  # (b, C, h, w)
        z = mean + std * eps
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (z - shift) * self.vae.config.scaling_factor

    def _unscale(self, latents: torch.Tensor) -> torch.Tensor:
        """The diffusion model's latents -> the VAE decoder's input."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return latents / self.vae.config.scaling_factor + shift

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (b, C, h, w) -> images (b, 3, H, W) in [-1, 1]; an fp16 decode that overflows is redone in fp32.

        The SD 1.x/2.x VAE decoder's activations exceed fp16's range on some images and come out NaN (black images,
        A1111 #7633); decoding those again in fp32 costs one extra decode and only when it happens.
        """
        z = self._unscale(latents)
        decoded = self.vae.decode(z, return_dict=False)[0]
        if self.dtype == torch.float16 and torch.isnan(decoded).any():
            log.warning("VAE decode in fp16 gave NaN; decoding again in fp32")
            with _vae_in_fp32(self.vae):
                decoded = self.vae.decode(z.float(), return_dict=False)[0]
        return decoded

    def _finish(self, pixels: np.ndarray, job: _Job) -> Image.Image:
        """uint8 (H, W, 3) -> the output image; inpainting pastes it onto the original init image (at its size)."""
        generated = Image.fromarray(pixels)
        if job.alpha is None:
            return generated
        if generated.size != job.original.size:
            generated = generated.resize(job.original.size, Image.LANCZOS)
        return Image.fromarray(im.paste_back(np.asarray(generated), np.asarray(job.original), job.alpha))

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, self.dtype)


class _vae_in_fp32:
    """Context: the VAE in fp32 for one call, then back to its dtype."""

    def __init__(self, vae: AutoencoderKL) -> None:
        self.vae, self.dtype = vae, vae.dtype

    def __enter__(self) -> AutoencoderKL:
        return self.vae.to(torch.float32)

    def __exit__(self, *exc) -> None:
        self.vae.to(self.dtype)
