"""The value checks `GenerationRequest.resolve` runs: pure functions of numbers, run before any model weight is read."""

from __future__ import annotations

import math

from ldm.errors import UserError
from ldm.pipeline.samplers import check_sampler
from ldm.pipeline.seeds import MAX_SEED

# Pixel bounds on height and width. 8 px is one latent pixel of an f=8 VAE, the least a U-Net can be run on;
# 8192 px is where an SD U-Net's attention over (8192 / 8)^2 tokens stops fitting any GPU, so a larger value is
# almost surely a typo. Within the bounds the size must also be a multiple of the VAE factor.
MIN_SIZE = 8
MAX_SIZE = 8192


def steps_to_run(steps: int, strength: float) -> int:
    """How many of `steps` an img2img job runs: diffusers' convention, int(steps * strength), at most steps.

    strength is the share of the schedule that is re-noised: 1.0 starts from (almost) pure noise, 0.6 with 25 steps
    re-noises to the 15th-last timestep and runs 15 steps.
    """
    return min(int(steps * strength), steps)


def check_size(height: int, width: int, vae_factor: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if not MIN_SIZE <= value <= MAX_SIZE:
            raise UserError(f"{name} {value} is out of range: use {MIN_SIZE}..{MAX_SIZE} px")
        if value % vae_factor:
            lower = max(vae_factor, value - value % vae_factor)
            raise UserError(
                f"{name} {value} is not a multiple of {vae_factor} (the VAE's downsampling factor); "
                f"use e.g. {lower} or {lower + vae_factor}"
            )


def check_request(
    *,
    steps: int,
    cfg: float,
    height: int,
    width: int,
    vae_factor: int,
    strength: float | None = None,
    sampler: str | None = None,
    schedule: str = "",
    num_images: int = 1,
    batch_size: int = 1,
    seed: int = 0,
    guidance_rescale: float = 0.0,
    mask_blur: int = 0,
    max_steps: int = 1000,
) -> None:
    """Raise a `UserError` naming the first bad argument. `strength` is None for txt2img; `sampler` None is not
    checked here (`GenerationRequest.resolve` passes its own)."""
    if sampler is not None:
        check_sampler(sampler, schedule)
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}")
    if steps > max_steps:
        raise UserError(f"steps {steps} exceeds the model's {max_steps} training timesteps")
    if not math.isfinite(cfg) or cfg < 0:
        raise UserError(f"cfg (guidance scale) must be a finite number >= 0, got {cfg}")
    if not math.isfinite(guidance_rescale) or not 0.0 <= guidance_rescale <= 1.0:
        raise UserError(f"guidance rescale must be in [0, 1], got {guidance_rescale}")
    check_size(height, width, vae_factor)
    if strength is not None:
        if not math.isfinite(strength) or not 0.0 < strength <= 1.0:
            raise UserError(f"strength must be in (0, 1], got {strength}")
        if steps_to_run(steps, strength) < 1:
            raise UserError(
                f"strength {strength} with {steps} steps runs no denoising step (int({steps} x {strength}) = 0); "
                "raise --strength or --steps"
            )
    if num_images < 1:
        raise UserError(f"num-images must be at least 1, got {num_images}")
    if batch_size < 1:
        raise UserError(f"batch-size must be at least 1, got {batch_size}")
    if not 0 <= seed <= MAX_SEED - (num_images - 1):
        raise UserError(f"seed must be in 0..{MAX_SEED - (num_images - 1)} (or -1 for a random one), got {seed}")
    if mask_blur < 0:
        raise UserError(f"mask blur must be >= 0 px, got {mask_blur}")


def pick_size(
    init_size: tuple[int, int] | None, height: int | None, width: int | None, vae_factor: int, default_size: int
) -> tuple[int, int]:
    """(height, width) to generate at: as given; else the init image's size rounded down to a multiple of the VAE
    factor (the image is then resized, with a warning); else the model's native size."""
    if init_size is None:
        return height or default_size, width or default_size
    w0, h0 = init_size
    return height or max(vae_factor, h0 - h0 % vae_factor), width or max(vae_factor, w0 - w0 % vae_factor)
