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

import math
from dataclasses import dataclass

from ldm.errors import UserError
from ldm.pipeline.validation import MAX_SIZE, check_size, steps_to_run

UPSCALERS = ("latent", "lanczos")
HIRES_STRENGTH = 0.7  # A1111's default "Denoising strength" of the hires pass
HIRES_UPSCALER = "latent"  # A1111's default (its latent_upscale_default_mode)
MAX_SCALE = 8.0  # a 512-px base at 8x is 4096 px: beyond that an SD U-Net's attention does not fit any GPU


@dataclass(frozen=True)
class SecondPass:
    """What the img2img pass runs with: the target size and a stretched schedule (see `HiresFix.second_pass`)."""

    height: int
    width: int
    steps: int  # the schedule's length
    strength: float  # the share of it that is run: exactly the hires steps


@dataclass(frozen=True)
class HiresFix:
    """The plan (`GenerationRequest.hires()` makes it, with the defaults); `Pipeline` carries it out."""

    scale: float
    strength: float = HIRES_STRENGTH
    steps: int = 0  # steps the second pass runs (A1111's 'Hires steps'); 0 = the first pass's steps
    upscaler: str = HIRES_UPSCALER

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

    def second_pass(self, steps: int, height: int, width: int, vae_factor: int) -> SecondPass:
        """The img2img pass after a first pass of `steps` at height x width: the target size, and a schedule of
        int(N / min(strength, 0.999)) steps with the strength that makes `steps_to_run` run exactly its last N
        (A1111's hires steps)."""
        target_h, target_w = self.target_size(height, width, vae_factor)
        run = self.steps or steps
        total = max(run, int(run / min(self.strength, 0.999)))
        # (run + 0.5) / total: int(total x it) is `run` whatever the float rounding of run / total
        strength = min(1.0, (run + 0.5) / total)
        assert steps_to_run(total, strength) == run
        return SecondPass(target_h, target_w, total, strength)

    def unet_calls(self, scheduler, second: SecondPass) -> int:
        """U-Net evaluations of the second pass for one batch (for the progress bar); `scheduler` is set to
        `second.steps` (the stretched schedule) by the caller."""
        return len(scheduler.timesteps) - (second.steps - steps_to_run(second.steps, second.strength)) * \
            scheduler.order
