"""The per-element training loss, its one reduction to a loss per sample, and the per-timestep loss weights.

Every objective computes its error per latent element first, (B, C, h, w), and reduces it in `reduce_per_sample`,
the one place a mask (masked training) weighs the elements. Keys under `loss.` (`LossConfig`); the defaults are the
plain mean squared error with no weighting beyond `noise.min_snr_gamma`.

    l2            d^2                                   (d = prediction - target, per element)
    huber         d^2 if |d| <= c else 2 c |d| - c^2    (2 x torch's Huber loss with delta c: l2 near 0)
    pseudo_huber  2 c (sqrt(d^2 + c^2) - c)             (kohya's "huber" loss_type; also ~ d^2 near 0)

c is `loss.huber_c`, or per sample under `loss.huber_schedule` (kohya's, sd-scripts train_util.py
`get_huber_threshold_if_needed`; https://github.com/kohya-ss/sd-scripts/pull/1228):
constant c; exponential c^(t / T) (1 at t = 0, c at t = T); snr (1 - c) / (1 + sigma_t)^2 + c with
sigma_t = 1 / sqrt(SNR_t) (~1 for clean inputs, c for pure noise). A small c is robust to the large errors of
outlying samples at low noise.

Weights per sample (`loss.weighting`; min-SNR stays `noise.min_snr_gamma`), SNR_t = alpha_bar / (1 - alpha_bar)
(flow matching: ((1 - sigma) / sigma)^2):
    debiased  1 / sqrt(min(SNR, 1000)) for eps, 1 / (min(SNR, 1000) + 1) for v  (Yu et al. 2024, kohya's
              `apply_debiased_estimation`)
    p2        1 / (k + SNR)^gamma on the eps error (Choi et al. 2022, https://arxiv.org/abs/2204.00227); a v target's
              error is SNR / (SNR + 1) times larger than the eps error it implies, so v multiplies that in
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ldm.config import check


@dataclass
class LossConfig:
    type: Literal["l2", "huber", "pseudo_huber"] = "l2"
    huber_c: float = 0.1  # the Huber threshold c (kohya's default 0.1), or its end value under a schedule
    huber_schedule: Literal["constant", "exponential", "snr"] = "constant"
    weighting: Literal["none", "debiased", "p2"] = "none"  # min-SNR is noise.min_snr_gamma
    p2_k: float = 1.0
    p2_gamma: float = 1.0

    def validate(self) -> None:
        check(0 < self.huber_c <= 1, "loss.huber_c", f"must be in (0, 1], got {self.huber_c}")
        check(self.p2_k > 0, "loss.p2_k", f"must be > 0, got {self.p2_k}")
        check(self.p2_gamma >= 0, "loss.p2_gamma", f"must be >= 0, got {self.p2_gamma}")


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, kind: str, c: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """(B, C, h, w) loss per element; `c`: (B,) Huber thresholds (huber, pseudo_huber only)."""
    if kind == "l2":
        return torch.nn.functional.mse_loss(pred, target, reduction="none")
    c = c.to(pred.dtype).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    d = pred - target
    if kind == "huber":
        return torch.where(d.abs() <= c, d * d, 2 * c * d.abs() - c * c)
    if kind == "pseudo_huber":
        return 2 * c * (torch.sqrt(d * d + c * c) - c)
    raise ValueError(f"unknown loss type '{kind}'")


def huber_threshold(cfg: LossConfig, t: torch.Tensor, snr: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """(B,) c per sample at U-Net timesteps t (B,) with signal-to-noise ratios `snr` (B,)."""
    c = torch.full(t.shape, cfg.huber_c, dtype=snr.dtype, device=t.device)
    if cfg.huber_schedule == "exponential":
        return c ** (t.to(snr.dtype) / num_train_timesteps)
    if cfg.huber_schedule == "snr":
        sigma = snr.rsqrt()  # inf at SNR 0 (pure noise) -> c
        return (1 - cfg.huber_c) / (1 + sigma) ** 2 + cfg.huber_c
    return c


def reduce_per_sample(err: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C, h, w) per-element loss -> (B,) loss per sample.

    mask None: the mean over C, h, w (the unmasked loss, bit for bit). mask (B, 1, h, w): float weights at latent
    resolution (1 = counts, 0 = ignored), broadcast over channels: sum(err * mask) / (sum(mask) * C), so a mask of
    ones equals the plain mean; a sample whose mask is all zero gets loss 0 (and no gradient), not a 0 / 0.
    """
    if mask is None:
        return err.mean(dim=(1, 2, 3))
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[0] != err.shape[0] or mask.shape[2:] != err.shape[2:]:
        raise ValueError(f"the loss mask must be (B, 1, h, w) = ({err.shape[0]}, 1, {err.shape[2]}, {err.shape[3]}), "
                         f"got {tuple(mask.shape)}")
    mask = mask.to(err.dtype)
    total = (err * mask).sum(dim=(1, 2, 3))  # (B,)
    weight = mask.sum(dim=(1, 2, 3)) * err.shape[1]  # (B,) masked elements, counted per channel
    return torch.where(weight > 0, total / torch.where(weight > 0, weight, 1.0), torch.zeros_like(total))


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """min(SNR, gamma) / SNR for eps targets, min(SNR, gamma) / (SNR + 1) for v targets.

    Both weight the implied x0 error the same way (Hang et al. 2023, https://arxiv.org/abs/2303.09556).
    """
    clipped = snr.clamp(max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def timestep_weights(cfg: LossConfig, snr: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """(B,) `loss.weighting`'s weights at signal-to-noise ratios `snr` (B,); ones for "none"."""
    if cfg.weighting == "debiased":
        snr = snr.clamp(max=1000)  # SNR is inf at t = 0
        return 1 / (snr + 1) if prediction_type == "v_prediction" else snr.rsqrt()
    if cfg.weighting == "p2":
        weight = (cfg.p2_k + snr) ** -cfg.p2_gamma
        return weight * snr / (snr + 1) if prediction_type == "v_prediction" else weight
    return torch.ones_like(snr)
