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


SDXL_KINDS = ("base", "refiner", "inpaint")


def save_tiny_sdxl_model(
    directory: str | Path, kind: str = "base", seed: int = 0, tokenizer_cache: str | Path | None = None
) -> Path:
    """Write a random tiny SDXL model in the diffusers layout to `directory`, shaped as diffusers' own SDXL tests
    shape theirs (`get_dummy_components`): U-Net 32/64 channels with "text_time" micro-conditioning (time-id
    embedding 8), VAE factor 2 with SDXL's scaling factor 0.13025, text towers of hidden size 32.

    kind 'base': CLIP-L-like `text_encoder` + bigG-like `text_encoder_2` (with projection), context 32 + 32 = 64,
    pooled 32, 6 time ids; 'inpaint': the same with a 9-channel U-Net; 'refiner': `text_encoder_2` only (context
    32), 5 time ids (sizes, crop and aesthetic score), `requires_aesthetics_score`. Loads in diffusers'
    `StableDiffusionXL{,Img2Img,Inpaint}Pipeline`.
    """
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLInpaintPipeline,
        StableDiffusionXLPipeline,
    )
    from transformers import CLIPTextModelWithProjection

    if kind not in SDXL_KINDS:
        raise ValueError(f"kind must be one of {SDXL_KINDS}, got {kind!r}")
    torch.manual_seed(seed)
    refiner = kind == "refiner"
    pooled, time_embed = 32, 8
    time_ids = 5 if refiner else 6
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=9 if kind == "inpaint" else 4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_embed, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=time_ids * time_embed + pooled, cross_attention_dim=32 if refiner else 64,
        norm_num_groups=1,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, scaling_factor=0.13025,
    )
    # SDXL's own scheduler config (stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False,
    )
    tokenizer = offline_clip_tokenizer(tokenizer_cache)
    # SDXL's tokenizer_2 pads with '!' (id 0), as open_clip does
    tokenizer_2 = offline_clip_tokenizer(tokenizer_cache)
    tokenizer_2.pad_token = "!"
    text_encoder = None if refiner else CLIPTextModel(tiny_clip_text_config(hidden_size=32, layers=3))
    config_2 = tiny_clip_text_config(hidden_size=32, layers=3)
    config_2.hidden_act, config_2.pad_token_id, config_2.projection_dim = "gelu", 0, pooled  # bigG: gelu, pads with 0
    text_encoder_2 = CLIPTextModelWithProjection(config_2)
    parts = dict(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=None if refiner
                 else tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)
    if refiner:
        pipe = StableDiffusionXLImg2ImgPipeline(**parts, requires_aesthetics_score=True,
                                                force_zeros_for_empty_prompt=False, add_watermarker=False)
    else:
        cls = StableDiffusionXLInpaintPipeline if kind == "inpaint" else StableDiffusionXLPipeline
        pipe = cls(**parts, force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.save_pretrained(directory, safe_serialization=True)
    return Path(directory)
