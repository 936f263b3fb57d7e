"""SDXL single files in Stability's original (sgm) layout, recognised from their names and shapes alone.

What such a file holds (names as in `sd_xl_base_1.0.safetensors`, read by diffusers' `single_file_utils`):
- `model.diffusion_model.*`: the U-Net, as SD's but with `label_emb.0.{0,2}` (the "text_time" micro-conditioning
  MLP: `label_emb.0.0.weight` is (1280, adm_in), adm_in = time ids x 256 + bigG's pooled 1280: 2816 = 6 ids for the
  base, 2560 = 5 for the refiner, whose extra id is the aesthetic score), per-level transformer depth and no
  attention in the first level. A 9-channel `input_blocks.0.0.weight` is the inpainting model.
- `first_stage_model.*`: SD's kl-f8 VAE architecture with SDXL's latent scale 0.13025 (shapes cannot tell the two
  VAEs apart; the family does).
- base: `conditioner.embedders.0.transformer.text_model.*` (CLIP ViT-L, transformers' names) and
  `conditioner.embedders.1.model.*` (OpenCLIP ViT-bigG: packed `attn.in_proj_weight`, `text_projection` (D, P));
  refiner: bigG alone as `conditioner.embedders.0.model.*`.

The configs are the presets (ldm/unet/presets.py `sdxl`, `sdxl-refiner`; ldm/vae/presets.py `sdxl-f8`; the text
towers and scheduler below, as in stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0) with the sizes of this
file, so a full-size file gives exactly the presets and a tiny file in the same layout (tests) loads too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ldm.errors import UserError
from ldm.singlefile.detected import (
    Detected,
    Shapes,
    blocks,
    text_config_from_shapes,
    unet_config_from_shapes,
    vae_config_from_shapes,
)
from ldm.singlefile.keys import (
    SDXL_BIGG_PREFIX,
    SDXL_CLIP_PREFIX,
    SDXL_REFINER_BIGG_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
)

SDXL_SCALING_FACTOR = 0.13025
LABEL_EMB = f"{UNET_PREFIX}label_emb.0.0.weight"  # (time_embed_dim, adm_in)
TIME_IDS = {"sdxl": 6, "sdxl-refiner": 5}  # (h, w, top, left, h, w) | (h, w, top, left, aesthetic score)
ADM_IN = {"sdxl": 2816, "sdxl-refiner": 2560}  # the full-size models' label_emb in-features

# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json (the refiner's is the same)
SDXL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "clip_sample": False, "interpolation_type": "linear",
                  "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0,
                  "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
                  "trained_betas": None, "use_karras_sigmas": False}
# the full-size text towers (transformers CLIPTextConfig fields): CLIP ViT-L/14 and OpenCLIP ViT-bigG/14
CLIP_L = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
          "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768}
BIGG = {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
        "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 1280}
# model_index.json's flags: the base zeroes the empty prompt's embedding (no negative prompt); the refiner conditions
# on an aesthetic score
PIPELINE = {"sdxl": {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True},
            "sdxl-inpaint": {"_class_name": "StableDiffusionXLInpaintPipeline", "force_zeros_for_empty_prompt": True,
                             "requires_aesthetics_score": False},
            "sdxl-refiner": {"_class_name": "StableDiffusionXLImg2ImgPipeline", "force_zeros_for_empty_prompt": False,
                             "requires_aesthetics_score": True}}


def text_prefixes(family: str) -> tuple[str | None, str]:
    """(CLIP ViT-L prefix or None, bigG prefix) of an SDXL family's text encoders."""
    return (None, SDXL_REFINER_BIGG_PREFIX) if family == "sdxl-refiner" else (SDXL_CLIP_PREFIX, SDXL_BIGG_PREFIX)


def sdxl_family(shapes: Shapes) -> str | None:
    """'sdxl' | 'sdxl-refiner' when the names are SDXL's, else None. The text encoders decide; a U-Net-only file is
    SDXL when its `label_emb.0.0` takes a full-size model's time ids (SD's unCLIP also has a label_emb.0.0)."""
    if any(k.startswith((SDXL_CLIP_PREFIX, SDXL_BIGG_PREFIX)) for k in shapes):
        return "sdxl"
    if any(k.startswith(SDXL_REFINER_BIGG_PREFIX) for k in shapes):
        return "sdxl-refiner"
    if LABEL_EMB in shapes and not any(k.startswith("cond_stage_model.") for k in shapes):
        adm = shapes[LABEL_EMB][1]
        return next((family for family, n in ADM_IN.items() if n == adm), None)
    return None


