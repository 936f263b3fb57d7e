"""The denoising objective: noise a clean latent with a diffusers scheduler, score the U-Net's prediction.

Names follow the papers: x0 (clean latent), eps (noise), alpha_bar (cumulative product of 1 - beta), v (velocity,
Salimans & Ho 2022: v = sqrt(alpha_bar) * eps - sqrt(1 - alpha_bar) * x0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from ldm.config import check
from ldm.text.conditioning import Conditioning


Text = torch.Tensor | Conditioning  # (B, 77, D) text states (SD), or SDXL's context, pooled embedding and time ids


@dataclass
class NoiseConfig:
    # SD 1.x's schedule. `clip_sample` stays off: diffusers' DDPMScheduler defaults to clipping predicted x0 to
    # [-1, 1], which is right for pixels and ruins latents (whose range is several units).
    beta_schedule: Literal["scaled_linear", "linear", "squaredcos_cap_v2"] = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    min_snr_gamma: float = 0.0  # 0 = off; 5 is the paper's value (Hang et al. 2023, https://arxiv.org/abs/2303.09556)
    offset_noise: float = 0.0  # per-channel constant added to eps (e.g. 0.05-0.1): lets images get very dark/bright
    input_perturbation: float = 0.0  # noise added to eps for the input only (Ning et al. 2023; e.g. 0.1)

    def validate(self) -> None:
        check(0 < self.beta_start < self.beta_end < 1, "noise.beta_start", "need 0 < beta_start < beta_end < 1")
        check(self.num_train_timesteps >= 2, "noise.num_train_timesteps", "must be >= 2")
        for key in ("min_snr_gamma", "offset_noise", "input_perturbation"):
            check(getattr(self, key) >= 0, f"noise.{key}", f"must be >= 0, got {getattr(self, key)}")


def build_noise_scheduler(cfg: NoiseConfig) -> DDPMScheduler:
    """The training scheduler, configured as for latent diffusion; its config is what the exported model ships."""
    scheduler = DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        clip_sample=False,
        steps_offset=1,
        thresholding=False,
    )
    # not a DDPM option, but recorded in the config for the DDIM sampler built from it (SD ships it as false)
    scheduler.register_to_config(set_alpha_to_one=False)
    return scheduler


def drop_captions(text: Text, empty: Text, p: float) -> Text:
    """Replace each row of `text` (B, 77, D) by the unconditional branch's `empty` (1, 77, D) with probability p.

    Training on both makes the U-Net a conditional and an unconditional model at once: classifier-free guidance
    needs the latter. A `Conditioning` (SDXL) drops its context and pooled embedding together, to the model's own
    unconditional branch (zeros under `force_zeros_for_empty_prompt`); time ids stay (they describe the image).
    Draws B numbers from the global RNG (restored on resume), whatever the type.
    """
    drop = torch.rand(text.shape[0] if isinstance(text, torch.Tensor) else text.context.shape[0])  # (B,)
    drop = drop < p

    def where(kept: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:  # (B, ...) and (1, ...)
        mask = drop.to(kept.device).view(-1, *[1] * (kept.ndim - 1))
        return torch.where(mask, dropped.to(kept.device, kept.dtype), kept)

    if isinstance(text, torch.Tensor):
        return where(text, empty)
    pooled = None if text.pooled is None else where(text.pooled, empty.pooled)
    return Conditioning(where(text.context, empty.context), pooled, text.time_ids)


def diffusion_loss(
    unet: torch.nn.Module,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    text: Text,
    cfg: NoiseConfig,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean (optionally min-SNR-weighted) squared error of the U-Net's eps or v prediction at random timesteps.

    x0: (B, C, h, w) scaled latents; text: (B, 77, D) text embeddings, or a `Conditioning` (SDXL: with the pooled
    embedding (B, P) and time ids (B, 6)); mask: (B, 1, h, w) loss weights in [0, 1] (`denoising_error`). Random
    numbers come from the global RNG, which checkpoints save and restore, so a resumed run draws the same noise.
    """
    b = x0.shape[0]
    eps = torch.randn_like(x0)
    if cfg.offset_noise > 0:
        eps = eps + cfg.offset_noise * torch.randn(b, x0.shape[1], 1, 1, device=x0.device, dtype=x0.dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), device=x0.device)
    eps_in = eps + cfg.input_perturbation * torch.randn_like(eps) if cfg.input_perturbation > 0 else eps
    mse, weight = denoising_error(unet, scheduler, x0, eps, t, text, cfg, eps_in=eps_in, mask=mask)
    return (mse * weight).mean()


def denoising_error(
    unet: torch.nn.Module,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    text: Text,
    cfg: NoiseConfig,
    eps_in: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The U-Net's squared error at given noise and timesteps: (mse (B,), loss weight (B,)); the loss is their product.

    x0, eps: (B, C, h, w); t: (B,) int; `eps_in`: the noise put into x_t when it differs from the target's `eps`
    (input perturbation). The target is eps, or v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0. The weight is
    min-SNR's under `cfg.min_snr_gamma`, else ones. The error is computed in float32 at least (float64 stays float64).
    `mask` (B, 1, h, w) in [0, 1] weights each latent pixel: mse = sum(err * mask) / (sum(mask) * C) per sample (0 for
    an all-zero mask); None is the plain mean.
    """
    cond = text if isinstance(text, Conditioning) else Conditioning(text)
    x_t = scheduler.add_noise(x0, eps if eps_in is None else eps_in, t)  # sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps
    target = eps if cfg.prediction_type == "epsilon" else scheduler.get_velocity(x0, eps, t)
    dtype = next(unet.parameters()).dtype  # bf16/fp16 in a DeepSpeed engine; fp32 elsewhere (autocast casts)
    pred = unet(x_t.to(dtype), t, **cond.to(dtype).unet_kwargs()).sample  # (B, C, h, w)
    wide = torch.promote_types(pred.dtype, torch.float32)
    err = F.mse_loss(pred.to(wide), target.to(wide), reduction="none")  # (B, C, h, w)
    if mask is None:
        mse = err.mean(dim=(1, 2, 3))  # (B,)
    else:
        mask = mask.to(err.device, wide)  # (B, 1, h, w)
        total = mask.sum(dim=(1, 2, 3)) * err.shape[1]  # (B,) weighted pixels, over all channels
        mse = (err * mask).sum(dim=(1, 2, 3)) / total.clamp(min=torch.finfo(wide).tiny)  # 0 where the mask is all 0
    if cfg.min_snr_gamma > 0:
        return mse, min_snr_weights(scheduler, t, cfg.min_snr_gamma, cfg.prediction_type)
    return mse, torch.ones_like(mse)


def min_snr_weights(
    scheduler: DDPMScheduler, t: torch.Tensor, gamma: float, prediction_type: str
) -> torch.Tensor:
    """min(SNR, gamma) / SNR for eps targets, min(SNR, gamma) / (SNR + 1) for v targets.

    Both weight the implied x0 error the same way (Hang et al. 2023).
    """
    snr = compute_snr(scheduler, t)  # (B,) alpha_bar / (1 - alpha_bar)
    clipped = snr.clamp(max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr
