"""Image(-caption) datasets read through Hugging Face `datasets`, with our own fault-tolerant decoding.

Design notes:
- Records are loaded with `datasets` (local "imagefolder" layout or a hub dataset id), but the image column is cast
  to `datasets.Image(decode=False)` so each record is `{"bytes": ..., "path": ...}` and *we* decode it. A corrupt,
  truncated or oversized file then becomes a reported skip instead of an exception that kills a DataLoader worker.
- Augmentation randomness is a pure function of (seed, key), with key = epoch * len(dataset) + index (see
  `ldm.data.sampler.ResumableBatchSampler`), so a run resumed mid-epoch, or run with a different number of loader
  workers, sees exactly the same crops and flips.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import random
import re
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

from ldm.errors import UserError

logger = logging.getLogger(__name__)

# Hub dataset ids are "namespace/name"; anything else that does not exist on disk is reported as a missing path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_METADATA_FILENAMES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
_REASON_MAX_CHARS = 160


# ----------------------------------------------------------------------------------------------------------------
# Transform
# ----------------------------------------------------------------------------------------------------------------


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Plain `convert("RGB")` is wrong for two common cases: 16/32-bit grayscale ("I;16", "I") is clipped at 255 (an
    almost white image), and transparent pixels take whatever colour hides under the alpha (often black). We rescale
    high-bit-depth data and composite transparency onto white.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        # 16-bit PNG/TIFF grayscale; "I" is how Pillow often opens them. Map 0..65535 to 0..255.
        array = np.asarray(image, dtype=np.float64) / 257.0
        return PIL.Image.fromarray(np.clip(array + 0.5, 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        array = np.asarray(image, dtype=np.float64)
        return PIL.Image.fromarray(np.clip(array + 0.5, 0, 255).astype(np.uint8), mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, P, CMYK, YCbCr, LAB, HSV, 1, ...


@dataclass(frozen=True)
class ImageTransform:
    """Resize the shorter side to `resolution`, crop a square, maybe flip; return (3, R, R) float32 in [-1, 1]."""

    resolution: int
    center_crop: bool = True  # False -> random crop
    random_flip: bool = False  # horizontal flip with p=0.5

    def __post_init__(self) -> None:
        if self.resolution < 1:
            raise UserError(f"image resolution must be a positive integer, got {self.resolution}: fix data.resolution")

    def __call__(self, image: PIL.Image.Image, rng: random.Random) -> torch.Tensor:
        image = to_rgb(image)
        image = self._resize_crop(image, rng)
        # Random draws always happen in the same order (crop offsets, then the flip coin), so a given
        # (transform, rng state) pair always yields the same output.
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
        return _to_tensor(image)

    def _resize_crop(self, image: PIL.Image.Image, rng: random.Random) -> PIL.Image.Image:
        # Choose the square crop in *source* pixels and resample only that box. This equals "resize the shorter
        # side to R, then crop R x R" but never materialises a huge intermediate (a 1 x 10000 strip would otherwise
        # become R x 10000R), and runs one antialiased bicubic resample.
        width, height = image.size
        side = min(width, height)
        if self.center_crop:
            left, top = (width - side) / 2, (height - side) / 2
        else:
            left, top = rng.randint(0, width - side), rng.randint(0, height - side)
        box = (left, top, left + side, top + side)
        size = (self.resolution, self.resolution)
        if image.size == size:
            return image
        return image.resize(size, resample=PIL.Image.Resampling.BICUBIC, box=box)


def _to_tensor(image: PIL.Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32)
    # x / 127.5 - 1 maps 0 -> -1.0 and 255 -> 1.0 exactly in float32.
    return tensor / 127.5 - 1.0


# ----------------------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------------------


class _SkipImage(Exception):
    """An image we cannot or will not decode; the message is the short reason reported to the user."""


def decode_image(record: dict[str, Any], max_pixels: int) -> PIL.Image.Image:
    """Decode a `{"bytes", "path"}` record into an RGB PIL image, or raise `_SkipImage` with a short reason."""
    data, path = record.get("bytes"), record.get("path")
    if data is None and not path:
        raise _SkipImage("record has neither bytes nor path")
    try:
        if data is not None:
            if len(data) == 0:
                raise _SkipImage("empty file (0 bytes)")
            image = _open_and_load(io.BytesIO(data), max_pixels)
        else:
            with _open_path(path) as file:
                image = _open_and_load(file, max_pixels)
        return to_rgb(image)
    except _SkipImage:
        raise
    except PIL.Image.DecompressionBombError as error:
        raise _SkipImage(f"too large (decompression bomb): {error}") from error
    except PIL.UnidentifiedImageError as error:
        raise _SkipImage("not an image (unrecognised format)") from error
    except OSError as error:
        if "truncat" in str(error).lower():  # Pillow says "image file is truncated" or "Truncated File Read"
            raise _SkipImage(f"truncated file ({error})") from error
        raise _SkipImage(f"cannot read ({type(error).__name__}: {error})") from error
    except Exception as error:  # noqa: BLE001
        # Beyond OSError, Pillow's format plugins raise a zoo of exceptions on malformed input (SyntaxError for
        # broken PNG chunks, ValueError, EOFError, struct.error, zlib.error, IndexError ...). Whatever it is, one
        # bad file must not kill training: report it and move on.
        raise _SkipImage(f"cannot decode ({type(error).__name__}: {error})") from error


@contextlib.contextmanager
def _open_path(path: str) -> Iterator[Any]:
    if "://" in path or "::" in path:
        # Images inside archives (an imagefolder of .zip files) have chained fsspec URLs like
        # "zip://a.png::/data/part1.zip"; `datasets`' own opener understands them.
        from datasets.utils.file_utils import xopen

        with xopen(path, "rb") as file:
            yield file
        return
    if not os.path.isfile(path):
        raise _SkipImage("file not found")
    if os.path.getsize(path) == 0:
        raise _SkipImage("empty file (0 bytes)")
    with open(path, "rb") as file:
        yield file


def _open_and_load(file: Any, max_pixels: int) -> PIL.Image.Image:
    with warnings.catch_warnings():
        # Pillow warns above its global MAX_IMAGE_PIXELS; we enforce our own per-dataset limit below instead.
        warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
        image = PIL.Image.open(file)
        # open() only parsed the header: reject oversized images before allocating their pixels.
        width, height = image.size
        if width * height > max_pixels:
            raise _SkipImage(f"too large ({width}x{height} = {width * height} pixels > max_pixels={max_pixels})")
        if width == 0 or height == 0:
            raise _SkipImage(f"empty image ({width}x{height})")
        image.load()  # decode now, inside our try/except, while the file is still open
        # Phone photos store rotation in EXIF; apply it like `datasets` would have.
        return PIL.ImageOps.exif_transpose(image)


# ----------------------------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------------------------


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Images (and captions) indexed by key = epoch * len(self) + index; built by `build_image_dataset`.

    `__getitem__` returns `{"pixel_values", "caption", "index"}`, or, for a file that cannot be decoded,
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

    def __len__(self) -> int:
        return len(self._rows) if self._rows is not None else len(self._records)

    def fingerprint(self) -> str:
        """Stable hash of the source (local files' names, sizes and mtimes, or hub id + split + fingerprint)."""
        return self._fingerprint

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
        )

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
                raise _SkipImage(f"image column holds {type(image_record).__name__}, not an image")
            image = decode_image(image_record, self.max_pixels)
        except _SkipImage as skip:
            return {
                "skipped": self._display_name(image_record, index),
                "reason": str(skip)[:_REASON_MAX_CHARS],
                "index": index,
                "resolution": self.transform.resolution,
            }
        pixel_values = self.transform(image, rng)
        caption = _pick_caption(record.get(self.caption_column) if self.caption_column else None, rng)
        return {"pixel_values": pixel_values, "caption": caption, "index": index}

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
    """Batch dataset items, dropping skipped ones (so the batch may be smaller than asked, even empty)."""
    good = [item for item in items if "skipped" not in item]
    skipped = [f"{item['skipped']}: {item['reason']}" for item in items if "skipped" in item]
    if good:
        pixel_values = torch.stack([item["pixel_values"] for item in good])
    else:
        resolution = items[0].get("resolution", 0) if items else 0
        pixel_values = torch.empty((0, 3, resolution, resolution), dtype=torch.float32)
    return {
        "pixel_values": pixel_values,
        "captions": [item["caption"] for item in good],
        "indices": torch.tensor([item["index"] for item in good], dtype=torch.long),
        "skipped": skipped,
    }