def detect_sdxl(shapes: Shapes, path: Path, family: str) -> Detected:
    """An SDXL file's configs from its shapes (the presets at full size)."""
    d = Detected(path, family, shapes)
    clip_prefix, bigg_prefix = text_prefixes(family)
    bigg = _part(shapes, bigg_prefix)
    if not bigg and clip_prefix is not None and any(k.startswith(clip_prefix) for k in shapes):
        raise UserError(f"'{path}' is an SDXL checkpoint with CLIP ViT-L but without its OpenCLIP ViT-bigG text "
                        f"encoder ({bigg_prefix}*); the file is damaged or incomplete")
    if bigg:
        d.text_config_2 = bigg_config(bigg, path)
        d.tokenizer_2 = {"pad_token": "!"}  # OpenCLIP pads with id 0, the token '!'
    if clip_prefix is not None and (clip := _part(shapes, clip_prefix)):
        d.text_config = text_config_from_shapes(clip, "clip", path)
    unet = _part(shapes, UNET_PREFIX)
    if unet:
        pooled = d.text_config_2["projection_dim"] if d.text_config_2 else BIGG["projection_dim"]
        d.unet_config = sdxl_unet_config(unet, family, pooled, path)
        d.pipeline = dict(PIPELINE["sdxl-inpaint" if d.inpainting else family])
    vae = _part(shapes, VAE_PREFIX)
    if vae:
        d.vae_config = {**vae_config_from_shapes(vae, path), "scaling_factor": SDXL_SCALING_FACTOR,
                        "force_upcast": True, "sample_size": 1024}
    d.scheduler_config = dict(SDXL_SCHEDULER)
    d.ema_keys = sum(k.startswith("model_ema.") for k in shapes)
    return d


def _part(shapes: Shapes, prefix: str) -> Shapes:
    return {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)}


def bigg_config(bigg: Shapes, path: Path) -> dict[str, Any]:
    """OpenCLIP ViT-bigG's text tower as a `CLIPTextModelWithProjection` config: all its blocks (SDXL takes the
    penultimate hidden states by index, from the whole model) and the projection's width."""
    config = text_config_from_shapes(bigg, "open_clip", path)
    if "text_projection" not in bigg:
        raise UserError(f"'{path}': the OpenCLIP ViT-bigG text encoder has no text_projection; the file is damaged")
    config.update(num_hidden_layers=len(blocks(bigg, r"transformer\.resblocks\.(\d+)\.")),
                  projection_dim=bigg["text_projection"][1], pad_token_id=0)
    return config


def sdxl_unet_config(unet: Shapes, family: str, pooled: int, path: Path) -> dict[str, Any]:
    """The `sdxl` / `sdxl-refiner` preset with this file's levels, channels, depth and micro-conditioning sizes."""
    from ldm.unet.presets import UNET_PRESETS

    if "label_emb.0.0.weight" not in unet or "label_emb.0.2.weight" not in unet:
        raise UserError(f"'{path}': the SDXL U-Net has no label_emb.0 (its micro-conditioning embedding); the file "
                        "is damaged")
    config = {**UNET_PRESETS[family], **unet_config_from_shapes(unet, "sd2", path)}  # SD 2's: linear proj_in, 64/head
    config.pop("upcast_attention", None)
    attention = [t.startswith("CrossAttn") for t in config["down_block_types"]]
    depths = [len(blocks(unet, rf"input_blocks\.{1 + level * (config['layers_per_block'] + 1)}\.1\."
                               r"transformer_blocks\.(\d+)\.")) for level in range(len(attention))]
    middle = len(blocks(unet, r"middle_block\.1\.transformer_blocks\.(\d+)\.")) or 1
    if len({d for d, a in zip(depths, attention) if a} | {middle}) == 1:
        depth: int | tuple[int, ...] = middle  # one depth everywhere (the refiner: 4)
    else:  # levels without attention: 1, except the last, whose depth diffusers gives the middle block
        depth = tuple(d if a else (middle if i == len(depths) - 1 else 1)
                      for i, (d, a) in enumerate(zip(depths, attention)))
    adm = unet["label_emb.0.0.weight"][1]
    ids = TIME_IDS[family]
    if (adm - pooled) <= 0 or (adm - pooled) % ids:
        raise UserError(f"'{path}': the U-Net's label_emb takes {adm} features, not {ids} time ids x N + the pooled "
                        f"{pooled} of the text encoder; the file is damaged or of another architecture")
    config.update(transformer_layers_per_block=depth, projection_class_embeddings_input_dim=adm,
                  addition_time_embed_dim=(adm - pooled) // ids, sample_size=128)
    return config
