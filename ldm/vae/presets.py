"""Named `AutoencoderKL` layouts. A preset is chosen by name in the config (`model.preset=sd-f8`)."""

from __future__ import annotations

from typing import Any

from diffusers import AutoencoderKL

from ldm.errors import UserError

# Each preset is the keyword arguments of diffusers' AutoencoderKL. The downsampling factor is
# 2 ** (len(block_out_channels) - 1): the last block of the encoder does not downsample.
VAE_PRESETS: dict[str, dict[str, Any]] = {
    # for tests: f=2, ~0.2M parameters
    "tiny": dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4),
    # small f=2 and f=4 models for 32-64 px domains on a CPU
    "small-f2": dict(block_out_channels=(64, 128), layers_per_block=1, norm_num_groups=32, latent_channels=4),
    "small-f4": dict(block_out_channels=(64, 128, 128), layers_per_block=2, norm_num_groups=32, latent_channels=4),
    # the bundled 32-px shapes demo: sized to train in ~25 minutes on a 2-core CPU (configs/vae/shapes-demo*.yaml)
    "shapes-f4": dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16, latent_channels=4),
    "shapes-f2": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16, latent_channels=4),
    # the layout of Stable Diffusion's kl-f8 VAE (~83.7M parameters)
    "sd-f8": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, latent_channels=4),
    # SDXL's VAE: SD's kl-f8 architecture retrained, with its own latent scale (stabilityai/sdxl-vae); its fp16
    # activations overflow, so diffusers runs it in fp32 (force_upcast)
    "sdxl-f8": {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32,
                "latent_channels": 4, "scaling_factor": 0.13025, "force_upcast": True},
}


def preset_kwargs(name: str) -> dict[str, Any]:
    if name not in VAE_PRESETS:
        raise UserError(f"unknown VAE preset '{name}': choose one of {', '.join(VAE_PRESETS)}")
    kwargs = dict(VAE_PRESETS[name])
    n = len(kwargs["block_out_channels"])
    kwargs["down_block_types"] = ("DownEncoderBlock2D",) * n
    kwargs["up_block_types"] = ("UpDecoderBlock2D",) * n
    return kwargs


def downsampling_factor(name: str) -> int:
    return 2 ** (len(preset_kwargs(name)["block_out_channels"]) - 1)


def build_vae(name: str, sample_size: int) -> AutoencoderKL:
    return AutoencoderKL(**preset_kwargs(name), sample_size=sample_size)
