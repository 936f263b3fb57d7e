"""What a single `.safetensors` checkpoint holds, from its header alone (names and shapes; no tensor is read).

Two kinds of file are recognised:
- our own (`ldm-convert DIR FILE.safetensors`): the original layout plus an `ldm` entry in the header's
  `__metadata__`, a JSON object with every component's diffusers config (see `ldm/singlefile/__init__.py`); the
  model is rebuilt exactly, whatever its sizes.
- a foreign SDXL file (base, refiner, 9-channel inpainting): ldm/singlefile/sdxl.py.
- a foreign SD 1.x / 2.x file (A1111, ComfyUI, model-sharing sites): the family is read from the keys (SD 1 has
  `cond_stage_model.transformer.*`, CLIP ViT-L; SD 2 `cond_stage_model.model.*`, OpenCLIP ViT-H, and linear
  `proj_in` layers in the U-Net), and the configs are the family's preset (ldm/unet/presets.py `sd15` / `sd21`,
  ldm/vae/presets.py `sd-f8`, CLIP ViT-L / OpenCLIP ViT-H text towers) with the sizes read from the shapes, so a
  real-sized file gives exactly the preset and a small file in the same layout (tests) still loads.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ldm.errors import UserError
from ldm.model_info import LDM_INFO, is_valid_text_encoder_info
from ldm.singlefile.detected import (  # noqa: F401 - re-exported: callers read them here
    FORMAT,
    FORMAT_SDXL,
    META_KEY,
    SD_SCALING_FACTOR,
    Detected,
    Shapes,
    blocks,
    text_config_from_shapes,
    unet_config_from_shapes,
    vae_config_from_shapes,
)
from ldm.singlefile.keys import CLIP_PREFIX, OPEN_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX
from ldm.singlefile.sdxl import detect_sdxl, sdxl_family
from ldm.weights import PICKLE_SUFFIXES, check_safetensors_file


def read_header(path: Path) -> tuple[Shapes, dict[str, str]]:
    """Names -> shapes, and the `__metadata__` strings; a pickle, a truncated file or a git-lfs pointer is refused."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(f"'{path}' is a pickle checkpoint, which is never loaded (unpickling can run arbitrary "
                        "code); use the model's .safetensors file, or convert it once where you trust it")
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"'{path}' is not a .safetensors file; pass a .safetensors single file or a diffusers "
                        "directory")
    header = check_safetensors_file(path)
    meta = header.pop("__metadata__", None) or {}
    return {k: tuple(v["shape"]) for k, v in header.items()}, meta


def detect(path: str | Path) -> Detected:
    """Recognise a single-file checkpoint or raise a one-line `UserError` saying what it is instead."""
    path = Path(path).expanduser()
    shapes, meta = read_header(path)
    if META_KEY in meta:
        return _from_metadata(path, shapes, meta[META_KEY])
    return detect_shapes(shapes, path)


def detect_shapes(shapes: Shapes, path: Path) -> Detected:
    """A foreign file (no `ldm` metadata) from its names and shapes; `path` only names it in messages."""
    if family := sdxl_family(shapes):
        return detect_sdxl(shapes, path, family)
    other = _other_architecture(shapes)  # SDXL, SD 3, Flux, ... share some of these names: ask diffusers first
    if other:
        raise UserError(f"'{path}' is a {other} checkpoint (detected by diffusers' infer_diffusers_model_type), "
                        "not Stable Diffusion 1.x/2.x/XL; it cannot be loaded here")
    if f"{UNET_PREFIX}input_blocks.0.0.weight" not in shapes:
        raise _not_sd(path, shapes)
    text_layout = ("clip" if any(k.startswith(CLIP_PREFIX) for k in shapes)
                   else "open_clip" if any(k.startswith(OPEN_CLIP_PREFIX) for k in shapes) else None)
    unet = {k[len(UNET_PREFIX):]: s for k, s in shapes.items() if k.startswith(UNET_PREFIX)}
    linear = any(k.endswith("proj_in.weight") and len(s) == 2 for k, s in unet.items())
    family = {"clip": "sd1", "open_clip": "sd2"}.get(text_layout or "", "sd2" if linear else "sd1")
    d = Detected(path, family, shapes, text_layout=text_layout)
    d.unet_config = unet_config_from_shapes(unet, family, path)
    vae = {k[len(VAE_PREFIX):]: s for k, s in shapes.items() if k.startswith(VAE_PREFIX)}
    d.vae_config = vae_config_from_shapes(vae, path) if vae else None
    if text_layout:
        prefix = CLIP_PREFIX if text_layout == "clip" else OPEN_CLIP_PREFIX
        d.text_config = text_config_from_shapes({k[len(prefix):]: s for k, s in shapes.items()
                                                 if k.startswith(prefix)}, text_layout, path)
    # OpenCLIP pads with id 0 (not the end token); the tokenizer is the same BPE vocabulary
    d.tokenizer = {"pad_id": 0} if family == "sd2" else {}
    d.ema_keys = sum(k.startswith("model_ema.") for k in shapes)
    return d


