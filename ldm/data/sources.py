"""Where image datasets come from: `build_image_dataset(source)`, a local image folder or a hub dataset id.

Records are loaded with Hugging Face `datasets` (the local "imagefolder" layout, with an optional metadata.jsonl of
captions, or a hub dataset "namespace/name"), but the image column is cast to `datasets.Image(decode=False)` so
each record is `{"bytes": ..., "path": ...}` and `ldm.data.decoding` decodes it, skipping bad files. Each source
gets our own fingerprint (local: names + sizes + mtimes of every image and metadata file; hub: id + split +
`datasets`' fingerprint), which keys the latent cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from ldm import hub
from ldm.data.dataset import ImageCaptionDataset
from ldm.data.masks import MASK_COLUMN, find_masks, masks_fingerprint, refuse_masks_for
from ldm.data.remote import RemoteOptions, is_remote
from ldm.data.shards import is_shard_source, load_shards
from ldm.data.transforms import ImageTransform
from ldm.errors import UserError
from ldm.image_io import MAX_PIXELS

logger = logging.getLogger(__name__)

_METADATA_FILENAMES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


def build_image_dataset(
    source: str,
    *,
    transform: ImageTransform,
    image_column: str = "image",
    caption_column: str | None = "text",
    split: str = "train",
    seed: int = 0,
    max_pixels: int = MAX_PIXELS,
    cache_dir: str | None = None,
    remote: RemoteOptions | None = None,
    masks: str = "ignore",
) -> ImageCaptionDataset:
    """Load a local image folder (imagefolder layout, optional metadata.jsonl) or a hub dataset `user/name`.

    `caption_column=None` means "no captions needed" (every caption is ""); a named caption column that the data
    lacks is an error. Images over `max_pixels` are skipped (Pillow's own bomb guard, 2 * PIL.Image.MAX_IMAGE_PIXELS
    ~ 179 MP, still applies above that). `cache_dir` overrides where `datasets` writes its Arrow cache (default
    ~/.cache/huggingface/datasets). An existing local path wins over a hub id of the same spelling. `remote`: how
    http(s):// and s3:// shards are reached (storage options, retries; `ldm.data.remote`). `masks`: `data.masks`
    ("auto", "require", "ignore"; `ldm.data.masks`), loss masks of a local folder's images.
    """
    import datasets  # deferred: importing `datasets` takes seconds and most of ldm does not need it

    path = Path(source).expanduser()
    image_files: list[Path] = []  # a local folder's, where its masks are looked for
    if is_shard_source(source) and not path.is_dir():  # webdataset tar shards: ldm.data.shards
        refuse_masks_for(source, "tar shards", masks)
        records, fingerprint, root = _load_shards(source, image_column, caption_column, cache_dir, remote)
    elif is_remote(source):
        raise UserError(f"data.path '{source}' is a URL but not of .tar shards: remote data must be webdataset "
                        "shards ('.../{00000..00099}.tar'); download other datasets first")
    elif path.exists():
        records, fingerprint, root, image_files = _load_local(path, split, image_column, cache_dir)
    elif hub.is_hub_id(source):  # anything else that does not exist on disk is reported as a missing path
        refuse_masks_for(source, "a hub dataset", masks)
        records, fingerprint, root = _load_hub(source, split, image_column, cache_dir)
    else:
        raise UserError(
            f"dataset path '{source}' does not exist: fix data.path (a local folder or a hub id 'user/name')"
        )

    _check_columns(records, source, image_column, caption_column)
    if is_shard_source(source) and not path.is_dir():  # already undecoded records with just these columns
        return ImageCaptionDataset(
            records, transform=transform, image_column=image_column, caption_column=caption_column, seed=seed,
            max_pixels=max_pixels, fingerprint=_hash_parts([fingerprint, f"image_column={image_column}"]), root=root,
        )
    keep = [image_column] + ([caption_column] if caption_column else [])
    records = records.select_columns(keep + ([MASK_COLUMN] if MASK_COLUMN in records.column_names else []))
    try:
        records = records.cast_column(image_column, datasets.Image(decode=False))
    except (TypeError, ValueError) as error:
        raise UserError(
            f"column '{image_column}' of '{source}' does not hold images ({records.features[image_column]}): "
            "set data.image_column to the image column"
        ) from error
    mask_paths = None
    if image_files:  # a local folder (hub datasets have none: a "mask" column of theirs is not read)
        records, mask_paths = find_masks(records, image_column, source, masks, image_files)
        masks_among = set(mask_paths or []) & {os.path.abspath(f) for f in image_files}  # not unlisted images
        _warn_unlisted(path, split, len(records), len(image_files) - len(masks_among))
    records = records.select_columns(keep)
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
        masks=mask_paths,
        masks_fingerprint=None if mask_paths is None else masks_fingerprint(mask_paths, root),
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


def _load_local(
    path: Path, split: str, image_column: str, cache_dir: str | None
) -> tuple[Any, str, str, list[Path]]:
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
    # Our own fingerprint rather than `datasets`' (which hashes paths + mtimes but not sizes, and changes with the
    # datasets version): names + sizes + mtimes of every image and metadata file, plus the split.
    fingerprint = _hash_parts(
        ["local", f"split={split}"] + [_stat_line(path, f) for f in sorted(image_files + metadata_files)]
    )
    return records, fingerprint, str(path.resolve()), image_files


def _warn_unlisted(path: Path, split: str, records: int, images: int) -> None:
    """`images` image files (masks not counted) but fewer `records`: legitimate with split folders (train/, test/),
    but also how a metadata.jsonl that misses files silently drops them: say so once."""
    if records < images:
        logger.warning("%d of %d image files under %s are not in split '%s' (other splits, or not listed in %s)",
                       images - records, images, path, split, "/".join(_METADATA_FILENAMES))


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
    offline = not hub.reachable()
    try:
        with hub.offline_mode(offline):
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


def _load_shards(
    source: str, image_column: str, caption_column: str | None, cache_dir: str | None,
    remote: RemoteOptions | None,
) -> tuple[Any, str, str]:
    records = load_shards(source, image_column, caption_column, cache_dir, remote)
    fingerprint = _hash_parts(["shards", f"caption_column={caption_column}"] + records.fingerprint_parts())
    if is_remote(source):  # bad samples are named relative to the URLs' common folder, as local ones are
        folders = {ix["path"].rsplit("/", 1)[0] for ix in records.indexes}
        root = folders.pop() if len(folders) == 1 else os.path.commonprefix(sorted(folders)).rsplit("/", 1)[0]
    else:
        root = os.path.commonpath([os.path.dirname(os.path.abspath(ix["path"])) for ix in records.indexes])
    return records, fingerprint, root


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:300] + ("..." if len(text) > 300 else "")
