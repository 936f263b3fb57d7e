"""Stage 2's output as a diffusers model directory: the trained U-Net with its VAE, text encoder and scheduler."""

from __future__ import annotations

import copy
from pathlib import Path

from diffusers import (
    AutoencoderKL, DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

from ldm.files import atomic_directory
from ldm.model_info import write_text_encoder_info
from ldm.text.config import TextEncoderConfig
from ldm.text.encoder import FrozenTextEncoder
from ldm.text.sdxl import SDXLTextEncoder

def export_model(
    directory: str | Path,
    *,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: FrozenTextEncoder | SDXLTextEncoder,
    noise_scheduler: DDPMScheduler | FlowMatchEulerDiscreteScheduler,
    text_cfg: TextEncoderConfig,
) -> Path:
    """Write `model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/` (safetensors).

    With a transformers CLIP text encoder the directory loads unchanged in `StableDiffusionPipeline.from_pretrained`
    (which samples with DDIM, built from the training schedule; a zero-terminal-SNR model with trailing spacing). A
    flow-matching model's scheduler is `FlowMatchEulerDiscreteScheduler`, which `StableDiffusionPipeline` cannot run
    (it has no `init_noise_sigma`): its parts load in diffusers and sample with that scheduler's loop, or in
    `ldm-generate --sampler euler`. With open_clip, `text_encoder/` cannot hold a
    transformers model; `ldm_model.json` records how to rebuild it. With SDXL's towers it is an SDXL directory
    (`_write_sdxl`) for `StableDiffusionXLPipeline.from_pretrained`. Written to a temporary sibling, then renamed.
    """
    # DDIM built from the training config: it keeps v-prediction, zero-terminal-SNR's rescaled betas and its trailing
    # spacing, which diffusers' pipelines then sample with; a flow-matching model ships its training scheduler
    # (FlowMatchEulerDiscreteScheduler) as it is
    scheduler = noise_scheduler if isinstance(noise_scheduler, FlowMatchEulerDiscreteScheduler) else \
        DDIMScheduler.from_config(noise_scheduler.config)
    with atomic_directory(directory) as tmp:
        if isinstance(text_encoder, SDXLTextEncoder):
            _write_sdxl(tmp, unet, vae, text_encoder, scheduler)
        else:
            _write_model(tmp, unet, vae, text_encoder, scheduler, text_cfg)
    return Path(directory)


def _write_sdxl(tmp: Path, unet, vae, text_encoder: SDXLTextEncoder, scheduler) -> None:
    """`text_encoder/` (CLIP-L), `text_encoder_2/` (bigG with its projection), `tokenizer/` and `tokenizer_2/`, with
    the model's `force_zeros_for_empty_prompt` in model_index.json. `tokenizer_2` pads with '!' (id 0) as diffusers
    ships it; ldm tokenizes with `tokenizer` for both towers and pads the second with id 0 (ldm/text/sdxl.py), so
    the two agree on every prompt without '!'."""
    first, second = text_encoder.towers
    tokenizer_2 = copy.deepcopy(text_encoder.tokenizer)
    tokenizer_2.pad_token = "!"
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=first.model, text_encoder_2=second.model, tokenizer=text_encoder.tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
        force_zeros_for_empty_prompt=text_encoder.force_zeros_for_empty_prompt, add_watermarker=False,
    )
    pipe.save_pretrained(tmp, safe_serialization=True)


def _write_model(tmp: Path, unet, vae, text_encoder: FrozenTextEncoder, scheduler, text_cfg: TextEncoderConfig) -> None:
    if text_cfg.kind == "clip":
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder.model, tokenizer=text_encoder.tokenizer, unet=unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.save_pretrained(tmp, safe_serialization=True)
    else:
        for name, part in (("unet", unet), ("vae", vae), ("scheduler", scheduler)):
            part.save_pretrained(tmp / name, **({"safe_serialization": True} if name != "scheduler" else {}))
    # how our pipeline rebuilds what diffusers' layout cannot express (an open_clip text encoder, the layer)
    write_text_encoder_info(tmp, {"kind": text_cfg.kind, "path": text_cfg.path, "pretrained": text_cfg.pretrained,
                                  "layer": text_cfg.layer})
