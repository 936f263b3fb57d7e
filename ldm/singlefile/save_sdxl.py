"""`ldm-convert` for SDXL: a diffusers SDXL directory (unet, vae, text_encoder, text_encoder_2, tokenizer,
tokenizer_2, scheduler; a refiner has no text_encoder/tokenizer) <-> one file in Stability's original layout.

The file's names are those of `sd_xl_base_1.0.safetensors` / `sd_xl_refiner_1.0.safetensors` (ldm/singlefile/sdxl.py),
checked on every conversion against diffusers' own readers (`keys.check_inverse`); its `ldm` metadata entry
(format 2) holds every component's config, both tokenizers' settings and model_index.json's flags:

    {"format": 2, "unet": {...}, "vae": {...}, "text_encoder": {...} | null, "text_encoder_2": {...},
     "tokenizer": {...} | null, "tokenizer_2": {...}, "scheduler": {...},
     "pipeline": {"_class_name": ..., "force_zeros_for_empty_prompt": ..., "requires_aesthetics_score": ...}}
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ldm.errors import UserError
from ldm.singlefile import keys
from ldm.singlefile.detect import FORMAT_SDXL, META_KEY
from ldm.singlefile.write import (
    check_tokenizer,
    component_config,
    component_weights,
    read_json,
    save_pipeline,
    write_file,
)
from ldm.weights import check_model_dir, check_weights

PIPELINE_FLAGS = ("_class_name", "force_zeros_for_empty_prompt", "requires_aesthetics_score")


def sdxl_directory_to_file(src: Path, dst: Path, half: bool = False) -> dict[str, int]:
    """Write `src` (a diffusers SDXL directory) as one original-layout file; returns tensors per part."""
    from ldm.text.tokenizer import offline_clip_tokenizer

    refiner = not (src / "text_encoder").is_dir()
    variants = check_model_dir(src, ("unet", "vae", "scheduler") + (() if refiner else ("text_encoder", "tokenizer")))
    for sub, what in (("text_encoder_2", "config.json"), ("tokenizer_2", "")):
        if not (src / sub / what).exists():
            raise UserError(f"SDXL directory '{src}' has no {sub}/{what}")
    variants["text_encoder_2"] = check_weights(src / "text_encoder_2")
    index = read_json(src / "model_index.json") if (src / "model_index.json").is_file() else {}
    unet_cfg, vae_cfg = component_config(src / "unet" / "config.json"), component_config(src / "vae" / "config.json")
    text_cfg = None if refiner else component_config(src / "text_encoder" / "config.json")
    text_cfg_2 = component_config(src / "text_encoder_2" / "config.json")
    offline = offline_clip_tokenizer()
    tokenizer = None if refiner else check_tokenizer(src / "tokenizer", offline)
    tokenizer_2 = check_tokenizer(src / "tokenizer_2", offline)
    clip_prefix = None if refiner else keys.SDXL_CLIP_PREFIX
    bigg_prefix = keys.SDXL_REFINER_BIGG_PREFIX if refiner else keys.SDXL_BIGG_PREFIX
    hidden_2 = text_cfg_2["hidden_size"]
    parts = [
        ("U-Net", "unet", lambda s: keys.unet_to_original(s, unet_cfg), lambda s: keys.unet_from_original(s, unet_cfg)),
        ("VAE", "vae", lambda s: keys.vae_to_original(s, vae_cfg), lambda s: keys.vae_from_original(s, vae_cfg)),
        ("OpenCLIP ViT-bigG text encoder", "text_encoder_2", lambda s: keys.open_clip_to_original(s, bigg_prefix),
         lambda s: keys.open_clip_from_original(s, hidden_2, bigg_prefix, projection=True)),
    ]
    if not refiner:
        parts.append(("CLIP ViT-L text encoder", "text_encoder", lambda s: keys.clip_to_original(s, clip_prefix),
                      lambda s: keys.clip_from_original(s, clip_prefix)))
    out: keys.State = {}
    counts = {}
    for name, sub, to, back in parts:  # one part at a time (see save.directory_to_file)
        source = component_weights(src / sub, variants[sub])
        converted = to(source)
        if sub.startswith("text_encoder"):  # diffusers' readers give transformers' names without text_model.
            source = {k.removeprefix("text_model."): v for k, v in source.items()}
        keys.check_inverse(source, back(converted), name)
        del source
        counts[name] = len(converted)
        out.update(converted)
        del converted
    for key in list(out):  # in place, one tensor at a time; the transposed projection becomes contiguous here
        value = out[key]
        out[key] = (value.half() if half and value.is_floating_point() else value).contiguous()
        del value
    meta = {
        "format": FORMAT_SDXL, "unet": unet_cfg, "vae": vae_cfg, "text_encoder": text_cfg, "text_encoder_2": text_cfg_2,
        "tokenizer": tokenizer, "tokenizer_2": tokenizer_2,
        "scheduler": read_json(src / "scheduler" / "scheduler_config.json"),
        "pipeline": {k: index[k] for k in PIPELINE_FLAGS if k in index},
    }
    write_file(dst, out, {META_KEY: json.dumps(meta)})
    return counts


def sdxl_file_to_directory(src: Path, dst: Path, dtype: torch.dtype, prediction_type: str | None = None) -> None:
    """Write an SDXL single file as a directory that diffusers' `StableDiffusionXL*Pipeline.from_pretrained` loads
    (the pipeline class model_index.json names: the base, the inpainting or the refiner's img2img pipeline)."""
    import diffusers

    from ldm.singlefile.detect import detect
    from ldm.singlefile.load_sdxl import load_sdxl_modules

    d = detect(src)
    m = load_sdxl_modules(d, torch.device("cpu"), dtype, prediction_type=prediction_type)
    config = dict(m.scheduler_config)
    scheduler = getattr(diffusers, config.pop("_class_name", "EulerDiscreteScheduler")).from_config(
        {k: v for k, v in config.items() if not k.startswith("_")})
    flags = dict(m.pipeline)
    cls_name = flags.pop("_class_name", "StableDiffusionXLPipeline")
    if not cls_name.startswith("StableDiffusionXL") or not hasattr(diffusers, cls_name):
        raise UserError(f"'{src}': its metadata names the pipeline '{cls_name}', not an SDXL pipeline of diffusers; "
                        "write the file again with ldm-convert")
    pipe = getattr(diffusers, cls_name)(
        vae=m.vae, text_encoder=m.text_encoder, text_encoder_2=m.text_encoder_2, tokenizer=m.tokenizer,
        tokenizer_2=m.tokenizer_2, unet=m.unet, scheduler=scheduler, add_watermarker=False, **flags)
    save_pipeline(pipe, dst)
