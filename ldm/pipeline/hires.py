"""Hires fix, as AUTOMATIC1111 does it: a txt2img pass at the base size, an upscale, then an img2img pass at the
target size with the same prompt, seeds, sampler and guidance.

    ldm-generate "a red car" --width 512 --height 512 --hires-scale 2 --hires-strength 0.5   # -> 1024x1024

The upscale is either of the latents (`latent`: bilinear, A1111's "Latent") or of the decoded pixels (`lanczos`:
PIL Lanczos, then encoded again with the VAE, A1111's "Lanczos"). The second pass runs exactly N steps (N =
`--hires-steps`, or `--steps` when it is 0) as A1111 does: a schedule of int(N / min(strength, 0.999)) steps whose
last N are run, i.e. re-noised to `strength` of it (A1111's `sample_hr_pass` passes `steps` to `sample_img2img`, so
`setup_img2img_steps` stretches the schedule; plain img2img here keeps diffusers' int(steps x strength) instead). Its
noise comes from fresh generators of the same seeds, so an image is a function of its seed whatever the batch size.
The target side is int(side x scale) rounded down to a multiple of the VAE factor (A1111 rounds it the same way, by
its latent size); metadata keeps the base `Size` and adds `Hires upscale`, `Hires steps`, `Hires upscaler` and
`Denoising strength` as A1111 writes them.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from PIL import Image

from ldm.errors import UserError
from ldm.pipeline.validation import MAX_SIZE, check_size, steps_to_run
from ldm.pixels import float_to_uint8, pil_to_tensor, tensor_to_float_images

if TYPE_CHECKING:
    from ldm.pipeline.metadata import GenerationParams
    from ldm.pipeline.pipeline import Pipeline

UPSCALERS = ("latent", "lanczos")
DEFAULT_STRENGTH = 0.7  # A1111's default "Denoising strength" for the hires pass
MAX_SCALE = 8.0  # a 512-px base at 8x is 4096 px: beyond that an SD U-Net's attention does not fit any GPU


@dataclass(frozen=True)
class HiresFix:
    scale: float
    strength: float = DEFAULT_STRENGTH
    steps: int = 0  # steps the second pass runs (A1111's 'Hires steps'); 0 = the first pass's steps
    upscaler: str = "latent"

    def check(self, steps: int, height: int, width: int, vae_factor: int) -> None:
        """Raise a `UserError` naming the first bad value (before any weight is loaded)."""
        if not math.isfinite(self.scale) or not 1.0 <= self.scale <= MAX_SCALE:
            raise UserError(f"--hires-scale must be in [1, {MAX_SCALE:g}], got {self.scale}")
        if not math.isfinite(self.strength) or not 0.0 < self.strength <= 1.0:
            raise UserError(f"--hires-strength must be in (0, 1], got {self.strength}")
        if self.steps < 0:
            raise UserError(f"--hires-steps must be >= 0 (0 = as many as --steps), got {self.steps}")
        if self.upscaler not in UPSCALERS:
            raise UserError(
                f"hires upscaler '{self.upscaler}' is not available; use --hires-upscaler {' or '.join(UPSCALERS)}"
            )
        target_h, target_w = self.target_size(height, width, vae_factor)
        if max(target_h, target_w) > MAX_SIZE:
            raise UserError(
                f"--hires-scale {self.scale} makes {width}x{height} into {target_w}x{target_h}, over {MAX_SIZE} px"
            )
        check_size(target_h, target_w, vae_factor)

    def target_size(self, height: int, width: int, vae_factor: int) -> tuple[int, int]:
        """(height, width) of the second pass: int(side x scale), rounded down to a multiple of the VAE factor."""
        return tuple(max(vae_factor, int(side * self.scale) // vae_factor * vae_factor) for side in (height, width))

    def record(self, params: GenerationParams) -> GenerationParams:
        """The first pass's params plus the hires fields (what the PNG says)."""
        return dataclasses.replace(params, hires_scale=self.scale, hires_strength=self.strength,
                                   hires_steps=self.steps, hires_upscaler=self.upscaler)

    def second_pass(self, params: GenerationParams, vae_factor: int) -> GenerationParams:
        """The settings the img2img pass runs with: target size, and a schedule of int(N / min(strength, 0.999))
        steps with the strength that makes `steps_to_run` run exactly its last N (A1111's hires steps)."""
        height, width = self.target_size(params.height, params.width, vae_factor)
        run = self.steps or params.steps
        total = max(run, int(run / min(self.strength, 0.999)))
        # (run + 0.5) / total: int(total x it) is `run` whatever the float rounding of run / total
        strength = min(1.0, (run + 0.5) / total)
        assert steps_to_run(total, strength) == run
        return dataclasses.replace(params, height=height, width=width, steps=total, strength=strength)

    def unet_calls(self, scheduler, second: GenerationParams) -> int:
        """U-Net evaluations of the second pass for one batch (for the progress bar); `scheduler` is set to
        `second.steps` (the stretched schedule of `second_pass`) by the caller."""
        return len(scheduler.timesteps) - (second.steps - steps_to_run(second.steps, second.strength)) * \
            scheduler.order

    def upscale(self, pipe: Pipeline, latents: torch.Tensor, size: tuple[int, int]) -> Any:
        """First-pass latents (b, C, h, w) -> the second pass's start: upscaled latents (b, C, H/f, W/f) for
        `latent`; for `lanczos` the VAE posterior (mean, std) of the decoded, resized images, sampled per image
        by the pipeline."""
        height, width = size
        f = pipe.vae_factor
        if self.upscaler == "latent":
            # A1111's "Latent": bilinear, no antialiasing (shared.latent_upscale_modes)
            return F.interpolate(latents, size=(height // f, width // f), mode="bilinear", align_corners=False)
        pixels = float_to_uint8(tensor_to_float_images(pipe._decode(latents)))  # (b, h*f, w*f, 3) uint8
        resized = [pil_to_tensor(Image.fromarray(p).resize((width, height), Image.LANCZOS)) for p in pixels]
        return pipe._encode(torch.cat(resized))  # (b, 3, H, W) in [-1, 1] -> posterior (mean, std), (b, C, H/f, W/f)


def from_values(values: dict[str, Any]) -> HiresFix | None:
    """The CLI's merged option values -> a HiresFix, or None; hires options without --hires-scale are refused."""
    if values.get("hires_scale") is None:
        given = [f"--{k.replace('_', '-')}" for k in ("hires_strength", "hires_steps", "hires_upscaler")
                 if values.get(k) is not None]
        if given:
            raise UserError(f"{', '.join(given)} only apply with --hires-scale (e.g. --hires-scale 2)")
        return None
    name = str(values.get("hires_upscaler") or "latent")
    return HiresFix(
        scale=float(values["hires_scale"]),
        strength=DEFAULT_STRENGTH if values.get("hires_strength") is None else float(values["hires_strength"]),
        steps=int(values.get("hires_steps") or 0),
        upscaler=name.lower() if name.lower() in UPSCALERS else name,  # A1111 writes "Latent", "Lanczos"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    h = parser.add_argument_group("hires fix (txt2img at --width x --height, then img2img at the scaled size)")
    h.add_argument("--hires-scale", type=float, default=None,
                   help=f"scale the image by this factor in [1, {MAX_SCALE:g}] with a second, img2img pass "
                   "(A1111's 'Hires upscale'); each side becomes int(side x scale) rounded down to the VAE factor")
    h.add_argument("--hires-strength", type=float, default=None,
                   help=f"the second pass's denoising strength in (0, 1] (default {DEFAULT_STRENGTH})")
    h.add_argument("--hires-steps", type=int, default=None,
                   help="steps the second pass runs, as A1111's Hires steps (default 0 = --steps)")
    h.add_argument("--hires-upscaler", default=None,
                   help="latent (default: bilinear on the latents) or lanczos (decode, resize, encode again)")
