"""Reading the latent cache: integrity and staleness checks, the in-memory table, a keyed torch `Dataset` view.

On-disk format (a directory; written by `ldm.latents.build`):

    manifest.json                      written last, atomically: its presence means "complete"
    shard-<rank>-<k>.safetensors       the k-th shard of process `rank`; process r encodes images r, r+n, r+2n, ...

Each shard holds, for its R encoded images (skipped ones have no row):

    mean, std            (R, C, h, w)  posterior mean and std of the centre-cropped, unflipped image (fp32 or fp16)
    flip_mean, flip_std  (R, C, h, w)  the same for the horizontally flipped image (only when built with flips)
    index                (R,) int64    the image's index in the full dataset
    original_size        (R, 2) int64  (h, w) of the image as decoded, before any resize
    crop_top_left        (R, 2) int64  (top, left) of the crop in the resized image (SDXL's micro-conditioning)
    flip_crop_top_left   (R, 2) int64  the same for the flipped copy: mirrored (only when built with flips)
    mask                 (R, 1, h, w)  loss weights in [0, 1] at latent resolution: the image's mask (`ldm.data.masks`)
                                       through its crop, area-averaged over each VAE factor x factor block (only with
                                       masks; the flipped copy's is its mirror image, exactly, so it is not stored)

(`ldm.latents.micro_conditioning` explains the last three and turns a row into SDXL's time ids.)

With aspect-ratio buckets (`data.buckets: true`, see `ldm.data.buckets`) each image is encoded at its bucket, so
latent sizes differ: mean, std and the flips are then (R, L), each row a (C, H/f, W/f) latent flattened and zero-padded
to L = C * the largest bucket's latent area (a mask: (R, L / C)), and `bucket` (R,) int64 holds the row's index into
the bucket table that the manifest's data.buckets.sizes lists ([W, H] pixels). Rows are keyed by dataset index, never
by step.

and, in the safetensors metadata: "format", "version" (2 since the crop offsets; an older cache is stale), "build"
(hash of everything the latents depend on), "captions" (JSON list, one per row), "skipped" (JSON list of {index,
name, reason} for undecodable images) and "content_sha256" (hash of tensors + captions + skipped), so a shard
verifies itself even before a manifest exists.

The manifest records the VAE identity (sha256 of its weights and of its config.json without "_"-keys, the config,
scaling/shift factor), the data (fingerprint, source, caption column, resolution, crop, flip, buckets, the loss
masks' fingerprint (null without; in the build id only when set, so caches without masks keep theirs), dataset size,
and the model family the cache was built for: "sd" (also when absent) or "sdxl"), the dtype, latent shape, count,
every shard's file name, rows, bytes and sha256, and the skipped images. A cache built for the other family is
refused saying so (a rebuild keeps its shards: the family is not in the build id).

Latents are stored unscaled: training samples z = (mean + std * eps) [- shift_factor] * scaling_factor afresh each
time (`sample_latents`), and `vae.decode(mean)` reconstructs the image. The whole cache is loaded into memory by
`LatentCache.open` (small datasets; random access from any process without file handles), after checking every
shard's size and sha256 against the manifest.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ldm.data.caption_tags import TagOptions, process_tags
from ldm.errors import UserError
from ldm.latents.cache_key import FAMILY_NAMES, FORMAT_VERSION, UNCHECKED, VAEIdentity, differences, vae_identity
from ldm.latents.micro_conditioning import CROP_KEY, FLIP_CROP_KEY, ORIGINAL_SIZE_KEY, row_fields
from ldm.latents.shard_file import Shard, parse_shard

FORMAT_NAME = "ldm-latent-cache"
MANIFEST_NAME = "manifest.json"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
REBUILD_HINT = "delete it or run train/cache_latents.py with cache.rebuild=true"

_MANIFEST_KEYS = ("build", "vae", "data", "dtype", "latent_shape", "count", "shards", "skipped")
# Tensor names in a shard; flips only exist in caches built with data.random_flip=true.
_LATENT_KEYS = ("mean", "std")
_FLIP_KEYS = ("flip_mean", "flip_std")
BUCKET_KEY = "bucket"  # bucketed caches only
MASK_KEY = "mask"  # caches with loss masks only


class MissingCacheError(UserError):
    """No complete cache (no manifest) at the directory."""


class StaleCacheError(UserError):
    """A complete cache, built from another VAE, dataset or transform than the run expects."""


class CorruptCacheError(UserError):
    """A manifest or shard that is unreadable, truncated or does not match its recorded hash."""


# ----------------------------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------------------------


class LatentCache:
    """All cached latents in memory, rows sorted by dataset index; build with `LatentCache.open`."""

    def __init__(self, directory: Path, manifest: dict[str, Any], shards: Sequence[Shard]) -> None:
        self.directory = directory
        self.manifest = manifest
        names = [*_LATENT_KEYS, ORIGINAL_SIZE_KEY, CROP_KEY] + ([*_FLIP_KEYS, FLIP_CROP_KEY] if self.has_flips else [])
        names += [BUCKET_KEY] if self.buckets is not None else []
        names += [MASK_KEY] if self.has_masks else []
        indices = torch.cat([s.tensors["index"] for s in shards]) if shards else torch.zeros(0, dtype=torch.long)
        order = torch.argsort(indices)  # rows by dataset index, whichever process encoded them
        self.indices = indices[order]  # (N,) int64
        self.tensors = {name: torch.cat([s.tensors[name] for s in shards])[order] for name in names}  # (N, C, h, w)
        captions = [c for s in shards for c in s.captions]
        self.captions = [captions[i] for i in order.tolist()]
        self._position = {index: position for position, index in enumerate(self.indices.tolist())}

    @classmethod
    def open(
        cls,
        directory: str | Path,
        *,
        vae: str | Path | VAEIdentity | None,
        data_fingerprint: str | None,
        resolution: int,
        center_crop: bool,
        random_flip: bool,
        caption_column: str | None = UNCHECKED,
        dtype: str | None = None,
        buckets: dict[str, Any] | None = UNCHECKED,
        family: str = UNCHECKED,
        masks: str | None = UNCHECKED,
    ) -> LatentCache:
        """Load a cache after checking that it is complete, intact and built from what the caller expects.

        `vae` is the VAE directory or its `vae_identity`; None (like `data_fingerprint=None`, `dtype=None` or an
        omitted `caption_column` or `masks`, the masks' fingerprint) skips that check. Raises `MissingCacheError`,
        `StaleCacheError` (naming every difference, or the other model `family`) or `CorruptCacheError` (naming the
        file), all `UserError`s.
        """
        directory = Path(directory)
        manifest = read_manifest(directory)
        if family is not UNCHECKED:
            check_family(directory, manifest, family)
        expected: dict[str, Any] = {
            "vae": vae if vae is None or isinstance(vae, VAEIdentity) else vae_identity(vae),
            "data_fingerprint": data_fingerprint,
            "resolution": resolution,
            "center_crop": center_crop,
            "random_flip": random_flip,
            "dtype": dtype,
        }
        if caption_column is not UNCHECKED:
            expected["caption_column"] = caption_column
        if buckets is not UNCHECKED:
            expected["buckets"] = buckets
        if masks is not UNCHECKED:
            expected["masks"] = masks
        diffs = differences(manifest, expected)
        if diffs:
            raise stale_cache_error(directory, diffs)
        return cls._load(directory, manifest)

    @classmethod
    def read(cls, directory: str | Path) -> LatentCache:
        """Load a complete, intact cache without checking what it was built from (for tools and tests)."""
        directory = Path(directory)
        return cls._load(directory, read_manifest(directory))

    @classmethod
    def _load(cls, directory: Path, manifest: dict[str, Any]) -> LatentCache:
        shards = [load_shard(directory, entry, manifest["build"]) for entry in manifest["shards"]]
        return cls(directory, manifest, shards)

    # ---- what it holds

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    @property
    def has_flips(self) -> bool:
        return bool(self.manifest["data"]["random_flip"])

    @property
    def has_masks(self) -> bool:
        """Whether rows hold loss masks (`ldm.data.masks`)."""
        return self.manifest["data"].get("masks") is not None

    @property
    def scaling_factor(self) -> float:
        return float(self.manifest["vae"]["scaling_factor"])

    @property
    def shift_factor(self) -> float | None:
        return self.manifest["vae"]["shift_factor"]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["latent_shape"])  # (C, h, w); with buckets, of the square data.resolution

    @property
    def buckets(self) -> list[tuple[int, int]] | None:
        """The bucket table, [(W, H)] in pixels, or None for a cache of square crops."""
        table = self.manifest["data"].get("buckets")
        return None if table is None else [tuple(size) for size in table["sizes"]]

    def bucket_ids(self, positions: Sequence[int]) -> list[int] | None:
        """Each row's index into `buckets` (None for a cache of square crops)."""
        if self.buckets is None:
            return None
        ids = self.tensors[BUCKET_KEY].tolist()
        return [ids[p] for p in positions]

    def _unflatten(self, flat: torch.Tensor, position: int, channels: int | None = None) -> torch.Tensor:
        # (L,) zero-padded -> (C, H/f, W/f) of the row's bucket (C = `channels`, default the latents')
        channels, side = channels or self.latent_shape[0], self.latent_shape[-1]
        factor = self.manifest["data"]["resolution"] // side
        width, height = self.buckets[int(self.tensors[BUCKET_KEY][position])]
        h, w = height // factor, width // factor
        return flat[: channels * h * w].view(channels, h, w)

    @property
    def dataset_size(self) -> int:
        """Images in the dataset, skipped ones included (what `split_train_val` should split)."""
        return int(self.manifest["data"]["size"])

    @property
    def skipped(self) -> list[dict[str, Any]]:
        return list(self.manifest["skipped"])

    def positions_of(self, indices: Sequence[int]) -> list[int]:
        """Rows of the given dataset indices; skipped images (no row) are left out."""
        return [self._position[i] for i in indices if i in self._position]

    def target_size(self, position: int) -> tuple[int, int]:
        """(H, W) pixels the row's latents were encoded from: its bucket, or data.resolution squared."""
        if self.buckets is None:
            return self.manifest["data"]["resolution"], self.manifest["data"]["resolution"]
        width, height = self.buckets[int(self.tensors[BUCKET_KEY][position])]
        return height, width

    def row(self, position: int, flipped: bool = False) -> dict[str, Any]:
        """{"mean": (C, h, w) float32, "std": (C, h, w) float32, "caption", "index", "flipped", and SDXL's
        "original_size", "crop_top_left" (of this copy, flipped or not), "target_size": (int, int)} of one row; with
        loss masks also "mask": (1, h, w) float32 in [0, 1], mirrored with a flipped copy."""
        if flipped and not self.has_flips:
            raise ValueError(f"latent cache {self.directory} was built without flipped latents")
        mean, std = _FLIP_KEYS if flipped else _LATENT_KEYS
        mean, std = self.tensors[mean][position].float(), self.tensors[std][position].float()
        if self.buckets is not None:
            mean, std = self._unflatten(mean, position), self._unflatten(std, position)
        extra = {}
        if self.has_masks:
            mask = self.tensors[MASK_KEY][position].float()
            mask = self._unflatten(mask, position, channels=1) if self.buckets is not None else mask  # (1, h, w)
            extra["mask"] = mask.flip(-1) if flipped else mask
        return {
            **extra,
            "mean": mean,
            "std": std,
            "caption": self.captions[position],
            "index": int(self.indices[position]),
            "flipped": flipped,
            **row_fields(self.tensors, position, flipped),
            "target_size": self.target_size(position),
        }

    def dataset(
        self, seed: int, indices: Sequence[int] | None = None, tags: TagOptions = TagOptions()
    ) -> LatentDataset:
        """A keyed view over all rows, or over the rows of some dataset `indices` (e.g. a train split); `tags`: the
        caption tag shuffling/dropout applied per item (`ldm.data.caption_tags`)."""
        positions = list(range(len(self))) if indices is None else self.positions_of(indices)
        return LatentDataset(self, seed, positions, tags)


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST_NAME
    if not path.is_file():
        what = "does not exist" if not directory.exists() else f"has no {MANIFEST_NAME} (an interrupted build?)"
        raise MissingCacheError(f"latent cache {directory} {what}: run train/cache_latents.py to build it")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise ValueError(f"not an {FORMAT_NAME} manifest")
    except (OSError, ValueError) as error:
        raise CorruptCacheError(f"latent cache {directory}: {MANIFEST_NAME} is unreadable ({error}): {REBUILD_HINT}")
    if manifest.get("version", 0) > FORMAT_VERSION:
        raise UserError(
            f"latent cache {directory} has format version {manifest['version']}, newer than this code "
            f"({FORMAT_VERSION}): update ldm or {REBUILD_HINT}"
        )
    if manifest.get("version", 0) < FORMAT_VERSION:  # its shards lack what this code reads (e.g. crop offsets)
        raise stale_cache_error(directory, [f"format version {manifest.get('version', 0)} != {FORMAT_VERSION}"])
    missing = [key for key in _MANIFEST_KEYS if key not in manifest]
    if missing:
        raise CorruptCacheError(f"latent cache {directory}: {MANIFEST_NAME} lacks {', '.join(missing)}: {REBUILD_HINT}")
    return manifest


def check_family(directory: Path, manifest: dict[str, Any], family: str) -> None:
    """Refuse (one line) a cache built for the other model family than the run's `family` ("sd" or "sdxl")."""
    built = manifest.get("data", {}).get("family", "sd")  # caches from before the field: SD runs built them
    if built != family:
        raise StaleCacheError(f"latent cache {directory} was built for {FAMILY_NAMES.get(built, built)} and this run "
                              f"trains {FAMILY_NAMES[family]}: rebuild it with cache.rebuild=true (its shards are "
                              "kept if they match) or delete it")


def stale_cache_error(directory: Path, diffs: Sequence[str]) -> StaleCacheError:
    return StaleCacheError(
        f"latent cache {directory} is stale: it was built with {', '.join(diffs)} (cache != this run): {REBUILD_HINT}"
    )


def load_shard(directory: Path, entry: dict[str, Any], build: str) -> Shard:
    """Read one shard listed in a manifest, refusing it unless size, sha256, content and build all match."""
    name = entry["file"]

    def corrupt(problem: str) -> CorruptCacheError:
        return CorruptCacheError(
            f"latent cache {directory}: shard {name} {problem}: "
            "run train/cache_latents.py with cache.rebuild=true to re-encode it"
        )

    path = directory / name
    if not path.is_file():
        raise corrupt("is missing")
    data = path.read_bytes()
    if len(data) != entry["bytes"]:
        raise corrupt(f"has {len(data)} bytes instead of {entry['bytes']} (truncated?)")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise corrupt("does not match its sha256 in the manifest (corrupted)")
    try:
        shard = parse_shard(data)
    except (ValueError, KeyError, TypeError) as error:
        raise corrupt(str(error)) from error
    if shard.build != build or shard.rows != entry["rows"]:
        raise corrupt("belongs to a different build than the manifest")
    return shard


# ----------------------------------------------------------------------------------------------------------------
# Dataset view, collation, sampling
# ----------------------------------------------------------------------------------------------------------------


class LatentDataset(Dataset):
    """Rows addressed by key = epoch * len(self) + position, like `ImageCaptionDataset`, for a resumable sampler.

    With flips, each key shows the flipped latents with p=0.5, and with `tags` its caption's tags shuffled/dropped,
    drawn (in that order) from `random.Random` seeded by (seed, key): the same key always gives the same item,
    whatever the process, worker count or resume point.
    """

    def __init__(
        self, cache: LatentCache, seed: int, positions: Sequence[int], tags: TagOptions = TagOptions()
    ) -> None:
        self.cache, self.seed, self.positions, self.tags = cache, seed, list(positions), tags

    def __len__(self) -> int:
        return len(self.positions)

    def bucket_ids(self) -> list[int] | None:
        """Each item's aspect-ratio bucket, for `ldm.data.buckets.BucketBatchSampler` (None: no buckets)."""
        return self.cache.bucket_ids(self.positions)

    def __getitem__(self, key: int) -> dict[str, Any]:
        if key < 0 or not self.positions:
            raise IndexError(f"latent dataset keys are non-negative (epoch * len + position), got {key}")
        position = self.positions[key % len(self.positions)]
        # The same integer mix as ldm.data.dataset (ints seed `Random` reproducibly across processes).
        rng = random.Random(self.seed * 1_000_003 + key)
        flipped = self.cache.has_flips and rng.random() < 0.5
        row = self.cache.row(position, flipped)
        row["caption"] = process_tags(row["caption"], self.tags, rng)  # as written unless data.shuffle_tags/tag_dropout
        return row


def collate_latents(items: list[dict[str, Any]]) -> dict[str, Any]:
    """{"mean": (B, C, h, w), "std": (B, C, h, w), "captions": [B], "indices": (B,) int64, "flipped": (B,) bool,
    "original_size", "crop_top_left", "target_size": (B, 2) int64} (SDXL's time ids: `batch_time_ids`), and with loss
    masks "mask": (B, 1, h, w) in [0, 1]."""
    pairs = ("original_size", "crop_top_left", "target_size")
    masks = {"mask": torch.stack([item["mask"] for item in items])} if items and "mask" in items[0] else {}
    return {
        **masks,
        "mean": torch.stack([item["mean"] for item in items]),
        "std": torch.stack([item["std"] for item in items]),
        "captions": [item["caption"] for item in items],
        "indices": torch.tensor([item["index"] for item in items], dtype=torch.long),
        "flipped": torch.tensor([item["flipped"] for item in items], dtype=torch.bool),
        **{key: torch.tensor([item[key] for item in items], dtype=torch.long).reshape(-1, 2) for key in pairs},
    }


def sample_latents(
    mean: torch.Tensor,
    std: torch.Tensor,
    scaling_factor: float,
    shift_factor: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A fresh posterior sample in diffusion space: (mean + std * eps - shift_factor) * scaling_factor, (B, C, h, w).

    The same convention as diffusers pipelines, which decode with `vae.decode(z / scaling_factor + shift_factor)`.
    """
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    z = mean + std * eps
    if shift_factor is not None:
        z = z - shift_factor
    return z * scaling_factor
