"""Encoding one latent-cache shard: a list of dataset indices -> a `Shard` of posterior means and stds (and their
flips, buckets and crop geometry), batched through the VAE (`ldm.latents.build` decides which shards to encode).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Subset

from ldm.data.config import DataConfig
from ldm.data.crops import CropGeometry
from ldm.data.dataset import ImageCaptionDataset, collate_images
from ldm.data.masks import latent_mask
from ldm.errors import UserError
from ldm.latents.cache import BUCKET_KEY, DTYPES, MASK_KEY
from ldm.latents.cache_key import CacheSpec
from ldm.latents.config import LatentCacheConfig
from ldm.latents.micro_conditioning import crop_tensors
from ldm.latents.shard_file import Shard
from ldm.progress import ProgressCounter
from ldm.vae.load_vae import vae_factor

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers import AutoencoderKL


def encode_shard(
    vae: AutoencoderKL,
    dataset: ImageCaptionDataset,
    indices: Sequence[int],
    spec: CacheSpec,
    cache_cfg: LatentCacheConfig,
    data_cfg: DataConfig,
    accelerator: Accelerator,
    progress: ProgressCounter,
) -> Shard:
    """Encode the images at dataset `indices` (undecodable ones listed as skipped) into one shard's rows: posterior
    mean and std (C, h, w) [and the flipped image's], crop geometry, bucket ids and loss masks (1, h, w) as `spec`
    asks."""
    # Subset(dataset, indices)[i] is dataset[indices[i]]: key = index, i.e. epoch 0 (only the caption pick of
    # multi-caption records depends on the key; the transform is deterministic).
    loader = DataLoader(
        Subset(dataset, list(indices)), batch_size=cache_cfg.batch_size, num_workers=data_cfg.num_workers,
        collate_fn=_collate_with_skips if spec.buckets is None else _collate_by_size,
    )
    parts: dict[str, list[torch.Tensor]] = {
        "mean": [], "std": [], "flip_mean": [], "flip_std": [], "index": [], BUCKET_KEY: [], MASK_KEY: []
    }
    captions: list[str] = []
    crops: list[CropGeometry] = []  # where each row's (unflipped) pixels came from
    skipped: list[dict[str, Any]] = []
    store = _flattener(spec)  # (B, C, h, w) -> what a shard row holds
    store_mask = _flattener(spec, channels=1)  # (B, 1, h, w) -> the same for loss masks
    factor = vae_factor(spec.vae.config)
    for batch in (group for groups in loader for group in (groups if spec.buckets else [groups])):
        skipped.extend(batch["skipped_items"])
        x = batch["pixel_values"]  # (B, 3, R, R) in [-1, 1]
        if x.shape[0] > 0:
            if spec.random_flip:
                x = torch.cat([x, x.flip(-1)])  # (2B, 3, R, R): the flipped images ride in the same forward pass
            mean, std = _encode(vae, x, accelerator, batch["indices"])  # (B or 2B, C, h, w) float32
            n = len(batch["indices"])
            mean, std = store(mean), store(std)
            parts["mean"].append(mean[:n])
            parts["std"].append(std[:n])
            if spec.random_flip:
                parts["flip_mean"].append(mean[n:])
                parts["flip_std"].append(std[n:])
            parts["index"].append(batch["indices"])
            if spec.buckets is not None:
                bucket = spec.buckets["sizes"].index([x.shape[-1], x.shape[-2]])  # [W, H]
                parts[BUCKET_KEY].append(torch.full((n,), bucket, dtype=torch.long))
            if spec.masks is not None:  # (B, 1, R, R) pixel weights -> their area average per latent pixel
                parts[MASK_KEY].append(store_mask(latent_mask(batch["masks"], factor)))
            captions.extend(batch["captions"])
            crops.extend(batch["crops"])
        progress.update(len(batch["indices"]) + len(batch["skipped_items"]))

    dtype = DTYPES[spec.dtype]
    names = ["mean", "std"] + (["flip_mean", "flip_std"] if spec.random_flip else [])
    names += [MASK_KEY] if spec.masks is not None else []  # the unflipped image's; a flip mirrors it exactly
    if not parts["index"]:  # every image of the shard was undecodable: zero-row tensors of the right shape
        latent = torch.zeros(1, *_latent_shape(vae, spec.resolution, accelerator))
        shape = store(latent).shape[1:]
        tensors = {name: torch.zeros((0, *shape), dtype=dtype) for name in names}
        if spec.masks is not None:
            tensors[MASK_KEY] = torch.zeros((0, *store_mask(latent[:, :1]).shape[1:]), dtype=dtype)
        tensors["index"] = torch.zeros(0, dtype=torch.long)
    else:
        tensors = {name: torch.cat(parts[name]).to(dtype) for name in names}
        tensors["index"] = torch.cat(parts["index"]).to(torch.long)
    if spec.buckets is not None:
        tensors[BUCKET_KEY] = torch.cat(parts[BUCKET_KEY]) if parts[BUCKET_KEY] else torch.zeros(0, dtype=torch.long)
    tensors.update(crop_tensors(crops, flips=spec.random_flip))
    return Shard(tensors, captions, skipped, spec.build_id())


def _flattener(spec: CacheSpec, channels: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Identity for square caches; with buckets (B, C, h, w) -> (B, L), flattened and zero-padded to the largest
    bucket's latent size (`ldm.latents.cache` describes the layout); `channels`: C (default: the latents')."""
    if spec.buckets is None:
        return lambda latents: latents
    factor = vae_factor(spec.vae.config)
    channels = int(spec.vae.config.get("latent_channels", 4)) if channels is None else channels
    length = channels * max(w * h for w, h in spec.buckets["sizes"]) // factor**2

    def flatten(latents: torch.Tensor) -> torch.Tensor:
        flat = latents.flatten(1)  # (B, C*h*w)
        return torch.nn.functional.pad(flat, (0, length - flat.shape[1]))  # (B, L)

    return flatten


def _collate_by_size(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Bucketed encoding: one `_collate_with_skips` batch per image size (undecodable images in a batch of their
    own), so each VAE forward pass sees one size."""
    good = [item for item in items if "skipped" not in item]
    sizes = sorted({tuple(item["pixel_values"].shape) for item in good})
    groups = [_collate_with_skips([item for item in good if tuple(item["pixel_values"].shape) == s]) for s in sizes]
    bad = [item for item in items if "skipped" in item]
    return groups + ([_collate_with_skips(bad)] if bad else [])


def _collate_with_skips(items: list[dict[str, Any]]) -> dict[str, Any]:
    """`collate_images`, plus the index, name and reason of each undecodable image (for the manifest)."""
    batch = collate_images(items)
    batch["skipped_items"] = [
        {"index": item["index"], "name": item["skipped"], "reason": item["reason"]}
        for item in items
        if "skipped" in item
    ]
    return batch


@torch.no_grad()
def _encode(
    vae: AutoencoderKL, x: torch.Tensor, accelerator: Accelerator, indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std, (B, C, h, w) float32 on the CPU."""
    with accelerator.autocast():
        posterior = vae.encode(x.to(accelerator.device)).latent_dist
    mean, std = posterior.mean.float().cpu(), posterior.std.float().cpu()
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
        raise UserError(
            f"the VAE produced non-finite latents for a batch with dataset indices {indices.tolist()[:8]}: "
            "encode with mixed_precision=no (fp16 overflows in some VAEs) or check the VAE"
        )
    return mean, std


@torch.no_grad()
def _latent_shape(vae: AutoencoderKL, resolution: int, accelerator: Accelerator) -> tuple[int, int, int]:
    probe = torch.zeros(1, 3, resolution, resolution, device=accelerator.device)
    return tuple(vae.encode(probe).latent_dist.mean.shape[1:])
