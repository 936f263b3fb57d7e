"""Aspect-ratio buckets: a table of sizes of about `resolution`² pixels, each image's bucket, one-bucket batches.

Square crops cut the heads and feet off portraits and teach the model to do so. With `data.buckets: true` each
image instead goes to the bucket (W, H) nearest its aspect ratio, is resized to *cover* the bucket (keeping its
aspect ratio, never stretched: diffusers #14158) and cropped to it, and every batch holds one bucket's images.

- `bucket_sizes`: the table. Sides are multiples of `data.bucket_step` (itself a multiple of the VAE factor), between
  `min_side` and `max_side`, the aspect ratio at most `max_aspect`, and the area as close to `resolution`² as the
  step allows (`data.bucket_area: nearest`, the default below 1024 px) or the largest up to `resolution`²
  (`at_most`, SDXL's rule and the default from 1024 px: about 1 megapixel in 64 px steps).
- `nearest_bucket`: the bucket whose log aspect ratio is nearest the image's (ties: the first in the table).
- `BucketTransform`: decoded image -> (3, H, W) in [-1, 1], at the image's bucket (and its `CropGeometry`).
- `BucketBatchSampler`: batches as a pure function of (seed, epoch, position in the epoch) and the process rank,
  like `ldm.data.batch_order.ResumableBatchSampler`, so a resumed run sees exactly the batches it would have seen.

The latent cache (`ldm.latents`) stores each image's bucket with its latents, keyed by the image's index, never by
step: a cache indexed by step falls out of sync as soon as the buckets are reshuffled (diffusers #13353, #13712).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Iterator

import PIL.Image
import torch

from ldm.data.batch_order import check_sampler_arguments
from ldm.data.crops import CropGeometry
from ldm.data.transforms import place
from ldm.errors import UserError
from ldm.image_io import to_rgb

Size = tuple[int, int]  # (width, height) in pixels, as PIL writes sizes


# From this resolution up, `data.bucket_area: auto` makes SDXL's table: no bucket holds more pixels than resolution²
# (SDXL's own buckets, 1024² at most, are what its U-Net saw; a batch size tuned on 1024 x 1024 then fits every
# bucket). Below it, "nearest", the table SD 1.x/2.x runs have always used.
AT_MOST_FROM_RESOLUTION = 1024


def bucket_settings(data_cfg: Any) -> dict[str, Any] | None:
    """What a bucket table depends on (for cache keys), or None without buckets."""
    if not data_cfg.buckets:
        return None
    settings = {"step": data_cfg.bucket_step, "min_side": effective_min_side(data_cfg),
                "max_side": effective_max_side(data_cfg), "max_aspect": float(data_cfg.max_aspect)}
    if effective_bucket_area(data_cfg) == "at_most":  # only then: "nearest" settings read (and key) as before
        settings["area"] = "at_most"
    return settings


def effective_bucket_area(data_cfg: Any) -> str:
    if data_cfg.bucket_area != "auto":
        return data_cfg.bucket_area
    return "at_most" if data_cfg.resolution >= AT_MOST_FROM_RESOLUTION else "nearest"


def effective_min_side(data_cfg: Any) -> int:
    return data_cfg.min_side or max(data_cfg.bucket_step, data_cfg.resolution // 2)


def effective_max_side(data_cfg: Any) -> int:
    return data_cfg.max_side or data_cfg.resolution * 2


def bucket_sizes(resolution: int, step: int, min_side: int, max_side: int, max_aspect: float,
                 factor: int = 1, area: str = "nearest") -> list[Size]:
    """The bucket table, sorted by width: for each width >= resolution a multiple of `step`, the height that brings
    the area nearest `resolution`² (`area="nearest"`) or the largest one whose area is at most `resolution`²
    (`area="at_most"`, SDXL's rule), both ways round (portrait buckets mirror landscape ones); sizes outside
    [min_side, max_side] or beyond `max_aspect` are left out.

    Raises a one-line `UserError` naming the setting when the step does not fit the VAE factor or the resolution.
    """
    if step < 1 or step % factor:
        raise UserError(f"config key 'data.bucket_step': {step} is not a multiple of the VAE's downsampling factor "
                        f"{factor}: use a multiple of {factor} (bucket sides must map to whole latent pixels)")
    if resolution % step:
        raise UserError(f"config key 'data.bucket_step': {step} does not divide data.resolution {resolution}: "
                        f"use a step that divides it (e.g. {math.gcd(resolution, step)})")
    if not step <= min_side <= resolution <= max_side:
        raise UserError(f"config keys 'data.min_side'/'data.max_side': need bucket_step ({step}) <= min_side "
                        f"({min_side}) <= resolution ({resolution}) <= max_side ({max_side})")
    pixels = resolution * resolution
    sizes = set()
    for width in range(resolution, max_side + 1, step):  # landscape (and square) sizes, then their transposes
        if area == "at_most":
            height = pixels // width // step * step  # (0 when even one step is too many: below min_side)
        else:
            height = max(step, round(pixels / width / step) * step)
        if min_side <= height <= max_side and width / height <= max_aspect + 1e-9:
            sizes |= {(width, height), (height, width)}
    return sorted(sizes)


def nearest_bucket(size: Size, buckets: Sequence[Size]) -> int:
    """Index of the bucket whose aspect ratio is nearest `size`'s, on a log scale (2:1 and 1:2 are equally far)."""
    width, height = size
    target = math.log(width / height)
    return min(range(len(buckets)), key=lambda b: abs(math.log(buckets[b][0] / buckets[b][1]) - target))


def cover_crop_box(size: Size, bucket: Size, center: bool, rng: random.Random) -> tuple[float, float, float, float]:
    """The source-pixel box that, resized to `bucket`, is "resize to cover, then crop": same aspect as the bucket."""
    width, height = size
    scale = max(bucket[0] / width, bucket[1] / height)  # the smallest scale at which the image covers the bucket
    box_w, box_h = bucket[0] / scale, bucket[1] / scale  # (<= width, <= height)
    if center:
        left, top = (width - box_w) / 2, (height - box_h) / 2
    else:
        left, top = rng.uniform(0, width - box_w), rng.uniform(0, height - box_h)
    return left, top, left + box_w, top + box_h


@dataclass(frozen=True)
class BucketTransform:
    """Like `ImageTransform`, but to the image's nearest bucket: (3, H, W) float32 in [-1, 1]."""

    buckets: tuple[Size, ...]
    resolution: int  # nominal side (for messages and empty batches)
    center_crop: bool = True
    random_flip: bool = False

    def __call__(self, image: PIL.Image.Image, rng: random.Random) -> torch.Tensor:
        return self.apply(image, rng)[0]  # (3, H, W)

    def apply(self, image: PIL.Image.Image, rng: random.Random) -> tuple[torch.Tensor, CropGeometry]:
        """The (3, H, W) pixels of the image's bucket and their crop geometry (`ldm.data.crops`)."""
        pixels, crop, _ = self.apply_with_mask(image, None, rng)
        return pixels, crop

    def apply_with_mask(
        self, image: PIL.Image.Image, mask: PIL.Image.Image | None, rng: random.Random
    ) -> tuple[torch.Tensor, CropGeometry, torch.Tensor | None]:
        """`apply`, and the loss mask through the same resize, crop and flip (`ldm.data.transforms.place`)."""
        image = to_rgb(image)
        original_size = (image.height, image.width)
        bucket = self.buckets[nearest_bucket(image.size, self.buckets)]
        box = cover_crop_box(image.size, bucket, self.center_crop, rng)
        flipped = self.random_flip and rng.random() < 0.5
        # one antialiased resample of just the box, as `ImageTransform` does for squares
        return place(image, mask, CropGeometry(original_size, box, (bucket[1], bucket[0]), flipped))


def format_bucket_table(sizes: Sequence[Size], counts: Sequence[int]) -> str:
    """The table printed at start: one line per bucket, "W x H  count"."""
    lines = [f"{len(sizes)} aspect-ratio buckets (width x height: images)"]
    lines += [f"  {width:>5} x {height:<5} {count:>8}" for (width, height), count in zip(sizes, counts)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields lists of dataset keys (key = epoch * num_items + position) forever; every list is from one bucket.

    Epoch e, identically on every rank: each bucket's positions are shuffled (seed + e) and cut into groups of
    `batch_size * world_size`; a bucket's last, incomplete group sits out this epoch (the next permutation differs).
    The groups are shuffled, and at step s every rank takes its round-robin share of group s: all processes train
    on one bucket at a time, their shares disjoint, their step counts equal (a rank with one batch more would hang
    in the gradient all-reduce). Batches are a function of (seed, epoch, position, rank): resume with `start_batch`.
    """

    def __init__(self, bucket_ids: Sequence[int], batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, start_batch: int = 0) -> None:
        check_sampler_arguments(batch_size, rank, world_size, start_batch)
        super().__init__()
        self.bucket_ids = list(bucket_ids)
        self.num_items = len(self.bucket_ids)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.shuffle, self.start_batch = shuffle, start_batch
        self.step_items = batch_size * world_size
        self.members: dict[int, list[int]] = {}  # bucket -> positions, in position order
        for position, bucket in enumerate(self.bucket_ids):
            self.members.setdefault(bucket, []).append(position)
        self.batches_per_epoch = sum(len(m) // self.step_items for m in self.members.values())
        if self.batches_per_epoch == 0:
            largest = max((len(m) for m in self.members.values()), default=0)
            raise UserError(
                f"no aspect-ratio bucket holds one step's {self.step_items} images ({batch_size} per device x "
                f"{world_size} devices; the largest holds {largest}): lower train.batch_size or use fewer buckets "
                "(a larger data.bucket_step or a smaller data.max_aspect)"
            )

    def epoch_groups(self, epoch: int) -> list[list[int]]:
        """Every step's group of `batch_size * world_size` positions in `epoch` (identical on every rank)."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        groups = []
        for bucket in sorted(self.members):
            members = torch.tensor(self.members[bucket])
            if self.shuffle:
                members = members[torch.randperm(len(members), generator=generator)]
            whole = len(members) // self.step_items * self.step_items
            groups += [members[i : i + self.step_items].tolist() for i in range(0, whole, self.step_items)]
        if self.shuffle:
            groups = [groups[i] for i in torch.randperm(len(groups), generator=generator).tolist()]
        return groups

    def rank_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of `epoch`, as dataset keys."""
        offset = epoch * self.num_items
        return [[p + offset for p in group[self.rank :: self.world_size]] for group in self.epoch_groups(epoch)]

    def __iter__(self) -> Iterator[list[int]]:
        epoch, position = divmod(self.start_batch, self.batches_per_epoch)
        while True:
            yield from self.rank_batches(epoch)[position:]
            epoch, position = epoch + 1, 0


def bucket_counts(bucket_ids: Sequence[int], num_buckets: int) -> list[int]:
    counts = Counter(bucket_ids)
    return [counts.get(b, 0) for b in range(num_buckets)]


def check_unet_takes_buckets(sizes: Sequence[Size], vae_factor: int, unet: Any) -> None:
    """Refuse buckets whose latents the U-Net cannot halve at each of its down blocks, in one line."""
    down = 2 ** (len(unet.config.block_out_channels) - 1)  # diffusers halves at every down block but the last
    bad = [(w, h) for w, h in sizes if (w // vae_factor) % down or (h // vae_factor) % down]
    if bad:
        w, h = bad[0]
        raise UserError(
            f"config key 'data.bucket_step': bucket {w}x{h} gives {w // vae_factor}x{h // vae_factor} latents, which "
            f"the U-Net (downsampling {down}x) cannot take: use a bucket_step that is a multiple of "
            f"{vae_factor * down}"
        )
