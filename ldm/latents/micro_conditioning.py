"""SDXL's micro-conditioning in the latent cache: where each cached crop came from, and the U-Net's time ids.

SDXL's U-Net takes, per image, `add_time_ids` = (original_h, original_w, crop_top, crop_left, target_h, target_w)
(Podell et al. 2023, section 2.2; diffusers passes them as `added_cond_kwargs["time_ids"]`). The cache records the
first four for every row, beside its latents (`ldm.latents.cache` has the whole shard layout):

    original_size       (R, 2) int64  (h, w) of the image as decoded (EXIF rotation applied), before any resize
    crop_top_left       (R, 2) int64  (top, left) of the encoded crop in the resized image's pixels
    flip_crop_top_left  (R, 2) int64  the same for the flipped copy (flip_mean, flip_std): the mirrored offset,
                                      resized width - left - target width (only in caches built with flips)

The target size is not stored: it is the row's latent size times the VAE factor, i.e. its bucket's (H, W) or
(data.resolution, data.resolution). How the offsets are computed, and why a flip mirrors them: `ldm.data.crops`.

`LatentCache.row` gives each item "original_size", "crop_top_left" (of the copy it returns, flipped or not) and
"target_size" as (int, int) pairs; `collate_latents` stacks them to (B, 2) int64. The SDXL trainer calls
`batch_time_ids(batch)` (or `time_ids(item)` for one item).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ldm.data.crops import CropGeometry

ORIGINAL_SIZE_KEY = "original_size"
CROP_KEY = "crop_top_left"
FLIP_CROP_KEY = "flip_crop_top_left"


def crop_tensors(crops: Sequence[CropGeometry], flips: bool) -> dict[str, torch.Tensor]:
    """The shard tensors for rows encoded from `crops` (unflipped, as encoded), plus their flipped copies' offsets."""

    def pairs(values: list[tuple[int, int]]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).reshape(len(values), 2)  # (R, 2), also for R = 0

    tensors = {
        ORIGINAL_SIZE_KEY: pairs([crop.original_size for crop in crops]),
        CROP_KEY: pairs([crop.crop_top_left for crop in crops]),
    }
    if flips:
        tensors[FLIP_CROP_KEY] = pairs([crop.mirrored().crop_top_left for crop in crops])
    return tensors


def row_fields(tensors: Mapping[str, torch.Tensor], position: int, flipped: bool) -> dict[str, tuple[int, int]]:
    """One row's "original_size" and "crop_top_left" (of the flipped copy when `flipped`) as (int, int)."""
    height, width = tensors[ORIGINAL_SIZE_KEY][position].tolist()
    top, left = tensors[FLIP_CROP_KEY if flipped else CROP_KEY][position].tolist()
    return {"original_size": (height, width), "crop_top_left": (top, left)}


def time_ids(item: Mapping[str, Any]) -> torch.Tensor:
    """(6,) float32: (orig_h, orig_w, crop_top, crop_left, target_h, target_w) of one `LatentDataset` item."""
    return torch.tensor([*item["original_size"], *item["crop_top_left"], *item["target_size"]], dtype=torch.float32)


def batch_time_ids(batch: Mapping[str, Any]) -> torch.Tensor:
    """(B, 6) float32 time ids of a `collate_latents` batch, row b = `time_ids` of its item b."""
    parts = [batch["original_size"], batch["crop_top_left"], batch["target_size"]]  # each (B, 2) int64
    return torch.cat(parts, dim=1).to(torch.float32)  # (B, 6)
