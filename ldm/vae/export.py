"""Write a trained autoencoder in the diffusers format, atomically."""

from __future__ import annotations

from pathlib import Path

from diffusers import AutoencoderKL

from ldm.files import atomic_directory


def export_vae(vae: AutoencoderKL, directory: str | Path, scaling_factor: float | None) -> Path:
    """`config.json` + `diffusion_pytorch_model.safetensors`, loadable by `AutoencoderKL.from_pretrained(directory)`.

    `scaling_factor` (1 / std of the latents, measured on held-out images) goes into the config, where diffusers'
    pipelines read it, instead of SD's 0.18215 that only holds for SD's own VAE.
    """
    if scaling_factor is not None:
        vae.register_to_config(scaling_factor=float(scaling_factor))
    with atomic_directory(directory) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
    return Path(directory)
