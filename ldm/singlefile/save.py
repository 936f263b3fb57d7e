"""`ldm-convert`'s two directions: a diffusers directory <-> one `.safetensors` file in the original layout.

Directory -> file: each component's safetensors weights are renamed (ldm/singlefile/keys.py, checked against
diffusers' own readers) and written with an `ldm` metadata entry holding the component configs, so any model this
package makes (tiny, the shapes demo, SD-sized) is rebuilt exactly. File -> directory: `load.py` builds the models,
`save_pretrained` writes them. Both write atomically: an interrupted conversion leaves no half-written output.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ldm.errors import UserError
from ldm.model_info import read_text_encoder_info, write_text_encoder_info
from ldm.singlefile import keys, open_clip_extra
from ldm.singlefile.detect import FORMAT, META_KEY
from ldm.singlefile.save_sdxl import sdxl_directory_to_file, sdxl_file_to_directory
from ldm.singlefile.write import (check_tokenizer, component_config, component_weights, file_dtype, read_json,
                                  save_pipeline, write_file)
from ldm.weights import check_model_dir

log = logging.getLogger(__name__)


def directory_to_file(src: Path, dst: Path, half: bool = False) -> dict[str, int]:
    """Write `src` (a diffusers SD directory) as one original-layout safetensors file; returns tensors per part."""
    from ldm.text.tokenizer import offline_clip_tokenizer

    if dst.suffix.lower() != ".safetensors":
        raise UserError(f"'{dst}': the single file must end in .safetensors")
    if (src / "text_encoder_2").is_dir():  # SDXL: two text encoders (a refiner only the second)
        return sdxl_directory_to_file(src, dst, half)
    info = read_text_encoder_info(src)
    if info and info.get("kind", "clip") != "clip":
        raise UserError(f"'{src}' uses an open_clip text encoder rebuilt from '{info.get('path')}' (not stored in the "
                        "directory); single files hold transformers CLIP text encoders only")
    variants = check_model_dir(src)
    unet_cfg, vae_cfg = component_config(src / "unet" / "config.json"), component_config(src / "vae" / "config.json")
    text_cfg = component_config(src / "text_encoder" / "config.json")
    tokenizer = check_tokenizer(src / "tokenizer", offline_clip_tokenizer())
    open_clip = text_cfg.get("hidden_act") == "gelu"  # OpenAI CLIP uses quick_gelu, OpenCLIP (SD 2.x) gelu
    # one part at a time, so at most the converted parts plus one part's source are in memory: renaming keeps the
    # tensors (no copy), and each part's own state dict is dropped once converted and checked
    text_to, text_back = keys.clip_to_original, keys.clip_from_original
    if open_clip:
        def text_to(s):  # with OpenCLIP's last block, text_projection and logit_scale, which diffusers drops
            return _whole_open_clip(s, src, text_cfg)

        def text_back(s):
            return keys.open_clip_from_original(s, text_cfg["hidden_size"], layers=text_cfg["num_hidden_layers"])
    out: keys.State = {}
    parts = {}
    for name, sub, to, back in (
        ("U-Net", "unet", lambda s: keys.unet_to_original(s, unet_cfg), lambda s: keys.unet_from_original(s, unet_cfg)),
        ("VAE", "vae", lambda s: keys.vae_to_original(s, vae_cfg), lambda s: keys.vae_from_original(s, vae_cfg)),
        ("text encoder", "text_encoder", text_to, text_back),
    ):
        source = component_weights(src / sub, variants[sub])
        converted = to(source)
        if sub == "text_encoder":
            source = {k.removeprefix("text_model."): v for k, v in source.items()}
        keys.check_inverse(source, back(converted), name)  # diffusers reads back exactly what we started from
        del source
        parts[name] = len(converted)
        out.update(converted)
        del converted
    for key in list(out):  # in place, one tensor at a time: never a second full copy of the weights
        value = out[key]
        out[key] = (value.half() if half and value.is_floating_point() else value).contiguous()
        del value
    meta = {
        "format": FORMAT, "unet": unet_cfg, "vae": vae_cfg, "text_encoder": text_cfg,
        "text_layout": "open_clip" if open_clip else "clip", "tokenizer": tokenizer,
        "scheduler": read_json(src / "scheduler" / "scheduler_config.json"), "ldm_model": info,
    }
    write_file(dst, out, {META_KEY: json.dumps(meta)})
    return parts


def _whole_open_clip(state: keys.State, src: Path, text_cfg: dict) -> keys.State:
    """The text encoder in open_clip's names plus the tail it has no place for (its last block, `text_projection`,
    `logit_scale`): the one kept in `text_encoder/`, or the neutral one (ldm/singlefile/open_clip_extra.py)."""
    dtype = next(v.dtype for k, v in state.items() if k.endswith("token_embedding.weight"))
    tail = open_clip_extra.directory_extra(src / "text_encoder", text_cfg, dtype)
    return {**keys.open_clip_to_original(state), **{keys.OPEN_CLIP_PREFIX + k: v for k, v in tail.items()}}


def file_to_directory(src: Path, dst: Path, half: bool = False, prediction_type: str | None = None) -> None:
    """Write a single file as a diffusers directory that `StableDiffusionPipeline.from_pretrained` loads."""
    import diffusers
    from diffusers import StableDiffusionPipeline

    from ldm.singlefile.detect import detect
    from ldm.singlefile.load import load_single_file

    dtype = torch.float16 if half else None
    if detect(src).sdxl:
        return sdxl_file_to_directory(src, dst, dtype or file_dtype(src), prediction_type)
    loaded = load_single_file(src, torch.device("cpu"), dtype or file_dtype(src), prediction_type=prediction_type)
    config = dict(loaded.scheduler_config)
    cls = getattr(diffusers, config.pop("_class_name", "PNDMScheduler"))
    scheduler = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    text = loaded.text_encoder
    tokenizer = text.tokenizer
    if loaded.detected.tokenizer.get("pad_id") == 0:
        # OpenCLIP pads with id 0, the token '!': diffusers' SD 2.x tokenizers say so with pad_token '!'
        tokenizer.pad_token = "!"
    pipe = StableDiffusionPipeline(vae=loaded.vae, text_encoder=text.model, tokenizer=tokenizer,
                                   unet=loaded.unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    info = loaded.detected.text_info
    text_cfg = text.model.config.to_dict()
    # OpenCLIP's last block, text_projection and logit_scale, which diffusers' text encoder has no place for
    extra = (open_clip_extra.read_file_extra(src, text_cfg, text.model.dtype)
             if loaded.detected.text_layout == "open_clip" else {})

    def beside(tmp: Path) -> None:
        if info is not None:  # e.g. layer: penultimate, which diffusers' layout cannot say
            write_text_encoder_info(tmp, info)
        open_clip_extra.write_extra(tmp / "text_encoder", extra, text_cfg)

    save_pipeline(pipe, dst, beside)

