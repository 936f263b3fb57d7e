"""Training from `ldm-latent-shards` output: `cache.shards: PATTERN` instead of a cache directory.

The pattern is expanded like `data.path` (`ldm.data.shards.expand_pattern`: braces; local, `s3://` or `https://`)
and every shard is read whole, through `ldm.data.remote` for URLs (one ranged GET per shard, with the same retries
and storage options, `data.storage_options` / `data.remote_*`). The format is `ldm.latents.shard_writer`'s: each
shard starts with the cache's manifest, then one sample per row. The rows become the same in-memory `LatentCache`
that the cache directory gives (same tensors in the same dtype, zero-padded bucket rows re-padded, rows sorted by
dataset index, the same manifest), so training from the shards is training from the cache, bit for bit (tested).
Nodes that share no disk need no cache directory and no access to the images.

What is checked, as `LatentCache.open` checks a directory: the VAE (`cache.vae`), resolution, flips, caption column,
dtype, buckets and model family against the run; the dataset fingerprint is not (the images are not read: the
shards are the dataset). All shards must come from one build. A missing or unreadable shard is skipped, named in
one warning and counted, as a bad image shard is (its rows are then not trained on); none readable is a `UserError`.
Text-embedding caches are not read from shards (`cache.text_embeddings` with `cache.shards` is refused).
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors

from ldm.data.remote import RemoteFiles, RemoteOptions, RemoteUnavailable, is_remote
from ldm.data.shards import expand_pattern
from ldm.errors import UserError
from ldm.latents.cache import LatentCache, Shard, check_family
from ldm.latents.cache_key import UNCHECKED, VAEIdentity, differences
from ldm.latents.micro_conditioning import CROP_KEY, FLIP_CROP_KEY, ORIGINAL_SIZE_KEY
from ldm.latents.shard_writer import MANIFEST_EXT, MANIFEST_KEY

log = logging.getLogger(__name__)


def open_latent_shards(
    pattern: str,
    *,
    remote: RemoteOptions | None = None,
    vae: VAEIdentity | None = None,
    resolution: int | None = None,
    random_flip: bool | None = None,
    center_crop: bool | None = None,
    caption_column: str | None = UNCHECKED,
    dtype: str | None = None,
    buckets: dict[str, Any] | None = UNCHECKED,
    family: str = UNCHECKED,
) -> LatentCache:
    """The `LatentCache` the shards of `pattern` hold, checked against what the run expects (None / UNCHECKED:
    not checked)."""
    files = RemoteFiles(remote)
    paths = expand_pattern(pattern)
    parsed: list[tuple[dict[str, Any], Shard]] = []
    problems: list[str] = []
    for path in paths:
        try:
            parsed.append(_parse(path, _read_whole(path, files)))
        except FileNotFoundError:
            problems.append(f"{path}: missing")
        except (RemoteUnavailable, OSError, tarfile.TarError, ValueError, KeyError) as error:
            problems.append(f"{path}: {' '.join(str(error).split())[:160]}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        log.warning("skipped %d of %d latent shards of %s: %s", len(problems), len(paths), pattern, shown)
    if not parsed:
        raise UserError(f"cache.shards '{pattern}' matches {len(paths)} shard names but none is readable "
                        f"({'; '.join(problems[:3])}): fix the pattern, or export the cache with ldm-latent-shards")
    manifest = parsed[0][0]
    builds = {m["build"] for m, _ in parsed}
    if len(builds) > 1:
        raise UserError(f"cache.shards '{pattern}' mixes shards of {len(builds)} different latent caches: export one "
                        "cache (ldm-latent-shards) and point cache.shards at its shards only")
    where = Path(pattern)
    if family is not UNCHECKED:
        check_family(where, manifest, family)
    expected: dict[str, Any] = {"vae": vae, "dtype": dtype}
    expected.update({k: v for k, v in (("resolution", resolution), ("random_flip", random_flip),
                                       ("center_crop", center_crop)) if v is not None})
    if caption_column is not UNCHECKED:
        expected["caption_column"] = caption_column
    if buckets is not UNCHECKED:
        expected["buckets"] = buckets
    diffs = differences(manifest, expected)
    if diffs:
        raise UserError(f"latent shards {pattern} were built with {', '.join(diffs)} (shards != this run): export "
                        "them again from a cache built for this run, or fix the config")
    rows = sum(shard.rows for _, shard in parsed)
    if rows != manifest["count"]:
        log.warning("latent shards %s hold %d of the cache's %d rows: the rest are not trained on", pattern, rows,
                    manifest["count"])
    return LatentCache(where, {**manifest, "shards": []}, [shard for _, shard in parsed])


def _read_whole(path: str, files: RemoteFiles) -> bytes:
    if not is_remote(path):
        return Path(path).read_bytes()
    stat = files.stat(path)
    if stat is None:
        raise FileNotFoundError(path)
    return files.read(path, 0, stat["size"])


def _parse(path: str, data: bytes) -> tuple[dict[str, Any], Shard]:
    """One shard's manifest and rows as a cache `Shard` (tensors with one row per sample, in tar order)."""
    from webdataset.tariterators import base_plus_ext

    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            key, ext = base_plus_ext(member.name)
            if member.isfile() and key is not None:
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    if MANIFEST_KEY not in samples:
        raise ValueError(f"no {MANIFEST_KEY}.{MANIFEST_EXT} member: not written by this version of ldm-latent-shards")
    manifest = json.loads(samples.pop(MANIFEST_KEY)[MANIFEST_EXT])
    samples.pop("empty", None)  # the empty caption's text embedding
    flips = bool(manifest["data"]["random_flip"])
    table = manifest["data"].get("buckets")
    names = ["mean", "std"] + (["flip_mean", "flip_std"] if flips else [])
    columns: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    info_columns: dict[str, list[Any]] = {"index": [], ORIGINAL_SIZE_KEY: [], CROP_KEY: []}
    info_columns.update({FLIP_CROP_KEY: []} if flips else {})
    info_columns.update({"bucket": []} if table is not None else {})
    captions = []
    for key, sample in samples.items():
        tensors = load_safetensors(sample["latents.safetensors"])
        info = json.loads(sample["json"])
        for name in names:
            row = tensors[name]
            if table is not None:  # (C, H/f, W/f) of the row's bucket -> the cache's zero-padded (L,)
                row = torch.nn.functional.pad(row.flatten(), (0, manifest["row_shape"][0] - row.numel()))
            columns[name].append(row)
        for name in info_columns:
            if name == "bucket":
                info_columns[name].append(table["sizes"].index(info["bucket"]))
            else:
                info_columns[name].append(info[name])
        captions.append(sample["txt"].decode("utf-8"))
    shard_tensors = {name: torch.stack(rows) if rows else torch.zeros((0, *manifest["row_shape"]))
                     for name, rows in columns.items()}
    shard_tensors.update({name: torch.tensor(values, dtype=torch.long) for name, values in info_columns.items()})
    return manifest, Shard(shard_tensors, captions, [], manifest["build"])


def open_latent_shards_for_run(data_cfg: Any, cache_cfg: Any, family: str) -> LatentCache:
    """`cache.shards` of a training run, checked as `ensure_latent_cache` checks a cache directory."""
    from ldm.data.buckets import bucket_settings, bucket_sizes
    from ldm.latents.cache_key import vae_identity
    from ldm.vae.load_vae import vae_factor

    identity = vae_identity(Path(cache_cfg.vae).expanduser())
    buckets = bucket_settings(data_cfg)
    if buckets is not None:
        sizes = bucket_sizes(data_cfg.resolution, factor=vae_factor(identity.config), **buckets)
        buckets = {**buckets, "sizes": [list(size) for size in sizes]}
    return open_latent_shards(
        cache_cfg.shards, remote=RemoteOptions.from_data_config(data_cfg), vae=identity,
        resolution=data_cfg.resolution, random_flip=data_cfg.random_flip, center_crop=data_cfg.center_crop,
        caption_column=data_cfg.caption_column,
        dtype=cache_cfg.dtype, buckets=buckets, family=family,
    )
