"""A finished latent cache written out as webdataset tar shards, for pipelines that stream their training data.

    python -m ldm.latents.shard_writer CACHE_DIR "OUT/latents-%05d.tar" [--per-shard 10000]

One sample per cached image, keyed by its zero-padded dataset index (`000000017`):

    <key>.latents.safetensors   mean, std (C, h, w), and flip_mean, flip_std when built with flips; unscaled,
                                in the cache's dtype, with the VAE's scaling/shift factor in the metadata; with
                                loss masks also mask (1, h, w) [and flip_mask] (`ldm.data.masks`)
    <key>.txt                   the caption the latents were cached with
    <key>.text.safetensors      `embedding` (77, D): the frozen text encoder's output for that caption, when the
                                cache directory holds a text-embedding cache (`cache.text_embeddings: true`); the
                                empty caption's (for caption dropout) goes into every shard as `empty.text.safetensors`
    <key>.json                  {"index", "scaling_factor", "shift_factor", "build"}, and "bucket": [W, H] pixels
                                for a cache built with aspect-ratio buckets (the latents are then (C, H/f, W/f));
                                SDXL's micro-conditioning: "original_size" [h, w], "crop_top_left" [top, left],
                                "target_size" [H, W], and "flip_crop_top_left" with flips (the flipped copy's
                                mirrored offset; `ldm.latents.micro_conditioning`)

and, first in every shard, one sample keyed `cache`:

    cache.manifest              JSON: the cache's manifest (VAE identity, data settings, dataset size, skipped images,
                                bucket table; without the file list) plus "row_shape" (a cache row's tensor shape),
                                so the shards alone rebuild the in-memory cache (`ldm.latents.shard_reader`)

Safetensors rather than webdataset's `.pth` (a pickle) so reading a shard never runs code. Each tar (one shard of
small latents) is built in memory and written through `ldm.files.atomic_write_bytes`, so a shard on disk is always
complete. Training reads them with `cache.shards: PATTERN` (local or s3:// / https://, `ldm.latents.shard_reader`),
so nodes without a shared disk need no cache directory; the cache directory (verified by `LatentCache.read`) stays
the source they are exported from.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from safetensors.torch import save as save_safetensors

from ldm.errors import OneLineArgumentParser, UserError, exit_on_user_error
from ldm.files import atomic_write_bytes, os_reason
from ldm.latents.cache import LatentCache
from ldm.latents.text_cache import FILE_NAME as TEXT_FILE_NAME
from ldm.latents.text_cache import TextEmbeddingCache

MANIFEST_KEY = "cache"  # the sample holding the cache's manifest, first in every shard
# JSON, but not named .json: readers that take every `.json` member for a sample's info skip it
MANIFEST_EXT = "manifest"


def write_latent_shards(cache: LatentCache, pattern: str, per_shard: int = 10_000) -> list[Path]:
    """Write `cache` as tar shards named `pattern % k` (e.g. "out/latents-%05d.tar"); the paths written."""
    import webdataset as wds  # deferred: heavy, and only this exporter needs it

    if "%" not in pattern:
        raise UserError(f"shard pattern '{pattern}' has no %-placeholder for the shard number: use e.g. latents-%05d.tar")
    if per_shard < 1:
        raise UserError(f"--per-shard must be at least 1, got {per_shard}")
    if len(cache) == 0:
        raise UserError(f"latent cache {cache.directory} has no rows (every image was skipped): nothing to export")
    dtype = cache.tensors["mean"].dtype
    meta = {"scaling_factor": cache.scaling_factor, "shift_factor": cache.shift_factor, "build": cache.manifest["build"]}
    bucket_ids = cache.bucket_ids(range(len(cache)))
    text = None
    if (Path(cache.directory) / TEXT_FILE_NAME).exists():
        # verified as training verifies it (corrupt, or built for other captions: refused); any encoder's is fine
        text = TextEmbeddingCache.open(Path(cache.directory) / TEXT_FILE_NAME, {}, cache.captions)
    manifest = {key: value for key, value in cache.manifest.items() if key != "shards"}
    manifest["row_shape"] = list(cache.tensors["mean"].shape[1:])  # (C, h, w), or (L,) zero-padded with buckets
    written = []
    for k, start in enumerate(range(0, len(cache), per_shard)):
        buffer = io.BytesIO()
        with wds.TarWriter(buffer, encoder=False) as sink:
            sink.write({"__key__": MANIFEST_KEY, MANIFEST_EXT: json.dumps(manifest).encode("utf-8")})
            if text is not None:
                sink.write({"__key__": "empty", "text.safetensors": save_safetensors(
                    {"embedding": text.empty_embedding()[0].contiguous()})})
            for position in range(start, min(start + per_shard, len(cache))):
                index = int(cache.indices[position])
                # the cache's own row accessor: (C, h, w) of the row's bucket, not the zero-padded flat row
                rows = [("", cache.row(position))] + ([("flip_", cache.row(position, flipped=True))]
                                                     if cache.has_flips else [])
                names = ("mean", "std", "mask") if cache.has_masks else ("mean", "std")  # mask: (1, h, w) loss weights
                tensors = {prefix + name: row[name].to(dtype).contiguous() for prefix, row in rows for name in names}
                info = {"index": index, **meta}
                for prefix, row in rows:  # SDXL's time ids, in pixels (`ldm.latents.micro_conditioning`)
                    info[prefix + "crop_top_left"] = list(row["crop_top_left"])
                info.update(original_size=list(rows[0][1]["original_size"]),
                            target_size=list(rows[0][1]["target_size"]))
                if bucket_ids is not None:
                    info["bucket"] = list(cache.buckets[bucket_ids[position]])  # [W, H] pixels
                sample = {
                    "__key__": f"{index:09d}",
                    "latents.safetensors": save_safetensors(tensors, metadata={k: str(v) for k, v in meta.items()}),
                    "txt": cache.captions[position].encode("utf-8"),
                    "json": json.dumps(info).encode("utf-8"),
                }
                if text is not None:
                    caption = cache.captions[position]
                    sample["text.safetensors"] = save_safetensors({"embedding": text.encode([caption])[0].contiguous()})
                sink.write(sample)
        path = Path(pattern % k)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, buffer.getvalue())
        except OSError as e:
            raise UserError(f"cannot write {path}: {os_reason(e)}") from None
        written.append(path)
    return written


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = OneLineArgumentParser(prog="ldm-latent-shards", description=__doc__.splitlines()[0])
    parser.add_argument("cache_dir")
    parser.add_argument("pattern", help='output names with a %%-placeholder, e.g. "out/latents-%%05d.tar"')
    parser.add_argument("--per-shard", type=int, default=10_000, help="samples per tar shard")
    args = parser.parse_args(argv)
    paths = write_latent_shards(LatentCache.read(args.cache_dir), args.pattern, args.per_shard)
    print(f"wrote {len(paths)} shards: {paths[0]} .. {paths[-1]}")


if __name__ == "__main__":
    main()
