"""Flow matching (rectified flow; Liu et al. 2022, Lipman et al. 2022, as SD3 trains it) for U-Nets trained from
scratch: `noise.prediction_type: flow`.

The noisy input is the straight line x_t = (1 - sigma) x0 + sigma eps, sigma in [0, 1] (0 = clean), and the U-Net
predicts its velocity dx_t / dsigma = eps - x0 at timestep sigma * T. Sampling integrates that ODE from sigma = 1
(pure noise) to 0 with Euler steps, which is diffusers' `FlowMatchEulerDiscreteScheduler` (shift 1): the scheduler
the exported model ships, and what our pipeline samples it with.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler


def build_flow_scheduler(num_train_timesteps: int) -> FlowMatchEulerDiscreteScheduler:
    """The scheduler config a flow-matching model ships: no shift, sigmas from 1 down to 1 / T."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=1.0)


def flow_sigma(t: torch.Tensor, num_train_timesteps: int, like: torch.Tensor) -> torch.Tensor:
    """U-Net timesteps t (B,) -> sigma = t / T as (B, 1, 1, 1) in `like`'s dtype and device."""
    return (t.to(like.device, like.dtype) / num_train_timesteps).view(-1, 1, 1, 1)


def flow_noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """x_t = (1 - sigma) x0 + sigma eps, all (B, C, h, w); t (B,) U-Net timesteps sigma * T."""
    sigma = flow_sigma(t, num_train_timesteps, x0)
    return (1 - sigma) * x0 + sigma * eps


def flow_snr(t: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """(B,) signal-to-noise ratio ((1 - sigma) / sigma)^2 of x_t (inf at sigma 0, 0 at sigma 1), float64."""
    sigma = t.double() / num_train_timesteps
    return ((1 - sigma) / sigma) ** 2
