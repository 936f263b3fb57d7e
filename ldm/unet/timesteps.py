"""Where in the noise process each training sample is put: the timestep sampling of `noise.timestep_sampling`.

Flow matching (`noise.prediction_type: flow`) uses the noise fraction sigma in [0, 1) itself and gives the U-Net
sigma * T (a float, as diffusers' FlowMatchEulerDiscreteScheduler does at inference); DDPM's discrete timesteps take
floor(u * T) of the same u in [0, 1), as kohya's and SimpleTuner's logit-normal options do. The densities (SD3 paper,
Esser et al. 2024, https://arxiv.org/abs/2403.03206, section 3.1):

    uniform       u ~ U(0, 1)                       (DDPM: torch.randint(0, T), as before)
    logit_normal  u = sigmoid(m + s n), n ~ N(0, 1)  (eq. 19; m = noise.logit_mean, s = noise.logit_std)
    mode          u = 1 - v - s (cos^2(pi v / 2) - 1 + v), v ~ U(0, 1)   (eq. 20; s = noise.mode_scale)
    cosmap        u = 1 - 1 / (tan(pi v / 2) + 1), v ~ U(0, 1)           (eq. 21)

Every draw is from the global RNG on the latents' device (restored on resume), B numbers per call.
"""

from __future__ import annotations

import math

import torch


def sample_fraction(b: int, device: torch.device, kind: str, logit_mean: float = 0.0, logit_std: float = 1.0,
                    mode_scale: float = 1.29) -> torch.Tensor:
    """(B,) float32 noise fractions u in [0, 1) drawn from `kind`'s density."""
    if kind == "logit_normal":
        return torch.sigmoid(logit_mean + logit_std * torch.randn(b, device=device))
    v = torch.rand(b, device=device)
    if kind == "uniform":
        return v
    if kind == "mode":
        return 1 - v - mode_scale * (torch.cos(math.pi * v / 2) ** 2 - 1 + v)
    if kind == "cosmap":
        return 1 - 1 / (torch.tan(math.pi * v / 2) + 1)
    raise ValueError(f"unknown timestep sampling '{kind}'")


def sample_timesteps(b: int, device: torch.device, cfg) -> torch.Tensor:
    """(B,) U-Net timesteps for one batch under `cfg` (a `NoiseConfig`): int64 in [0, T) for DDPM, float32 sigma * T
    in [0, T) for flow matching."""
    T = cfg.num_train_timesteps
    if cfg.prediction_type != "flow" and cfg.timestep_sampling == "uniform":
        return torch.randint(0, T, (b,), device=device)  # today's draw, bit for bit
    u = sample_fraction(b, device, cfg.timestep_sampling, cfg.logit_mean, cfg.logit_std, cfg.mode_scale)
    if cfg.prediction_type == "flow":
        return u * T
    return (u * T).long().clamp(0, T - 1)
