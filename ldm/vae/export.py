"""Write a trained autoencoder in the diffusers format, atomically."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from diffusers import AutoencoderKL


def export_vae(vae: AutoencoderKL, directory: str | Path, scaling_factor: float | None) -> Path:
    """`config.json` + `diffusion_pytorch_model.safetensors`, loadable by `AutoencoderKL.from_pretrained(directory)`.

    `scaling_factor` (1 / std of the latents, measured on held-out images) goes into the config, where diffusers'
    pipelines read it, instead of SD's 0.18215 that only holds for SD's own VAE. The files are written to a temporary
    sibling and renamed into place, so an interrupted export never leaves a half-written model behind.
    """
    directory = Path(directory)
    tmp = directory.with_name(f".tmp-{directory.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    if scaling_factor is not None:
        vae.register_to_config(scaling_factor=float(scaling_factor))
    vae.save_pretrained(tmp, safe_serialization=True)
    old = directory.with_name(f".old-{directory.name}")
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory
