"""Stage 2's input: the dataset encoded once by a trained VAE, as sharded safetensors plus a manifest.

`ensure_latent_cache` builds (or finishes, or reuses) the cache on all processes; `LatentCache` reads and validates
it; `LatentCache.dataset(seed)` is a keyed torch `Dataset` of posterior means and stds for a resumable sampler, and
`sample_latents` turns a batch into fresh scaled latents. See `ldm.latents.cache` for the on-disk format.
"""

from ldm.latents.build import ensure_latent_cache, shard_plan
from ldm.latents.cache import (
    CorruptCacheError, LatentCache, LatentDataset, MissingCacheError, StaleCacheError, VAEIdentity, collate_latents,
    sample_latents, vae_identity,
)
from ldm.latents.config import LatentCacheConfig

__all__ = [
    "CorruptCacheError", "LatentCache", "LatentCacheConfig", "LatentDataset", "MissingCacheError",
    "StaleCacheError", "VAEIdentity", "collate_latents", "ensure_latent_cache", "sample_latents", "shard_plan",
    "vae_identity",
]