def split_train_val(n: int, num_val: int, seed: int) -> tuple[list[int], list[int]]:
    """Deterministically hold out `num_val` of `n` indices; both lists are sorted (sequential reads stay local)."""
    if num_val < 0:
        raise UserError(f"number of validation images must be >= 0, got {num_val}: fix data.num_val")
    if num_val >= n:
        raise UserError(f"dataset has {n} images, cannot hold out {num_val} for validation: lower data.num_val")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[num_val:]), sorted(order[:num_val])


# ----------------------------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------------------------


def build_image_dataset(
    source: str,
    *,
    transform: ImageTransform,
    image_column: str = "image",
    caption_column: str | None = "text",
    split: str = "train",
    seed: int = 0,
    max_pixels: int = 64_000_000,
    cache_dir: str | None = None,
) -> ImageCaptionDataset:
    """Load a local image folder (imagefolder layout, optional metadata.jsonl) or a hub dataset `user/name`.

    `caption_column=None` means "no captions needed" (every caption is ""); a named caption column that the data
    lacks is an error. Images over `max_pixels` are skipped (Pillow's own bomb guard, 2 * PIL.Image.MAX_IMAGE_PIXELS
    ~ 179 MP, still applies above that). `cache_dir` overrides where `datasets` writes its Arrow cache (default
    ~/.cache/huggingface/datasets). An existing local path wins over a hub id of the same spelling.
    """
    import datasets  # deferred: importing `datasets` takes seconds and most of ldm does not need it

    path = Path(source).expanduser()
    if path.exists():
        records, fingerprint, root = _load_local(path, split, image_column, cache_dir)
    elif _HUB_ID.match(source):
        records, fingerprint, root = _load_hub(source, split, image_column, cache_dir)
    else:
        raise UserError(
            f"dataset path '{source}' does not exist: fix data.path (a local folder or a hub id 'user/name')"
        )

    _check_columns(records, source, image_column, caption_column)
    keep = [image_column] + ([caption_column] if caption_column else [])
    records = records.select_columns(keep)
    try:
        records = records.cast_column(image_column, datasets.Image(decode=False))
    except (TypeError, ValueError) as error:
        raise UserError(
            f"column '{image_column}' of '{source}' does not hold images ({records.features[image_column]}): "
            "set data.image_column to the image column"
        ) from error
    fingerprint = _hash_parts([fingerprint, f"image_column={image_column}"])
    return ImageCaptionDataset(
        records,
        transform=transform,
        image_column=image_column,
        caption_column=caption_column,
        seed=seed,
        max_pixels=max_pixels,
        fingerprint=fingerprint,
        root=root,
    )


