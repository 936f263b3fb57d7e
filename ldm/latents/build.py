"""Building the latent cache: encode the dataset once with a trained VAE, on every process, resumably.

`ensure_latent_cache` is the one entry point (of `train/cache_latents.py` and of the LDM training script). It is
collective: call it on every process. The cache directory must be on a filesystem all processes share.

- Encoding uses the centre crop with no random flip; with `data.random_flip=true` the flipped image is encoded too
  (encoding the flipped pixels, not flipping the latent: the VAE is not flip-equivariant). Random crops are refused:
  a cache of one crop per image would silently remove that augmentation.
- Process r of n encodes images r, r+n, r+2n, ... in shards of `cache.shard_size` images; each shard is written to
  a temporary file and renamed into place, so a shard file is always complete.
- With `data.buckets: true` each image is encoded at its aspect-ratio bucket (`ldm.data.buckets`), centre-cropped
  (and flipped); a batch's images of one size go through the VAE together. A rerun after an interruption keeps
  every shard that verifies (its content hash, its build id, the images it should hold) and encodes only the rest.
- Every row also records the image's original size and its crop's offset (and its flip's): SDXL's
  micro-conditioning (`ldm.latents.micro_conditioning`).
- The main process writes manifest.json last, after all processes finished, atomically; it vouches for every shard
  by size and sha256. Failures on any process are shared with all, so none is left waiting.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ldm.data.buckets import BucketTransform, bucket_counts, bucket_settings, bucket_sizes, format_bucket_table
from ldm.data.config import DataConfig
from ldm.data.dataset import ImageCaptionDataset
from ldm.data.loader import resolve_source
from ldm.data.remote import RemoteOptions
from ldm.data.sources import build_image_dataset
from ldm.data.transforms import ImageTransform
from ldm.errors import UserError
from ldm.files import TMP_PREFIX, atomic_write_bytes, atomic_write_text
from ldm.latents.cache import (
    FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, LatentCache, MissingCacheError, check_family, vae_identity,
)
from ldm.latents.cache_key import CacheSpec
from ldm.latents.config import LatentCacheConfig
from ldm.latents.encode_shard import encode_shard
from ldm.latents.shard_file import SHARD_FILE, parse_shard, serialize_shard, shard_name
from ldm.latents.text_cache import check_text_cache_family
from ldm.parallel.collective import main_process_first, run_on_all
from ldm.progress import progress_bar
from ldm.vae.load_vae import load_vae, vae_factor

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers import AutoencoderKL

log = logging.getLogger(__name__)
T = TypeVar("T")


def ensure_latent_cache(
    accelerator: Accelerator, data_cfg: DataConfig, cache_cfg: LatentCacheConfig, default_dir: Path,
    family: str = "sd",
) -> LatentCache:
    """Open the latent cache at `cache.dir` (default `default_dir`), building or finishing it first if needed.

    A complete cache that matches the VAE, dataset, transform and model `family` ("sd" or "sdxl") is reused as is.
    A stale or corrupt one is refused with a `UserError`, or, with `cache.rebuild=true`, re-encoded (keeping shards
    that still verify).
    """
    directory = Path(cache_cfg.dir).expanduser() if cache_cfg.dir else Path(default_dir)
    if not data_cfg.center_crop:
        raise UserError(
            "the latent cache stores centre crops only (a cached random crop would be the same crop every epoch): "
            "set data.center_crop=true"
        )
    vae_dir = Path(cache_cfg.vae).expanduser()
    identity = vae_identity(vae_dir)
    buckets = bucket_settings(data_cfg)
    if buckets is not None:  # the table is a function of the settings and the VAE factor; kept in the key as is
        sizes = bucket_sizes(data_cfg.resolution, factor=vae_factor(identity.config), **buckets)
        buckets = {**buckets, "sizes": [list(size) for size in sizes]}
    dataset = _encoding_dataset(data_cfg, accelerator, buckets)
    spec = CacheSpec(
        vae=identity,
        data_fingerprint=dataset.fingerprint(),
        resolution=data_cfg.resolution,
        center_crop=True,
        random_flip=data_cfg.random_flip,
        caption_column=data_cfg.caption_column,
        dtype=cache_cfg.dtype,
        buckets=buckets,
        family=family,
        masks=dataset.masks_fingerprint(),  # None without loss masks (data.masks)
    )

    # Every process inspects the cache; they agree on a shared filesystem, and the gather makes sure of it.
    cache, problem = _try_open(directory, spec)
    problems = _collective(accelerator, directory, lambda: problem)
    if all(p is None for p in problems):
        assert cache is not None
        return _log_buckets(cache)
    bad = next((p for p in problems if p is not None and p[0] == "bad"), None)
    if bad is not None and not cache_cfg.rebuild:
        raise UserError(bad[1])
    if bad is not None:
        log.warning("rebuilding the latent cache (cache.rebuild=true): %s", bad[1])

    # Without a manifest, the cache is "incomplete" and the build below verifies each shard itself: stale shards
    # (another build id) and corrupt ones (bad content hash) are re-encoded, intact ones kept.
    def prepare() -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MANIFEST_NAME).unlink(missing_ok=True)
        for entry in directory.iterdir():
            if entry.name.startswith(TMP_PREFIX):  # left by an interrupted write
                entry.unlink(missing_ok=True)

    _collective(accelerator, directory, prepare if accelerator.is_main_process else None)
    records = _collective(
        accelerator, directory,
        lambda: _encode_own_shards(accelerator, dataset, vae_dir, spec, cache_cfg, data_cfg, directory),
    )
    _collective(
        accelerator, directory,
        (lambda: _publish(directory, spec, dataset, records, cache_cfg, accelerator.num_processes))
        if accelerator.is_main_process
        else None,
    )
    return _log_buckets(LatentCache.open(directory, **_open_kwargs(spec)))


def check_cache_family(directory: Path, family: str) -> None:
    """Before a run writes anything: refuse a complete latent cache at `directory`, or its text-embedding cache,
    built for the other model family than `family` ("sd" or "sdxl"); what else is wrong with them is found (and
    reported) when they are opened."""
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = None
    if isinstance(manifest, dict):
        check_family(directory, manifest, family)
    check_text_cache_family(directory, family)


def _log_buckets(cache: LatentCache) -> LatentCache:
    if cache.buckets is not None:
        ids = cache.bucket_ids(range(len(cache)))
        log.info("%s", format_bucket_table(cache.buckets, bucket_counts(ids, len(cache.buckets))))
    return cache


def _open_kwargs(spec: CacheSpec) -> dict[str, Any]:
    return dict(
        vae=spec.vae, data_fingerprint=spec.data_fingerprint, resolution=spec.resolution,
        center_crop=spec.center_crop, random_flip=spec.random_flip, caption_column=spec.caption_column,
        dtype=spec.dtype, buckets=spec.buckets, family=spec.family, masks=spec.masks,
    )


def _try_open(directory: Path, spec: CacheSpec) -> tuple[LatentCache | None, tuple[str, str] | None]:
    """(cache, None) when usable; else (None, ("missing" | "bad", message))."""
    try:
        return LatentCache.open(directory, **_open_kwargs(spec)), None
    except MissingCacheError as error:
        return None, ("missing", str(error))
    except UserError as error:  # stale, corrupt, or from a newer format version
        return None, ("bad", str(error))


def _encoding_dataset(
    data_cfg: DataConfig, accelerator: Accelerator, buckets: dict[str, Any] | None = None
) -> ImageCaptionDataset:
    """The full dataset (validation images too: training splits by index later) with the deterministic transform."""
    source = resolve_source(data_cfg, accelerator)
    transform: Any = ImageTransform(data_cfg.resolution, center_crop=True, random_flip=False)
    if buckets is not None:
        sizes = tuple(tuple(size) for size in buckets["sizes"])
        transform = BucketTransform(sizes, data_cfg.resolution, center_crop=True, random_flip=False)
    with main_process_first(accelerator):  # the main process builds the `datasets` cache, the others reuse it
        return build_image_dataset(
            source,
            transform=transform,
            image_column=data_cfg.image_column,
            caption_column=data_cfg.caption_column,
            split=data_cfg.split,
            seed=0,  # only picks one caption of multi-caption records; a fixed value keeps the cache seed-independent
            max_pixels=data_cfg.max_image_pixels,
            remote=RemoteOptions.from_data_config(data_cfg),
            masks=data_cfg.masks,
        )


# ----------------------------------------------------------------------------------------------------------------
# Encoding this process's shards
# ----------------------------------------------------------------------------------------------------------------


def shard_plan(
    num_images: int, rank: int, world_size: int, shard_size: int, own: Sequence[int] | None = None
) -> list[list[int]]:
    """The dataset indices of each of process `rank`'s shards: every `world_size`-th image (or `own`), in chunks."""
    own = list(range(rank, num_images, world_size)) if own is None else list(own)
    return [own[i : i + shard_size] for i in range(0, len(own), shard_size)]


