"""Open a trained VAE: a diffusers `AutoencoderKL` directory (`config.json` + safetensors weights), frozen.

Stage 2 reads the VAE that stage 1 exported (ldm/vae/export.py) to encode the latent cache and to decode validation
samples. `check_vae` reads only `config.json` and the weight files' headers (ldm/weights.py), so a missing
directory, a pickled, truncated or git-lfs-pointer weight file, or a resolution the VAE cannot downsample is refused
in one line before any work starts; `load_vae` checks the same, then loads the weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ldm.errors import UserError
from ldm.weights import check_weights

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

HINT = "set cache.vae to a diffusers AutoencoderKL directory (stage 1 exports one to <output_dir>/vae)"


def vae_factor(config: dict[str, Any]) -> int:
    """Pixels per latent pixel: every down block but the last halves the size (8 for SD's four blocks)."""
    # diffusers' AutoencoderKL default when the config leaves the key out: one block, factor 1
    return 2 ** (len(config.get("block_out_channels", (64,))) - 1)


def vae_directory(path: str | Path) -> Path:
    """`path`, or its `vae/` when it is a model directory (a diffusers pipeline, or stage 2's `model/`)."""
    path = Path(path).expanduser()
    return path / "vae" if (path / "vae" / "config.json").is_file() else path


def check_vae(directory: str | Path, resolution: int | None = None, hint: str = HINT) -> dict[str, Any]:
    """Refuse a VAE directory that cannot be loaded, or whose factor does not divide `resolution` (data.resolution),
    with a one-line `UserError` ending in `hint`; return its config. Reads no weights, only their headers."""
    path = Path(directory).expanduser()
    config_file = path / "config.json"
    if not config_file.is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise UserError(f"VAE directory '{path}' {what}: {hint}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"VAE config '{config_file}' is unreadable ({error}): {hint}") from error
    if not isinstance(config, dict) or config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        kind = config.get("_class_name") if isinstance(config, dict) else type(config).__name__
        raise UserError(f"'{path}' holds a {kind}, not an AutoencoderKL: {hint}")
    check_weights(path)  # pickles, truncated files and git-lfs pointers get a message naming the file
    if resolution is not None and resolution % vae_factor(config):
        raise UserError(f"config key 'data.resolution': {resolution} is not divisible by the VAE's "
                        f"downsampling factor {vae_factor(config)} ({path})")
    return config


def load_vae(
    directory: str | Path, resolution: int | None = None, device: torch.device | str | None = None
) -> AutoencoderKL:
    """`check_vae`, then the VAE itself (safetensors only), in eval mode, without gradients, on `device`."""
    from diffusers import AutoencoderKL  # deferred: importing diffusers takes seconds

    check_vae(directory, resolution)
    path = Path(directory).expanduser()
    try:
        vae = AutoencoderKL.from_pretrained(path, use_safetensors=True)
    except (OSError, ValueError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"cannot load the VAE from '{path}' ({first_line}): {HINT}") from error
    if device is not None:
        vae.to(device)
    return vae.eval().requires_grad_(False)