def _check_columns(records: Any, source: str, image_column: str, caption_column: str | None) -> None:
    columns = list(records.column_names)
    if image_column not in columns:
        raise UserError(
            f"image column '{image_column}' not found in '{source}' (columns: {', '.join(columns)}): "
            "set data.image_column to one of them"
        )
    if caption_column is not None and caption_column not in columns:
        raise UserError(
            f"caption column '{caption_column}' not found in '{source}' (columns: {', '.join(columns)}): "
            f"add a metadata.jsonl with \"file_name\" and \"{caption_column}\" keys, set data.caption_column to one "
            "of the columns, or set it to null to train without captions"
        )


def _load_local(path: Path, split: str, image_column: str, cache_dir: str | None) -> tuple[Any, str, str]:
    import datasets

    if not path.is_dir():
        raise UserError(f"dataset path '{path}' is a file, not a folder: point data.path at the image folder")
    image_files, metadata_files = _list_folder(path)
    if not image_files:
        raise UserError(f"dataset folder '{path}' contains no image files: add images or fix data.path")
    try:
        records = datasets.load_dataset("imagefolder", data_dir=str(path), split=split, cache_dir=cache_dir)
    except ValueError as error:
        if "Unknown split" in str(error):
            # `datasets` assigns files to splits by folder *and file* names containing train/test/validation/...:
            # a flat folder with one "my-test-image.png" loses every other image to a missing "train" split.
            raise UserError(
                f"split '{split}' not found in '{path}' ({_one_line(error)}); datasets assigns files to splits by "
                "folder/file names containing train, test, validation: rename them or set data.split"
            ) from error
        raise UserError(f"cannot read image folder '{path}': {_one_line(error)}: fix its metadata file") from error
    except datasets.exceptions.DatasetsError as error:
        raise UserError(f"cannot read image folder '{path}': {_one_line(error)}: fix its metadata file") from error
    if len(records) == 0:
        raise UserError(f"split '{split}' of '{path}' has no records: add images (and metadata lines) or fix data.path")
    if len(records) < len(image_files):
        # Legitimate with split folders (train/, test/), but also how a metadata.jsonl that misses files silently
        # drops them: say so once.
        logger.warning(
            "%d of %d image files under %s are not in split '%s' (other splits, or not listed in %s)",
            len(image_files) - len(records),
            len(image_files),
            path,
            split,
            "/".join(_METADATA_FILENAMES),
        )
    # Our own fingerprint rather than `datasets`' (which hashes paths + mtimes but not sizes, and changes with the
    # datasets version): names + sizes + mtimes of every image and metadata file, plus the split.
    fingerprint = _hash_parts(
        ["local", f"split={split}"] + [_stat_line(path, f) for f in sorted(image_files + metadata_files)]
    )
    return records, fingerprint, str(path.resolve())