def _encode_own_shards(
    accelerator: Accelerator,
    dataset: ImageCaptionDataset,
    vae_dir: Path,
    spec: CacheSpec,
    cache_cfg: LatentCacheConfig,
    data_cfg: DataConfig,
    directory: Path,
) -> list[dict[str, Any]]:
    """Write (or keep) this process's shards; return their manifest entries, each with its skipped images."""
    rank, build = accelerator.process_index, spec.build_id()
    own = dataset.process_indices(rank, accelerator.num_processes)  # tar shards: this process's own shards
    plan = shard_plan(len(dataset), rank, accelerator.num_processes, cache_cfg.shard_size, own)
    vae: AutoencoderKL | None = None  # loaded on first need: a complete-but-unpublished cache needs no VAE
    entries: list[dict[str, Any]] = []
    world = accelerator.num_processes
    desc = "encoding latents" + (f" (process 0 of {world})" if world > 1 else "")
    with progress_bar(total=sum(map(len, plan)), desc=desc, disable=not accelerator.is_main_process) as progress:
        for k, indices in enumerate(plan):
            path = directory / shard_name(rank, k)
            data = _reusable_shard(path, build, indices)
            if data is None:
                if vae is None:
                    vae = load_vae(vae_dir, device=accelerator.device)
                shard = encode_shard(vae, dataset, indices, spec, cache_cfg, data_cfg, accelerator, progress)
                data = serialize_shard(shard)
                atomic_write_bytes(path, data)
            else:
                log.info("keeping %s (already written and intact)", path.name)
                progress.update(len(indices))
            entries.append(_manifest_entry(path.name, rank, data))
    return entries


