"""Build an SDXL model (base, refiner, inpainting) from a single file, offline: the diffusers/transformers modules
(`UNet2DConditionModel`, `AutoencoderKL`, `CLIPTextModel` for CLIP ViT-L, `CLIPTextModelWithProjection` for
OpenCLIP ViT-bigG) and both tokenizers, from the configs `detect` found (ldm/singlefile/sdxl.py) and the weights
renamed by diffusers' own converters, loaded strictly (ldm/singlefile/load.py `load_strict`).

`load_sdxl_modules` returns the raw modules (what `ldm-convert` writes as a diffusers directory); `sdxl_components`
is the one place they are wrapped for the pipeline.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ldm.singlefile import keys
from ldm.singlefile.detect import Detected
from ldm.singlefile.load import (LoadedFile, build_unet, build_vae, cast_state, generation_parts, load_strict,
                                 load_vae_override, read_tensors)
from ldm.singlefile.sdxl import SDXL_SCHEDULER, text_prefixes

log = logging.getLogger(__name__)


@dataclass
class SDXLModules:
    unet: Any  # UNet2DConditionModel with addition_embed_type "text_time"
    vae: Any  # AutoencoderKL (scaling factor 0.13025 for SDXL's own)
    tokenizer: Any  # CLIPTokenizer for CLIP ViT-L (pads with the end token); None for a refiner
    text_encoder: Any  # CLIPTextModel (CLIP ViT-L); None for a refiner
    tokenizer_2: Any  # CLIPTokenizer for bigG (pad token '!', id 0, as open_clip pads)
    text_encoder_2: Any  # CLIPTextModelWithProjection (OpenCLIP ViT-bigG)
    scheduler_config: dict[str, Any]  # with the prediction type that is used
    pipeline: dict[str, Any]  # model_index.json's _class_name, force_zeros_for_empty_prompt, requires_aesthetics_score


def load_sdxl_modules(d: Detected, device: torch.device, dtype: torch.dtype, vae=None,
                      prediction_type: str | None = None) -> SDXLModules:
    """Every part of an SDXL file (or `vae`, a VAE file or directory, instead of its own), on `device` in `dtype`."""
    prediction = generation_parts(d, d.text_config_2, "text encoders (conditioner.embedders.*)", vae,
                                  prediction_type)
    clip_prefix, bigg_prefix = text_prefixes(d.family)
    prefixes = (keys.UNET_PREFIX, bigg_prefix) + ((clip_prefix,) if d.text_config else ())
    if vae is None:
        prefixes += (keys.VAE_PREFIX,)
    state = cast_state(read_tensors(d.path, prefixes), dtype)
    unet = build_unet(d.unet_config, state, d.path)
    model_vae = build_vae(d.vae_config, state, d.path) if vae is None else load_vae_override(
        vae, (d.vae_config or {}).get("scaling_factor"), dtype, sdxl=True)
    text_encoder = build_clip_l(d, state) if d.text_config else None
    text_encoder_2 = build_bigg(d, state)
    del state
    tokenizer, tokenizer_2 = sdxl_tokenizers(d)
    for module in (unet, model_vae, text_encoder, text_encoder_2):
        if module is not None:
            module.to(device).eval().requires_grad_(False)
    scheduler = {**(d.scheduler_config or SDXL_SCHEDULER), "prediction_type": prediction}
    return SDXLModules(unet, model_vae, tokenizer, text_encoder, tokenizer_2, text_encoder_2, scheduler,
                       dict(d.pipeline))


def build_clip_l(d: Detected, state: keys.State):
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel


    with init_empty_weights(include_buffers=False):
        model = CLIPTextModel(CLIPTextConfig.from_dict(d.text_config))
    return load_strict(model, keys.clip_from_original(state, text_prefixes(d.family)[0]), "CLIP ViT-L text encoder",
                   d.path)


def build_bigg(d: Detected, state: keys.State):
    """OpenCLIP ViT-bigG as transformers' `CLIPTextModelWithProjection` (whose weights keep a `text_model.` level)."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection


    config = CLIPTextConfig.from_dict(d.text_config_2)
    with init_empty_weights(include_buffers=False):
        model = CLIPTextModelWithProjection(config)
    converted = keys.open_clip_from_original(state, config.hidden_size, text_prefixes(d.family)[1], projection=True)
    converted = {k if k == "text_projection.weight" else "text_model." + k: v for k, v in converted.items()}
    return load_strict(model, converted, "OpenCLIP ViT-bigG text encoder", d.path)


def sdxl_tokenizers(d: Detected):
    """(tokenizer or None for a refiner, tokenizer_2): CLIP's BPE vocabulary from open_clip; the first pads with the
    end token (OpenAI CLIP), the second with '!' (id 0, as open_clip pads), as SDXL's own tokenizers do."""
    from ldm.text.tokenizer import offline_clip_tokenizer

    def make(settings: dict[str, Any], pad: str | None):
        tokenizer = offline_clip_tokenizer()
        pad = settings.get("pad_token", pad)
        if pad is not None and pad != tokenizer.pad_token:
            tokenizer.pad_token = pad
        if "model_max_length" in settings:
            tokenizer.model_max_length = int(settings["model_max_length"])
        return tokenizer

    return (make(d.tokenizer, None) if d.text_config else None), make(d.tokenizer_2, "!")


def sdxl_components(m: SDXLModules, name: str, d: Detected):
    """The pipeline's `Components` for an SDXL file: both towers as one `SDXLTextEncoder`, which tokenizes with the
    ordinary CLIP tokenizer and pads bigG's ids with 0 itself (ldm/text/sdxl.py says why not `tokenizer_2`)."""
    from ldm.text.sdxl import SDXLTextEncoder
    from ldm.text.tokenizer import offline_clip_tokenizer

    force_zeros = bool(m.pipeline.get("force_zeros_for_empty_prompt", d.family == "sdxl"))
    text = SDXLTextEncoder.from_models(m.tokenizer or offline_clip_tokenizer(), m.text_encoder, m.text_encoder_2,
                                       force_zeros_for_empty_prompt=force_zeros)
    return LoadedFile(m.unet, m.vae, text, m.scheduler_config, name, d)
