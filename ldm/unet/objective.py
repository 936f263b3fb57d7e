"""The denoising objective: noise a clean latent, score the U-Net's prediction.

Names follow the papers: x0 (clean latent), eps (noise), alpha_bar (cumulative product of 1 - beta), v (velocity,
Salimans & Ho 2022: v = sqrt(alpha_bar) * eps - sqrt(1 - alpha_bar) * x0). Its parts: where samples are put in the
noise process (ldm/unet/timesteps.py), the loss per element, its reduction and weights (ldm/unet/losses.py), noise
assignment (ldm/unet/immiscible.py) and flow matching (ldm/unet/flow.py). docs/training.md says what each is for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.training_utils import compute_snr

from ldm.config import check
from ldm.text.conditioning import Conditioning
from ldm.unet.flow import build_flow_scheduler, flow_noise, flow_snr
from ldm.unet.immiscible import assign_noise
from ldm.unet.losses import (
    LossConfig, elementwise_loss, huber_threshold, min_snr_weights, reduce_per_sample, timestep_weights,
)
from ldm.unet.timesteps import sample_timesteps

Text = torch.Tensor | Conditioning  # (B, 77, D) text states (SD), or SDXL's context, pooled embedding and time ids
PLAIN = LossConfig()  # the plain mean squared error


@dataclass
class NoiseConfig:
    # SD 1.x's schedule. `clip_sample` stays off: diffusers' DDPMScheduler defaults to clipping predicted x0 to
    # [-1, 1], which is right for pixels and ruins latents (whose range is several units).
    beta_schedule: Literal["scaled_linear", "linear", "squaredcos_cap_v2"] = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    # eps, v, or "flow": rectified flow with a velocity target (ldm/unet/flow.py; no betas)
    prediction_type: Literal["epsilon", "v_prediction", "flow"] = "epsilon"
    min_snr_gamma: float = 0.0  # 0 = off; 5 is the paper's value (Hang et al. 2023, https://arxiv.org/abs/2303.09556)
    offset_noise: float = 0.0  # per-channel constant added to eps (e.g. 0.05-0.1): lets images get very dark/bright
    input_perturbation: float = 0.0  # noise added to eps for the input only (Ning et al. 2023; e.g. 0.1)
    # where training samples fall in the noise process (ldm/unet/timesteps.py): uniform, or SD3's densities
    timestep_sampling: Literal["uniform", "logit_normal", "mode", "cosmap"] = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    # Lin et al. 2023 (https://arxiv.org/abs/2305.08891): betas rescaled so alpha_bar_T = 0 (the last timestep is
    # pure noise, as sampling starts); needs v-prediction, and ships trailing timestep spacing
    zero_terminal_snr: bool = False
    immiscible: bool = False  # assign the batch's noise to its latents by a linear assignment (ldm/unet/immiscible.py)

    def validate(self) -> None:
        check(0 < self.beta_start < self.beta_end < 1, "noise.beta_start", "need 0 < beta_start < beta_end < 1")
        check(self.num_train_timesteps >= 2, "noise.num_train_timesteps", "must be >= 2")
        for key in ("min_snr_gamma", "offset_noise", "input_perturbation"):
            check(getattr(self, key) >= 0, f"noise.{key}", f"must be >= 0, got {getattr(self, key)}")
        check(self.logit_std > 0, "noise.logit_std", f"must be > 0, got {self.logit_std}")
        check(-1 <= self.mode_scale <= 2 / (math.pi - 2), "noise.mode_scale",
              f"must be in [-1, 2 / (pi - 2)] for a density on [0, 1], got {self.mode_scale}")
        check(not self.zero_terminal_snr or self.prediction_type == "v_prediction", "noise.zero_terminal_snr",
              "needs noise.prediction_type=v_prediction (an eps prediction at pure noise says nothing about the image)")
        if self.prediction_type == "flow":
            check(self.min_snr_gamma == 0, "noise.min_snr_gamma", "is a DDPM weighting: set it to 0 with "
                  "noise.prediction_type=flow")
            check(not self.zero_terminal_snr, "noise.zero_terminal_snr", "rescales DDPM betas; flow matching has "
                  "none (its last timestep is pure noise already): drop it with noise.prediction_type=flow")


def check_objective(noise: NoiseConfig, loss: LossConfig) -> None:
    """Refuse the combinations of `noise.` and `loss.` keys that make no sense (one line each)."""
    check(loss.weighting == "none" or noise.min_snr_gamma == 0, "loss.weighting",
          f"'{loss.weighting}' and noise.min_snr_gamma are two weightings: set noise.min_snr_gamma=0 or "
          "loss.weighting=none")
    check(loss.weighting == "none" or noise.prediction_type != "flow", "loss.weighting",
          f"'{loss.weighting}' is defined for DDPM eps/v targets: use loss.weighting=none with flow matching")


def build_noise_scheduler(cfg: NoiseConfig) -> SchedulerMixin:
    """The training scheduler, configured as for latent diffusion; its config is what the exported model ships
    (flow matching: diffusers' `FlowMatchEulerDiscreteScheduler`)."""
    if cfg.prediction_type == "flow":
        return build_flow_scheduler(cfg.num_train_timesteps)
    extra = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"} if cfg.zero_terminal_snr else {}
    scheduler = DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        clip_sample=False,
        steps_offset=1,
        thresholding=False,
        **extra,
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
    scheduler: SchedulerMixin,
    x0: torch.Tensor,
    text: Text,
    cfg: NoiseConfig,
    loss: LossConfig = PLAIN,
    *,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The batch's mean training loss: the U-Net's eps, v or flow-velocity prediction scored at drawn timesteps.

    x0: (B, C, h, w) scaled latents; text: (B, 77, D) text embeddings, or a `Conditioning` (SDXL: with the pooled
    embedding (B, P) and time ids (B, 6)); mask: (B, 1, h, w) float weights at latent resolution, or None
    (`losses.reduce_per_sample`: each sample's loss is its masked mean; an all-zero mask gives 0). Random numbers
    come from the global RNG, which checkpoints save and restore, so a resumed run draws the same noise; in this
    order: eps (B, C, h, w), [offset (B, C, 1, 1)], timesteps (B,), [input perturbation (B, C, h, w)].
    """
    b = x0.shape[0]
    eps = torch.randn_like(x0)
    if cfg.offset_noise > 0:
        eps = eps + cfg.offset_noise * torch.randn(b, x0.shape[1], 1, 1, device=x0.device, dtype=x0.dtype)
    if cfg.immiscible:
        eps = assign_noise(x0, eps)
    t = sample_timesteps(b, x0.device, cfg)
    eps_in = eps + cfg.input_perturbation * torch.randn_like(eps) if cfg.input_perturbation > 0 else eps
    err, weight = denoising_error(unet, scheduler, x0, eps, t, text, cfg, eps_in=eps_in, loss=loss, mask=mask)
    return (err * weight).mean()


def predict(
    unet: torch.nn.Module,
    scheduler: SchedulerMixin,
    x0: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    text: Text,
    cfg: NoiseConfig,
    eps_in: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction, target), both (B, C, h, w), in float32 at least (float64 stays float64).

    x0, eps: (B, C, h, w); t: (B,) U-Net timesteps (DDPM: int in [0, T); flow: sigma * T, float); `eps_in`: the
    noise put into x_t when it differs from the target's `eps` (input perturbation). The target is eps, v =
    sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0, or the flow velocity eps - x0.
    """
    cond = text if isinstance(text, Conditioning) else Conditioning(text)
    noise_in = eps if eps_in is None else eps_in
    if cfg.prediction_type == "flow":
        x_t, target = flow_noise(x0, noise_in, t, cfg.num_train_timesteps), eps - x0
    else:
        x_t = scheduler.add_noise(x0, noise_in, t)  # sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps
        target = eps if cfg.prediction_type == "epsilon" else scheduler.get_velocity(x0, eps, t)
    dtype = next(unet.parameters()).dtype  # bf16/fp16 in a DeepSpeed engine; fp32 elsewhere (autocast casts)
    pred = unet(x_t.to(dtype), t, **cond.to(dtype).unet_kwargs()).sample  # (B, C, h, w)
    wide = torch.promote_types(pred.dtype, torch.float32)
    return pred.to(wide), target.to(wide)


def score(
    pred: torch.Tensor,
    target: torch.Tensor,
    t: torch.Tensor,
    scheduler: SchedulerMixin,
    cfg: NoiseConfig,
    loss: LossConfig = PLAIN,
    *,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss per sample (B,), weight (B,)) of a prediction against its target (B, C, h, w) at timesteps t (B,)."""
    snr = None
    if cfg.min_snr_gamma > 0 or loss.weighting != "none" or loss.huber_schedule == "snr":
        snr = flow_snr(t, cfg.num_train_timesteps) if cfg.prediction_type == "flow" else compute_snr(scheduler, t)
        snr = snr.to(pred.device, pred.dtype)
    c = None
    if loss.type != "l2":
        c = huber_threshold(loss, t, snr if snr is not None else torch.ones(t.shape, dtype=pred.dtype,
                                                                              device=pred.device),
                            cfg.num_train_timesteps)
    err = reduce_per_sample(elementwise_loss(pred, target, loss.type, c), mask)  # (B,)
    if cfg.min_snr_gamma > 0:
        return err, min_snr_weights(snr, cfg.min_snr_gamma, cfg.prediction_type)
    if loss.weighting != "none":
        return err, timestep_weights(loss, snr, cfg.prediction_type)
    return err, torch.ones_like(err)


def denoising_error(
    unet: torch.nn.Module,
    scheduler: SchedulerMixin,
    x0: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    text: Text,
    cfg: NoiseConfig,
    eps_in: torch.Tensor | None = None,
    *,
    loss: LossConfig = PLAIN,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The U-Net's error at given noise and timesteps: (loss per sample (B,), loss weight (B,)); the loss is their
    product. x0, eps: (B, C, h, w); t: (B,) (see `predict`). The error is `loss.type`'s (squared by default) per
    element, reduced per sample by `reduce_per_sample` (`mask`: (B, 1, h, w) weights, or None for the mean); the
    weight is min-SNR's under `cfg.min_snr_gamma`, `loss.weighting`'s, or ones.
    """
    pred, target = predict(unet, scheduler, x0, eps, t, text, cfg, eps_in)
    return score(pred, target, t, scheduler, cfg, loss, mask=mask)