def _list_folder(root: Path) -> tuple[list[Path], list[Path]]:
    """Image and metadata files under `root` (.zip archives of images count as images: imagefolder reads them).

    Skips what `datasets` skips: hidden files and folders, and `__*` folders.
    """
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    extensions = {ext.lower() for ext in ImageFolder.EXTENSIONS}
    images, metadata = [], []
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if name in _METADATA_FILENAMES:
                metadata.append(Path(folder, name))
            elif os.path.splitext(name)[1].lower() in extensions or name.lower().endswith(".zip"):
                images.append(Path(folder, name))
    return images, metadata


def _stat_line(root: Path, file: Path) -> str:
    stat = file.stat()
    return f"{file.relative_to(root).as_posix()}\t{stat.st_size}\t{stat.st_mtime_ns}"


def _hash_parts(parts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()[:32]


def _load_hub(source: str, split: str, image_column: str, cache_dir: str | None) -> tuple[Any, str, None]:
    import datasets

    offline_message = (
        f"cannot load dataset '{source}' from the Hugging Face hub (offline?): "
        "download it and set data.path to a local folder"
    )
    # Without a network, huggingface_hub retries each request with backoff for ~25 s before failing. Go offline up
    # front instead: a dataset already in the local cache still loads, anything else fails in milliseconds.
    offline = _offline_requested() or not _hub_reachable()
    try:
        with _hub_offline_mode(offline):
            records = datasets.load_dataset(source, split=split, cache_dir=cache_dir)
    except ConnectionError as error:
        raise UserError(offline_message) from error
    except FileNotFoundError as error:
        if offline:
            raise UserError(offline_message) from error
        raise UserError(
            f"dataset '{source}' not found on the Hugging Face hub ({_one_line(error)}): check the id, or log in "
            "with `hf auth login` for a private/gated dataset"
        ) from error
    except ValueError as error:
        if "Unknown split" in str(error):
            message = f"split '{split}' not in dataset '{source}' ({_one_line(error)}): set data.split"
            raise UserError(message) from error
        raise
    if isinstance(records, datasets.DatasetDict):  # defensive: load_dataset(split=...) returns a Dataset
        raise UserError(f"dataset '{source}' has several splits: set data.split to one of {list(records)}")
    fingerprint = _hash_parts(["hub", source, f"split={split}", str(getattr(records, "_fingerprint", ""))])
    return records, fingerprint, None


def _offline_requested() -> bool:
    import datasets

    env = any(os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE") for name in _OFFLINE_ENV)
    return env or bool(datasets.config.HF_HUB_OFFLINE)


_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_PROXY_ENV = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Quick TCP probe of the hub endpoint. Behind a proxy we cannot tell, so we assume it is reachable."""
    if any(os.environ.get(name) for name in _PROXY_ENV):
        return True
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout_s):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline_mode(offline: bool) -> Iterator[None]:
    """Force offline mode in `datasets` and `huggingface_hub` for one call.

    Both libraries read HF_HUB_OFFLINE / HF_DATASETS_OFFLINE once, at import: an environment variable set later (by
    a test, a launcher) or our own reachability verdict would otherwise be ignored.
    """
    if not offline:
        yield
        return
    import datasets
    from huggingface_hub import constants

    saved = (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:300] + ("..." if len(text) > 300 else "")
