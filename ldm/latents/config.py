"""The `cache` config section of the stage-2 config (read by train_ldm.py and cache_latents.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ldm.config import check


@dataclass
class LatentCacheConfig:
    dir: str = ""  # empty: <output_dir>/latents
    # Train from `ldm-latent-shards` output instead of a cache directory: a pattern such as
    # "s3://bucket/latents/latents-{00000..00009}.tar" (local, s3:// or https://; ldm/latents/shard_reader.py), read
    # with data.storage_options and data.remote_*; nothing is encoded and data.path is not read.
    shards: str = ""
    # A diffusers AutoencoderKL directory; stage 1 (train/train_vae.py) exports one to <its output_dir>/vae.
    vae: str = "runs/vae/vae"
    # fp32 stores the posterior exactly; fp16 halves RAM and disk (per image: 2 tensors (mean, std), x2 with flips,
    # of C*h*w values; e.g. 4x32x32 -> 64 KiB fp32 / 32 KiB fp16 with flips) but rounds the mean to ~3 significant
    # digits, which can exceed a well-trained VAE's posterior std.
    dtype: Literal["fp32", "fp16"] = "fp32"
    batch_size: int = 32  # images per VAE forward pass while encoding (x2 with flips)
    shard_size: int = 1024  # images per shard file; an interrupted build loses at most one shard per process
    # Replace a cache that is stale (built from another VAE, dataset or transform) or corrupt instead of refusing it.
    # A cache that matches is always reused.
    rebuild: bool = False
    # Cache the frozen text encoder's output for every caption (ldm/latents/text_cache.py), so training steps do
    # not run it: (77, D) values per distinct caption in the encoder's dtype (D=768 fp32: 231 KiB).
    text_embeddings: bool = False

    def validate(self) -> None:
        check(self.vae.strip() != "", "cache.vae", "must name the VAE directory (e.g. runs/vae/vae from stage 1)")
        check(self.batch_size >= 1, "cache.batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.shard_size >= 1, "cache.shard_size", f"must be >= 1, got {self.shard_size}")
        check(not (self.shards and self.text_embeddings), "cache.shards",
              "cannot be used with cache.text_embeddings=true (text embeddings are read from a cache directory only)")