def _from_metadata(path: Path, shapes: Shapes, text: str) -> Detected:
    try:
        meta = json.loads(text)
        if meta.get("format") not in (FORMAT, FORMAT_SDXL):
            raise ValueError(f"format {meta.get('format')!r}, this version reads {FORMAT} and {FORMAT_SDXL}")
        sdxl = meta["format"] == FORMAT_SDXL
        if sdxl and not isinstance(meta.get("text_encoder_2"), dict):
            raise ValueError("an SDXL entry without its 'text_encoder_2' config")
        family = ("sdxl" if meta.get("text_encoder") else "sdxl-refiner") if sdxl else "ldm"
        d = Detected(path, family, shapes, unet_config=meta.get("unet"), vae_config=meta.get("vae"),
                     text_config=meta.get("text_encoder"), text_layout=meta.get("text_layout"),
                     tokenizer=meta.get("tokenizer") or {}, scheduler_config=meta.get("scheduler"),
                     text_info=meta.get("ldm_model"), text_config_2=meta.get("text_encoder_2"),
                     tokenizer_2=meta.get("tokenizer_2") or {}, pipeline=meta.get("pipeline") or {},
                     from_metadata=True)
        if d.text_info is not None and not is_valid_text_encoder_info(d.text_info):
            raise ValueError(f"its 'ldm_model' entry is not a valid 'text_encoder' entry of {LDM_INFO} (kind "
                             "clip|open_clip, layer last|penultimate)")
    except (ValueError, AttributeError, TypeError) as e:
        raise UserError(f"'{path}' has an unreadable '{META_KEY}' metadata entry ({e}); write it again with "
                        "ldm-convert") from None
    return d


def _not_sd(path: Path, shapes: Shapes) -> UserError:
    """No SD U-Net: say what the file is (diffusers' own detector names other architectures) or what it holds."""
    families = Counter(".".join(k.split(".")[:2]) if k.count(".") > 1 else k.split(".")[0] for k in shapes)
    found = ", ".join(f"{name}.* ({n})" for name, n in families.most_common(6)) or "no tensors"
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_A." in k or ".lora_down." in k for k in shapes):
        return UserError(f"'{path}' is a LoRA adapter, not a model: pass it with --lora, on top of --model")
    if any(k.startswith(VAE_PREFIX) or k.startswith("encoder.") for k in shapes):
        return UserError(f"'{path}' holds a VAE but no U-Net (model.diffusion_model.*): pass it as --vae, with "
                         "--model a full checkpoint or diffusers directory")
    if any(k.startswith(("down_blocks.", "conv_in.")) for k in shapes):
        return UserError(f"'{path}' is a diffusers component's weights file (found {found}), not a whole model: "
                         "pass the model directory that holds it")
    return UserError(f"'{path}' is not a Stable Diffusion 1.x/2.x checkpoint in the original layout (no "
                     f"model.diffusion_model.input_blocks.*): found {found}")


def _other_architecture(shapes: Shapes) -> str | None:
    from types import SimpleNamespace

    import torch
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    fake = {k: SimpleNamespace(shape=torch.Size(s)) for k, s in shapes.items()}
    try:
        kind = infer_diffusers_model_type(fake)
    except Exception:  # noqa: BLE001 - a detector that needs tensor values; the caller lists the key families
        return None
    if kind == "v1" and not any(k.startswith(UNET_PREFIX) for k in shapes):
        return None  # diffusers' fallback answer for anything it does not know
    return None if kind in ("v1", "v2", "inpainting", "inpainting_v2") else kind

# -------------------------------------------------------------------------------------------- prediction type
PREDICTION_TYPES = ("epsilon", "v_prediction")


def read_yaml_prediction(path: Path) -> str | None:
    """A1111's convention: `NAME.yaml` next to `NAME.safetensors` (the original LDM config);
    `model.params.parameterization: v` means v-prediction, anything else (or none) epsilon."""
    yaml_path = path.with_suffix(".yaml")
    if not yaml_path.is_file():
        return None
    import yaml

    try:
        config = yaml.safe_load(yaml_path.read_text())
        params = config["model"]["params"]
        if not isinstance(params, dict):
            raise TypeError(f"model.params is a {type(params).__name__}, not a mapping")
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise UserError(f"cannot read '{yaml_path}' (an original LDM config with model.params): {e}; fix or remove "
                        "it, or pass --prediction-type") from None
    return "v_prediction" if str(params.get("parameterization", "eps")) == "v" else "epsilon"


def choose_prediction(d: Detected, explicit: str | None) -> tuple[str, str]:
    """(prediction type, where it came from): --prediction-type > NAME.yaml > the file's metadata > the family."""
    if explicit is not None:
        if explicit not in PREDICTION_TYPES:
            raise UserError(f"--prediction-type must be one of {', '.join(PREDICTION_TYPES)}, got '{explicit}'")
        return explicit, "--prediction-type"
    from_yaml = read_yaml_prediction(d.path)
    if from_yaml is not None:
        return from_yaml, f"{d.path.with_suffix('.yaml').name}"
    if d.sdxl and not d.from_metadata:
        return "epsilon", "the default for SDXL"
    if d.scheduler_config is not None:
        return d.scheduler_config.get("prediction_type", "epsilon"), "the file's metadata"
    if d.family == "sd2" and not d.inpainting:
        # SD 2.x 768-v models (2.0-v, 2.1) predict v; 512-base ones predict eps and cannot be told apart by keys
        return "v_prediction", "assumed for SD 2.x (768-v); pass --prediction-type epsilon for a 512-base model"
    return "epsilon", f"the default for {'SD 2.x inpainting' if d.family == 'sd2' else 'SD 1.x'}"
