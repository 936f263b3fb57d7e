"""A tiny random Stable Diffusion model in the diffusers layout, for tests and CPU benchmarks (seconds, not hours).

Same component sizes as diffusers' own pipeline tests (`get_dummy_components`), with the real CLIP tokenizer built
offline, so the directory loads in both `ldm.pipeline.Pipeline` and diffusers' `StableDiffusionPipeline`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from ldm.text.tiny import tiny_clip_text_config
from ldm.text.tokenizer import offline_clip_tokenizer


def save_tiny_model(
    directory: str | Path,
    unet_in_channels: int = 4,
    prediction_type: str = "epsilon",
    seed: int = 0,
    tokenizer_cache: str | Path | None = None,
) -> Path:
    """Write a random tiny SD model (U-Net 32/64 channels, VAE factor 2, CLIP hidden 32) to `directory`.

    `unet_in_channels=9` makes an inpainting U-Net; `prediction_type` 'v_prediction' an SD 2.x-style model.
    """
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=unet_in_channels,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    )
    tokenizer = offline_clip_tokenizer(tokenizer_cache)
    text_encoder = CLIPTextModel(tiny_clip_text_config(hidden_size=32))
    # Stable Diffusion 1.x's own scheduler config (scaled-linear betas 0.00085..0.012, 1000 steps, leading spacing)
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False, prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(directory, safe_serialization=True)
    return Path(directory)