def _reusable_shard(path: Path, build: str, indices: Sequence[int]) -> bytes | None:
    """The bytes of an existing shard that verifies and holds exactly `indices` of this build, else None."""
    if not path.is_file():
        return None
    data = path.read_bytes()
    try:
        shard = parse_shard(data)
    except (ValueError, KeyError, TypeError) as error:
        log.warning("re-encoding %s: it %s", path.name, error)
        return None
    if shard.build != build or shard.covered_indices() != sorted(indices):
        log.info("re-encoding %s: it is from another build or process layout", path.name)
        return None
    return data


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------


def _manifest_entry(name: str, rank: int, data: bytes) -> dict[str, Any]:
    shard = parse_shard(data)  # cheap next to encoding; also the last check before the manifest vouches for it
    return {
        "file": name,
        "rank": rank,
        "rows": shard.rows,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "skipped": shard.skipped,
    }


def _publish(
    directory: Path,
    spec: CacheSpec,
    dataset: ImageCaptionDataset,
    per_process: list[list[dict[str, Any]]],
    cache_cfg: LatentCacheConfig,
    world_size: int,
) -> None:
    """Main process: write the manifest (last, atomically), then remove shard files it does not list."""
    entries = sorted((e for process in per_process for e in process), key=lambda e: (e["rank"], e["file"]))
    skipped = sorted((s for e in entries for s in e.pop("skipped")), key=lambda s: s["index"])
    count = sum(e["rows"] for e in entries)
    if count == 0:
        raise UserError(f"none of the {len(dataset)} images of the dataset could be decoded: fix data.path")
    for item in skipped:
        log.warning("skipped unreadable image %s: %s", item["name"], item["reason"])
    first = next(e for e in entries if e["rows"] > 0)
    latent_shape = list(parse_shard((directory / first["file"]).read_bytes()).tensors["mean"].shape[1:])
    if spec.buckets is not None:  # rows are flattened: record the square data.resolution's latent shape
        side = spec.resolution // vae_factor(spec.vae.config)
        latent_shape = [int(spec.vae.config.get("latent_channels", 4)), side, side]
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "build": spec.build_id(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "vae": spec.vae.to_json(),
        "data": {
            "fingerprint": spec.data_fingerprint,
            "caption_column": spec.caption_column,
            "resolution": spec.resolution,
            "center_crop": spec.center_crop,
            "random_flip": spec.random_flip,
            "buckets": spec.buckets,
            "masks": spec.masks,
            "size": len(dataset),
            "family": spec.family,
        },
        "dtype": spec.dtype,
        "latent_shape": latent_shape,
        "count": count,
        "shard_size": cache_cfg.shard_size,
        "world_size": world_size,
        "shards": entries,
        "skipped": skipped,
    }
    atomic_write_text(directory / MANIFEST_NAME, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    listed = {e["file"] for e in entries}
    for path in directory.iterdir():
        if SHARD_FILE.match(path.name) and path.name not in listed:  # from an earlier run with more processes
            path.unlink(missing_ok=True)
    log.info(
        "latent cache %s: %d latents of shape %s in %d shards, %d images skipped",
        directory, count, tuple(latent_shape), len(entries), len(skipped),
    )


# ----------------------------------------------------------------------------------------------------------------
# Collective error handling
# ----------------------------------------------------------------------------------------------------------------


def _collective(accelerator: Accelerator, directory: Path, work: Callable[[], T] | None) -> list[T]:
    """Run `work` here (None: nothing to do on this process); every process's result, by rank.

    If any process failed, every process raises (`ldm.parallel.collective.run_on_all`), so no process waits forever
    for one that died; OS errors become `UserError`s.
    """
    return run_on_all(
        accelerator, work, what="latent caching",
        describe_os_error=lambda reason: (
            f"could not write the latent cache {directory}: {reason}: free disk space or fix its permissions"
        ),
    )
