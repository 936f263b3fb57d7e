"""What the latent cache is keyed on: the VAE's identity (its weights and config, not its path) and everything else
the cached latents depend on (`CacheSpec`). A cache whose manifest differs from the spec is stale, and
`differences` names each difference (`ldm.latents.cache.LatentCache.open`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldm.errors import UserError
from ldm.files import sha256_file
from ldm.vae.load_vae import HINT, check_vae

# Of the cache's files (ldm.latents.cache); a newer one is refused, an older one is stale (rebuilt with
# cache.rebuild=true). 2: rows hold the original size and crop offsets (ldm.latents.micro_conditioning).
FORMAT_VERSION = 2

# The model family a cache was built for (manifest data.family; text-embedding cache key "family"), and how messages
# name it. Latents do not depend on it, so it is left out of the build id: a rebuild keeps the shards and rewrites
# the manifest only.
FAMILY_NAMES = {"sd": "an SD 1.x/2.x model", "sdxl": "an SDXL model"}

# ----------------------------------------------------------------------------------------------------------------
# VAE identity
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VAEIdentity:
    """What makes latents comparable: the weights and the config (scaling_factor included), not the path."""

    weights_sha256: str
    config_sha256: str
    config: dict[str, Any]  # config.json without diffusers' bookkeeping keys ("_class_name", "_diffusers_version")
    path: str = ""

    @property
    def scaling_factor(self) -> float:
        return float(self.config.get("scaling_factor", 1.0))

    @property
    def shift_factor(self) -> float | None:
        value = self.config.get("shift_factor")
        return None if value is None else float(value)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "weights_sha256": self.weights_sha256,
            "config_sha256": self.config_sha256,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "config": self.config,
        }


def vae_identity(vae_dir: str | Path) -> VAEIdentity:
    """Hash a diffusers AutoencoderKL directory (reads its weights once; ~1 s per 300 MB)."""
    directory = Path(vae_dir).expanduser()
    raw = check_vae(directory)  # one-line errors for a missing, unreadable, non-VAE or pickle-only directory
    # Bookkeeping keys change with the diffusers version that saved the file, not with the model.
    config = {k: v for k, v in sorted(raw.items()) if not k.startswith("_")}
    weights = hashlib.sha256()
    for file in _weight_files(directory):
        weights.update(file.name.encode() + b"\n")
        weights.update(sha256_file(file).encode() + b"\n")
    return VAEIdentity(weights.hexdigest(), _sha256_json(config), config, str(directory.resolve()))


def _weight_files(directory: Path) -> list[Path]:
    """The files `AutoencoderKL.from_pretrained(directory)` loads (no variants)."""
    single = directory / "diffusion_pytorch_model.safetensors"
    if single.is_file():
        return [single]
    index = directory / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [index] + [directory / name for name in shards]
    raise UserError(f"VAE directory '{directory}' has no diffusion_pytorch_model weights: {HINT}")


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# What a cache is built from
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheSpec:
    """Everything the cached latents depend on. Two builds with equal specs produce interchangeable shards."""

    vae: VAEIdentity
    data_fingerprint: str
    resolution: int
    center_crop: bool
    random_flip: bool
    caption_column: str | None
    dtype: str  # a key of DTYPES
    buckets: dict[str, Any] | None = None  # `ldm.data.buckets.bucket_settings` plus "sizes"; None: square crops
    family: str = "sd"  # a key of FAMILY_NAMES: the model the run trains (not in the build id)
    masks: str | None = None  # `ldm.data.masks.masks_fingerprint` of the loss masks; None: no masks

    def build_id(self) -> str:
        key = {
            "version": FORMAT_VERSION,
            "vae": [self.vae.weights_sha256, self.vae.config_sha256],
            "data": [self.data_fingerprint, self.caption_column, self.resolution, self.center_crop],
            "random_flip": self.random_flip,
            "dtype": self.dtype,
        }
        if self.buckets is not None:  # left out otherwise, so square caches keep their build ids
            key["buckets"] = self.buckets
        if self.masks is not None:  # likewise: caches without masks keep their build ids
            key["masks"] = self.masks
        return _sha256_json(key)[:32]


UNCHECKED: Any = object()  # `LatentCache.open` leaves an argument with this default out of the staleness check


def differences(manifest: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """Human-readable "cache != this run" differences between a manifest and what a run expects."""
    diffs = []
    vae: VAEIdentity | None = expected.get("vae")
    if vae is not None:
        built = manifest["vae"]
        old, new = built["weights_sha256"], vae.weights_sha256
        if old != new:
            diffs.append(f"a different VAE (weights sha256 {old[:8]}.. != {new[:8]}..)")
        elif built["config_sha256"] != vae.config_sha256:
            old_cfg, new_cfg = built["config"], vae.config
            keys = sorted(k for k in old_cfg.keys() | new_cfg.keys() if old_cfg.get(k) != new_cfg.get(k))
            changes = ", ".join(f"{k} {old_cfg.get(k)!r} != {new_cfg.get(k)!r}" for k in keys[:3])
            diffs.append(f"a different VAE config ({changes})")
    data = manifest["data"]
    fingerprint = expected.get("data_fingerprint")
    if fingerprint is not None and data["fingerprint"] != fingerprint:
        diffs.append(
            f"a different dataset (fingerprint {data['fingerprint'][:8]}.. != {fingerprint[:8]}..: "
            "files were added, removed or changed)"
        )
    for key in ("resolution", "center_crop", "random_flip", "caption_column"):
        if key in expected and data[key] != expected[key]:
            diffs.append(f"{key} {data[key]!r} != {expected[key]!r}")
    if "buckets" in expected and data.get("buckets") != expected["buckets"]:
        def settings(b: dict[str, Any] | None) -> str:
            return "off" if b is None else ", ".join(f"{k}={v}" for k, v in b.items() if k != "sizes")

        diffs.append(f"buckets {settings(data.get('buckets'))} != {settings(expected['buckets'])}")
    if "masks" in expected and data.get("masks") != expected["masks"]:
        def masks(fingerprint: str | None) -> str:
            return "no loss masks" if fingerprint is None else f"loss masks {fingerprint[:8]}.."

        diffs.append(f"{masks(data.get('masks'))} != {masks(expected['masks'])}")
    if expected.get("dtype") is not None and manifest["dtype"] != expected["dtype"]:
        diffs.append(f"dtype {manifest['dtype']} != {expected['dtype']}")
    return diffs
