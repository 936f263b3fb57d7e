"""Loss masks: which pixels of a training image the stage-2 loss counts (white = 1 = trained, black = 0 = ignored).

A mask is a grayscale image of the same size as its image, read as the inpainting masks are (`ldm.image_io.open_mask`:
the alpha channel where the file has one that is not opaque everywhere, else the grey levels). Where it comes from
(`data.masks`, local image folders only):

- a `mask` column in metadata.jsonl: the mask file's path, relative to the image's folder (null or "": no mask);
- else `NAME_mask.png` (any image extension) beside `NAME.ext`: such files are masks, not training images.

`auto` (the default) uses masks when the dataset has any, `require` requires them (refusing a dataset without any, and
hub datasets or tar shards, which hold none we read), `ignore` ignores them (`_mask` files are then ordinary images, as
before masks existed). In a masked dataset an image without a mask weighs 1 everywhere (the whole image trains).

The mask goes through its image's own resize, crop and flip, in the same call (`ldm.data.transforms`), and is then
averaged over each VAE factor x factor block (`latent_mask`, an area average: a latent pixel's weight is the share of
its pixels that train). The latent cache stores it beside the posterior and keys the cache on the masks
(`masks_fingerprint`), and the loss weights each latent pixel by it (`ldm.unet.objective.denoising_error`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ldm.errors import UserError

MASK_COLUMN = "mask"  # metadata.jsonl's column of mask paths
MASK_SUFFIX = "_mask"  # NAME_mask.png beside NAME.ext


def find_masks(
    records: Any, image_column: str, source: str, mode: str, files: Sequence[str | os.PathLike]
) -> tuple[Any, list[str | None] | None]:
    """(records, each record's mask path or None) of a local image folder, or (records, None) without masks.

    `records`: the `datasets` records with the image column cast to `Image(decode=False)`; `files`: the folder's image
    files (`NAME_mask.ext` ones among them). Records that are some image's `_mask` file are taken out (they are masks).
    """
    if mode == "ignore":
        return records, None
    image_paths = [_absolute(image.get("path")) if isinstance(image, dict) else None for image in records[image_column]]
    if MASK_COLUMN in records.column_names:  # metadata.jsonl names each image's mask
        masks = [_relative_to_image(value, path) for value, path in zip(records[MASK_COLUMN], image_paths)]
    else:
        records, masks = _sibling_masks(records, image_paths, [os.path.abspath(f) for f in files])
    if not any(masks):
        if mode == "require":
            raise UserError(f"data.masks=require, but '{source}' has no masks: add a \"{MASK_COLUMN}\" column to its "
                            f"metadata.jsonl or NAME{MASK_SUFFIX}.png files beside the images, or set data.masks=auto")
        return records, None
    return records, masks


def refuse_masks_for(source: str, what: str, mode: str) -> None:
    """`data.masks=require` with a source we read no masks from (hub datasets, tar shards): one line."""
    if mode == "require":
        raise UserError(f"data.masks=require, but masks are read from local image folders only and '{source}' is "
                        f"{what}: set data.masks=auto (no masks) or use a local folder with masks beside the images")


def _relative_to_image(value: Any, image_path: str | None) -> str | None:
    if value is None or value == "":
        return None
    if image_path is None:
        return str(value)
    return os.path.normpath(os.path.join(os.path.dirname(image_path), str(value)))


def _absolute(path: str | None) -> str | None:
    return os.path.abspath(path) if path and "://" not in path else path


def _sibling_masks(records: Any, image_paths: Sequence[str | None], files: Sequence[str]) -> tuple[Any, list]:
    """Each record's `NAME_mask.ext` file beside its `NAME.ext` (any image extension), and the records without the
    mask files themselves (present when no metadata.jsonl lists the images)."""
    stems = {os.path.splitext(f)[0] for f in files}
    masks_by_stem = {}  # "dir/NAME" -> "dir/NAME_mask.ext" (one per image: the first by name)
    for file in sorted(files):
        stem = os.path.splitext(file)[0]
        if stem.endswith(MASK_SUFFIX) and stem[: -len(MASK_SUFFIX)] in stems:
            masks_by_stem.setdefault(stem[: -len(MASK_SUFFIX)], file)
    if not masks_by_stem:
        return records, [None] * len(image_paths)
    is_mask = set(masks_by_stem.values())
    keep = [i for i, path in enumerate(image_paths) if path not in is_mask]
    if len(keep) < len(image_paths):
        records = records.select(keep)
    return records, [masks_by_stem.get(os.path.splitext(image_paths[i])[0]) if image_paths[i] else None for i in keep]


def masks_fingerprint(masks: Sequence[str | None], root: str | None) -> str:
    """Hash of every record's mask: its path (relative to `root`), size and mtime, or "-" for none (the cache key)."""
    digest = hashlib.sha256()
    for path in masks:
        if path is None:
            digest.update(b"-\n")
            continue
        name = os.path.relpath(path, root) if root else path
        try:
            stat = os.stat(path)
            digest.update(f"{name}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        except OSError:  # reported when the image is encoded (skipped, with the reason)
            digest.update(f"{name}\tmissing\n".encode())
    return digest.hexdigest()[:32]


def latent_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, 1, H, W) pixel weights in [0, 1] -> (B, 1, H/f, W/f): the area average of each f x f block (f = the VAE's
    downsampling factor), the share of a latent pixel's pixels that train."""
    return F.avg_pool2d(mask, kernel_size=factor, stride=factor)
