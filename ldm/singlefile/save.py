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
from typing import Any

import torch

from ldm.errors import UserError
from ldm.files import atomic_directory, atomic_write_safetensors, os_reason, remove_tree
from ldm.model_info import read_text_encoder_info, write_text_encoder_info
from ldm.singlefile import keys
from ldm.singlefile.detect import FORMAT, META_KEY
from ldm.weights import check_model_dir

log = logging.getLogger(__name__)

_DROP = ("_name_or_path", "_diffusers_version", "transformers_version", "_commit_hash", "dtype", "torch_dtype")


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read '{path}': {e}") from None


def component_config(path: Path) -> dict[str, Any]:
    return {k: v for k, v in read_json(path).items() if k not in _DROP}


def component_weights(sub: Path, variant: str | None) -> keys.State:
    from safetensors.torch import load_file

    files = sorted(p for p in sub.glob("*.safetensors") if (variant is None) == (len(p.name.split(".")) == 2)
                   or (variant is not None and f".{variant}" in p.name))
    state: keys.State = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def directory_to_file(src: Path, dst: Path, half: bool = False) -> dict[str, int]:
    """Write `src` (a diffusers SD directory) as one original-layout safetensors file; returns tensors per part."""
    from ldm.text.tokenizer import offline_clip_tokenizer

    if dst.suffix.lower() != ".safetensors":
        raise UserError(f"'{dst}': the single file must end in .safetensors")
    if (src / "text_encoder_2").is_dir():  # SDXL: two text encoders (a refiner only the second)
        from ldm.singlefile.save_sdxl import sdxl_directory_to_file

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
    out: keys.State = {}
    parts = {}
    for name, sub, to, back in (
        ("U-Net", "unet", lambda s: keys.unet_to_original(s, unet_cfg), lambda s: keys.unet_from_original(s, unet_cfg)),
        ("VAE", "vae", lambda s: keys.vae_to_original(s, vae_cfg), lambda s: keys.vae_from_original(s, vae_cfg)),
        ("text encoder", "text_encoder", keys.open_clip_to_original if open_clip else keys.clip_to_original,
         (lambda s: keys.open_clip_from_original(s, text_cfg["hidden_size"])) if open_clip else keys.clip_from_original),
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


def check_tokenizer(directory: Path, offline) -> dict[str, Any]:
    """The file carries no tokenizer: ours is rebuilt from open_clip's vocabulary, so the directory's must be it."""
    from transformers import CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer in '{directory}': {e}") from None
    if tokenizer.get_vocab() != offline.get_vocab():
        raise UserError(f"the tokenizer in '{directory}' is not CLIP's BPE vocabulary, which is all a single file can "
                        "rebuild; keep this model as a diffusers directory")
    return {"pad_token": tokenizer.pad_token, "model_max_length": tokenizer.model_max_length}


def write_file(dst: Path, tensors: keys.State, metadata: dict[str, str]) -> None:
    """Written by path (safetensors' writer streams the tensors; no bytes copy of the file) and never over an
    existing file, even one created while converting."""
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_safetensors(dst, tensors, metadata, replace=False)
    except FileExistsError:
        raise UserError(f"'{dst}' already exists; choose a new name (ldm-convert never overwrites)") from None
    except OSError as e:
        raise UserError(f"cannot write {dst}: {os_reason(e)}") from None


def file_to_directory(src: Path, dst: Path, half: bool = False, prediction_type: str | None = None) -> None:
    """Write a single file as a diffusers directory that `StableDiffusionPipeline.from_pretrained` loads."""
    import diffusers
    from diffusers import StableDiffusionPipeline

    from ldm.singlefile.detect import detect
    from ldm.singlefile.load import load_single_file

    dtype = torch.float16 if half else None
    if detect(src).sdxl:
        from ldm.singlefile.save_sdxl import sdxl_file_to_directory

        return sdxl_file_to_directory(src, dst, dtype or _file_dtype(src), prediction_type)
    loaded = load_single_file(src, torch.device("cpu"), dtype or _file_dtype(src), prediction_type=prediction_type)
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
    # e.g. layer: penultimate, which diffusers' layout cannot say
    save_pipeline(pipe, dst, (lambda tmp: write_text_encoder_info(tmp, info)) if info is not None else None)


def save_pipeline(pipe, dst: Path, extra=None) -> None:
    """`pipe.save_pretrained` into a new directory `dst`, atomically (`extra(tmp)` adds files before it appears)."""
    tmp = None
    try:
        with atomic_directory(dst, replace=False) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
            if extra is not None:
                extra(tmp)
    except FileExistsError:
        raise UserError(f"'{dst}' already exists; choose a new name (ldm-convert never overwrites)") from None
    except OSError as e:
        if tmp is not None:
            remove_tree(tmp)  # nothing half-written is left behind
        raise UserError(f"cannot write {dst}: {os_reason(e)}") from None


def _file_dtype(path: Path) -> torch.dtype:
    """The dtype most of the file's U-Net is stored in (fp16 files stay fp16, fp32 stay fp32)."""
    from ldm.singlefile.detect import read_header
    from ldm.weights import check_safetensors_file

    read_header(path)  # pickles and other suffixes are refused first
    header = check_safetensors_file(path)
    kinds = [v["dtype"] for k, v in header.items() if k.startswith(keys.UNET_PREFIX)]
    common = max(set(kinds), key=kinds.count) if kinds else "F32"
    return {"F16": torch.float16, "BF16": torch.bfloat16}.get(common, torch.float32)
