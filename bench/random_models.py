"""Stable Diffusion 1.5 and SDXL with random weights, at their full sizes or tiny, as diffusers pipelines: the same
weights for our pipeline and diffusers' in the benchmarks, with no download.

    sd15_pipeline("full")   # U-Net 860M (ldm/unet/presets.py "sd15"), kl-f8 VAE 84M, CLIP ViT-L/14 text 123M
    sdxl_pipeline("full")   # U-Net 2.6B (preset "sdxl"), VAE "sdxl-f8", CLIP ViT-L/14 + OpenCLIP bigG/14 text (695M)
    sd15_pipeline("tiny"), sdxl_pipeline("tiny")   # ldm/pipeline/tiny.py's models, for tests (seconds on a CPU)

Full sizes are the published models' layouts (the package's presets in ldm/unet/presets.py and ldm/vae/presets.py,
and the text encoders' config.json of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-xl-base-1.0);
random initialisation gives the same FLOPs, memory and kernel shapes as the trained weights, not the same images. `save_pretrained(DIR)` of either pipeline is a diffusers-format model directory that `ldm.models.spec
.inspect_model` and `Pipeline.open` read.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from ldm.pipeline.tiny import save_tiny_model, save_tiny_sdxl_model
from ldm.text.tiny import tiny_clip_text_config
from ldm.text.tokenizer import offline_clip_tokenizer
from ldm.unet.presets import build_unet
from ldm.vae.presets import preset_kwargs

SIZES = ("tiny", "full")

# SD 1.x/2.x and SDXL share the schedule: scaled-linear betas 0.00085..0.012 over 1000 steps, leading spacing
_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 steps_offset=1)


def sd15_unet() -> UNet2DConditionModel:
    return build_unet("sd15", sample_size=64, latent_channels=4, cross_attention_dim=768)


def sdxl_unet() -> UNet2DConditionModel:
    return build_unet("sdxl", sample_size=128, latent_channels=4, cross_attention_dim=2048)


def _load(cls, save, device: torch.device, dtype: torch.dtype):
    """A tiny model from ldm/pipeline/tiny.py, through a temporary directory (the only way it is written)."""
    with tempfile.TemporaryDirectory(prefix="bench-tiny-") as d:
        pipe = cls.from_pretrained(save(Path(d)), torch_dtype=dtype, use_safetensors=True,
                                   **({} if cls is StableDiffusionXLPipeline else
                                      dict(safety_checker=None, requires_safety_checker=False)))
    return pipe.to(device)


def sd15_pipeline(size: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  seed: int = 0) -> StableDiffusionPipeline:
    """A random SD 1.5-shaped StableDiffusionPipeline on `device` in `dtype` (built there: fast on a GPU)."""
    if size == "tiny":
        return _load(StableDiffusionPipeline, lambda d: save_tiny_model(d, seed=seed), torch.device(device), dtype)
    torch.manual_seed(seed)
    with torch.device(device):
        unet = sd15_unet()
        vae = AutoencoderKL(**preset_kwargs("sd-f8"), sample_size=512)
        text_encoder = CLIPTextModel(tiny_clip_text_config(hidden_size=768, layers=12, heads=12))  # ViT-L/14's text
    scheduler = PNDMScheduler(**_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=offline_clip_tokenizer(), unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipe.to(dtype=dtype)


def sdxl_pipeline(size: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  seed: int = 0) -> StableDiffusionXLPipeline:
    """A random SDXL-base-shaped StableDiffusionXLPipeline on `device` in `dtype`."""
    if size == "tiny":
        return _load(StableDiffusionXLPipeline, lambda d: save_tiny_sdxl_model(d, seed=seed), torch.device(device),
                     dtype)
    torch.manual_seed(seed)
    big_g = tiny_clip_text_config(hidden_size=1280, layers=32, heads=20)  # OpenCLIP ViT-bigG/14's text tower
    big_g.hidden_act, big_g.pad_token_id = "gelu", 0  # bigG: gelu, pads with 0 (as ldm/pipeline/tiny.py's)
    with torch.device(device):
        unet = sdxl_unet()
        vae = AutoencoderKL(**preset_kwargs("sdxl-f8"), sample_size=1024)
        text_encoder = CLIPTextModel(tiny_clip_text_config(hidden_size=768, layers=12, heads=12))
        text_encoder_2 = CLIPTextModelWithProjection(big_g)
    tokenizer_2 = offline_clip_tokenizer()
    tokenizer_2.pad_token = "!"
    scheduler = EulerDiscreteScheduler(**_SCHEDULE, timestep_spacing="leading", interpolation_type="linear")
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=offline_clip_tokenizer(),
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        add_watermarker=False)
    return pipe.to(dtype=dtype)
