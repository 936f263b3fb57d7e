"""The per-element training loss and its one reduction to a loss per sample.

Every objective computes its error per latent element first, (B, C, h, w), and reduces it in `reduce_per_sample`,
the one place a mask (masked training) weighs the elements.
"""

from __future__ import annotations

import torch


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
