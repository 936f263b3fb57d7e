"""`ImageCaptionDataset` (built by `ldm.data.sources.build_image_dataset`), its collate function, the val split.

Augmentation randomness is a pure function of (seed, key), with key = epoch * len(dataset) + index (see
`ldm.data.batch_order.ResumableBatchSampler`), so a run resumed mid-epoch, or run with a different number of loader
workers, sees exactly the same crops and flips.
"""

from __future__ import annotations

import contextlib
import os
import random
from typing import Any, Sequence

import torch

from ldm.data.decoding import SkipImage, decode_image, decode_mask
from ldm.data.shards import ShardRecords, process_indices
from ldm.data.transforms import ImageTransform, MaskSizeError
from ldm.errors import UserError

_REASON_MAX_CHARS = 160


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Images (and captions) indexed by key = epoch * len(self) + index; built by `build_image_dataset`.

    `__getitem__` returns `{"pixel_values", "caption", "index", "crop"}` (crop: where the pixels came from, a
    `ldm.data.crops.CropGeometry`, for SDXL's micro-conditioning), or, for a file that cannot be decoded,
    `{"skipped": name, "reason": why, "index": index, "resolution": R}`; `collate_images` turns both into batches.
    "index" is always the record's index in the *full* dataset, also for a `select`ed subset, so caches keyed by
    index stay valid.
    """

    def __init__(
        self,
        records: Any,  # datasets.Dataset with the image column cast to Image(decode=False)
        *,
        transform: ImageTransform,
        image_column: str,
        caption_column: str | None,
        seed: int,
        max_pixels: int,
        fingerprint: str,
        root: str | None = None,
        rows: Sequence[int] | None = None,
        masks: Sequence[str | None] | None = None,
        masks_fingerprint: str | None = None,
    ) -> None:
        self._records = records
        self.transform = transform
        self.image_column = image_column
        self.caption_column = caption_column
        self.seed = seed
        self.max_pixels = max_pixels
        self._fingerprint = fingerprint
        self._root = root  # local folder, used to report bad files by their relative path
        self._rows = list(rows) if rows is not None else None
        self.masks = masks  # each record's loss-mask file or None (`ldm.data.masks`); None: a dataset without masks
        self._masks_fingerprint = masks_fingerprint

    def __len__(self) -> int:
        return len(self._rows) if self._rows is not None else len(self._records)

    def fingerprint(self) -> str:
        """Stable hash of the source (local files' names, sizes and mtimes, or hub id + split + fingerprint)."""
        return self._fingerprint

    def masks_fingerprint(self) -> str | None:
        """Hash of the loss masks (`ldm.data.masks.masks_fingerprint`), None without masks: part of the cache key."""
        return self._masks_fingerprint

    def select(self, indices: Sequence[int]) -> ImageCaptionDataset:
        """A view over some records (e.g. the train half of `split_train_val`); keys then range over the view."""
        full = self._full_indices()
        rows = [full[i] for i in indices]
        return ImageCaptionDataset(
            self._records,
            transform=self.transform,
            image_column=self.image_column,
            caption_column=self.caption_column,
            seed=self.seed,
            max_pixels=self.max_pixels,
            fingerprint=self._fingerprint,
            root=self._root,
            rows=rows,
            masks=self.masks,
            masks_fingerprint=self._masks_fingerprint,
        )

    def process_indices(self, rank: int, world_size: int) -> list[int] | None:
        """For tar shards, the indices in process `rank`'s own shards (`ldm.data.shards`); None for other sources."""
        if self._rows is not None or not isinstance(self._records, ShardRecords):
            return None
        return process_indices(self._records, rank, world_size)

    def _full_indices(self) -> Sequence[int]:
        return self._rows if self._rows is not None else range(len(self._records))

    def __getitem__(self, key: int) -> dict[str, Any]:
        if key < 0:
            raise IndexError(f"dataset keys are non-negative (epoch * len + index), got {key}")
        size = len(self)
        position = key % size
        index = self._rows[position] if self._rows is not None else position
        # A hash-free integer mix: Python's `hash()` of str is salted per process, ints seed `Random` reproducibly.
        rng = random.Random(self.seed * 1_000_003 + key)
        record = self._records[index]
        image_record = record[self.image_column]
        try:
            if not isinstance(image_record, dict):
                raise SkipImage(f"image column holds {type(image_record).__name__}, not an image")
            image = decode_image(image_record, self.max_pixels)
            mask_path = self.masks[index] if self.masks is not None else None
            mask = decode_mask(mask_path, self.max_pixels) if mask_path is not None else None
            pixel_values, crop, weights = self.transform.apply_with_mask(image, mask, rng)
        except (SkipImage, MaskSizeError) as skip:  # an undecodable image or mask, a mask of another size
            return {
                "skipped": self._display_name(image_record, index),
                "reason": str(skip)[:_REASON_MAX_CHARS],
                "index": index,
                "resolution": self.transform.resolution,
            }
        caption = _pick_caption(record.get(self.caption_column) if self.caption_column else None, rng)
        item = {"pixel_values": pixel_values, "caption": caption, "index": index, "crop": crop}
        if self.masks is not None:  # an image without a mask in a masked dataset weighs 1 everywhere
            item["mask"] = weights if weights is not None else torch.ones(1, *pixel_values.shape[1:])  # (1, H, W)
        return item

    def _display_name(self, image_record: Any, index: int) -> str:
        path = image_record.get("path") if isinstance(image_record, dict) else None
        if not path:
            return f"index {index}"
        if self._root is not None:
            with contextlib.suppress(ValueError):
                return os.path.relpath(path, self._root)
        return os.path.basename(path) or f"index {index}"


def _pick_caption(value: Any, rng: random.Random) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        # Several captions per image (COCO-style): pick one, deterministically from the key's rng.
        options = [str(v) for v in value if v is not None]
        return rng.choice(options) if options else ""
    return str(value)


def collate_images(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch dataset items, dropping skipped ones (so the batch may be smaller than asked, even empty); items with
    loss masks add "masks": (B, 1, H, W) in [0, 1]."""
    good = [item for item in items if "skipped" not in item]
    skipped = [f"{item['skipped']}: {item['reason']}" for item in items if "skipped" in item]
    if good:
        pixel_values = torch.stack([item["pixel_values"] for item in good])
    else:
        resolution = items[0].get("resolution", 0) if items else 0
        pixel_values = torch.empty((0, 3, resolution, resolution), dtype=torch.float32)
    batch = {
        "pixel_values": pixel_values,
        "captions": [item["caption"] for item in good],
        "indices": torch.tensor([item["index"] for item in good], dtype=torch.long),
        "crops": [item["crop"] for item in good],
        "skipped": skipped,
    }
    if good and "mask" in good[0]:
        batch["masks"] = torch.stack([item["mask"] for item in good])
    return batch


def split_train_val(n: int, num_val: int, seed: int) -> tuple[list[int], list[int]]:
    """Deterministically hold out `num_val` of `n` indices; both lists are sorted (sequential reads stay local)."""
    if num_val < 0:
        raise UserError(f"number of validation images must be >= 0, got {num_val}: fix data.num_val")
    if num_val >= n:
        raise UserError(f"dataset has {n} images, cannot hold out {num_val} for validation: lower data.num_val")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[num_val:]), sorted(order[:num_val])
