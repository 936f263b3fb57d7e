"""Classifier-free guidance (Ho & Salimans 2022) and its optional rescale (Lin et al. 2023).

Guidance is this one function so that there is one place to get it right (DiT#41 applied it to 3 of 4 channels by
accident). It acts on whatever the U-Net predicts (eps or v): both are linear in the score, so the same
extrapolation is correct for either.
"""

from __future__ import annotations

import math

import torch


def classifier_free_guidance(pred_uncond: torch.Tensor, pred_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """`eps_u + w * (eps_c - eps_u)` on the full prediction (every channel). w = 0: unconditional, w = 1: conditional.

    The unconditional branch is the negative prompt's prediction when there is one (the empty prompt's otherwise).
    """
    return pred_uncond + scale * (pred_cond - pred_uncond)


def rescale_guidance(guided: torch.Tensor, pred_cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Pull the guided prediction's per-image std back towards the conditional one's (Lin et al. 2023, eq. 15-16).

    Large guidance scales inflate the prediction's std and over-expose images, worst with zero-terminal-SNR schedules;
    phi = 0 returns `guided` unchanged, phi = 1 matches the conditional std exactly. Same as diffusers'
    `guidance_rescale`. Shapes: (B, C, h, w) -> (B, C, h, w); std over all but the batch dimension.
    """
    if phi == 0.0:
        return guided
    dims = list(range(1, guided.ndim))
    std_cond = pred_cond.std(dim=dims, keepdim=True)  # (B, 1, 1, 1)
    std_guided = guided.std(dim=dims, keepdim=True)  # (B, 1, 1, 1)
    rescaled = guided * (std_cond / std_guided)
    return phi * rescaled + (1.0 - phi) * guided


def guidance_scale_embedding(w: float, dim: int) -> torch.Tensor:
    """An LCM-distilled U-Net's guidance input (`timestep_cond`, its config's `time_cond_proj_dim` = `dim`): the
    sinusoidal embedding of 1000 w, as a timestep's (VDM; Luo et al. 2023, LCM). (1, dim) float32.

    Such a U-Net learnt guidance: it is run once per step on the prompt alone, with w = cfg - 1 (diffusers'
    StableDiffusionPipeline and LatentConsistencyModelPipeline use the Imagen cfg convention, hence the - 1).
    """
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))  # (half,)
    angles = torch.tensor([w * 1000.0], dtype=torch.float32)[:, None] * freqs[None]  # (1, half)
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (1, 2 * half)
    return torch.nn.functional.pad(emb, (0, dim % 2))  # an odd dim gets a zero last entry
