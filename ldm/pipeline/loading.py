"""Find a model (a local diffusers-format directory, a single .safetensors file or a hub id) and load its parts,
safetensors only."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from ldm import hub
from ldm.components import Components
from ldm.demo import MODEL_DIR as DEMO_MODEL_DIR
from ldm.demo import NAME as DEMO_NAME
from ldm.errors import UserError
from ldm.vae.loading import vae_factor
from ldm.weights import COMPONENTS, check_model_dir

log = logging.getLogger(__name__)

# What --model defaults to: the bundled 32-px shapes demo (ldm/demo). None would make --model required.
DEFAULT_MODEL: str | None = DEMO_NAME
NO_MODEL = "no model given: pass --model DIR (a diffusers-format Stable Diffusion directory)"

# what a Stable Diffusion repository needs; never the root-level single-file checkpoints or pickles next to them
_HUB_FILES = [
    "model_index.json", "scheduler/*.json", "tokenizer/*", "*/config.json",
    "unet/diffusion_pytorch_model*.safetensors*", "vae/diffusion_pytorch_model*.safetensors*",
    "text_encoder/model*.safetensors*",
]


def resolve_model(model: str | None) -> Path:
    """--model value -> a local directory (downloading a hub id into the HF cache when online)."""
    model = model if model is not None else DEFAULT_MODEL
    if not model:
        raise UserError(NO_MODEL)
    if model == DEMO_NAME:
        return DEMO_MODEL_DIR
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        if path.suffix.lower() == ".safetensors":  # a single-file checkpoint (ldm/singlefile)
            return path
        pickle = path.suffix.lower() in (".ckpt", ".bin", ".pt", ".pth")
        kind = "a pickle checkpoint, which is never loaded" if pickle else "a file"
        raise UserError(
            f"--model '{model}' is {kind}; pass a .safetensors single file or a diffusers-format directory "
            "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
        )
    if path.suffix.lower() == ".safetensors":
        raise UserError(f"model file '{model}' does not exist")
    if hub.is_hub_id(model):
        return _from_hub(model)
    raise UserError(f"model directory '{model}' does not exist")


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    # without a network the hub client retries for half a minute; a quick connection test fails in seconds, and
    # an unreachable hub is treated like offline mode (the cache may still hold the model)
    offline = not hub.reachable()
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES, local_files_only=offline))
    except Exception as e:  # noqa: BLE001 - any failure here means the same thing to the user: no such model
        why = "offline, and it is not in the Hugging Face cache" if offline else f"{type(e).__name__}: {e}"
        raise UserError(
            f"'{repo_id}' is not a local directory, and as a hub id it could not be fetched ({why.splitlines()[0]}); "
            "pass a local diffusers-format directory"
        ) from None


def read_vae_factor(root: Path) -> int:
    """Pixels per latent pixel, from vae/config.json alone (sizes are validated before any weights are read)."""
    if root.is_file():
        from ldm.singlefile.load import vae_factor_and_size

        return vae_factor_and_size(root)[0]
    return vae_factor(_read_json(root / "vae" / "config.json"))


def read_default_size(root: Path, prediction_type: str | None = None) -> int:
    """unet.config.sample_size x the VAE factor: the resolution the model was trained at (for a single SD 2.x
    file, 768 for v-prediction and 512 otherwise, so `prediction_type` is what --prediction-type says)."""
    if root.is_file():
        from ldm.singlefile.load import vae_factor_and_size

        return vae_factor_and_size(root, prediction_type)[1]
    sample = _read_json(root / "unet" / "config.json").get("sample_size", 64)
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    return int(sample) * read_vae_factor(root)


def load_components(
    root: Path, name: str, device: torch.device, dtype: torch.dtype, vae: str | Path | None = None,
    prediction_type: str | None = None,
) -> Components:
    """Check every file first (clear messages), then load with `use_safetensors=True` (never unpickle).

    `root` may be a single `.safetensors` file (ldm/singlefile); `vae` (a VAE file or directory) replaces the
    model's VAE; `prediction_type` overrides the scheduler's."""
    if root.is_file():
        from ldm.singlefile.load import load_single_file

        f = load_single_file(root, device, dtype, vae=vae, prediction_type=prediction_type)
        f.name = name
        return f
    components = _load_directory(root, name, device, dtype)
    if vae is not None:
        from ldm.singlefile.load import load_vae_override

        scale = components.vae.config.scaling_factor
        components.vae = load_vae_override(vae, scale, dtype).to(device).eval().requires_grad_(False)
    if prediction_type is not None:
        from ldm.singlefile.detect import PREDICTION_TYPES

        if prediction_type not in PREDICTION_TYPES:
            raise UserError(f"--prediction-type must be one of {', '.join(PREDICTION_TYPES)}, got '{prediction_type}'")
        components.scheduler_config = {**components.scheduler_config, "prediction_type": prediction_type}
    log.info("prediction type: %s (%s)", components.scheduler_config.get("prediction_type", "epsilon"),
             "--prediction-type" if prediction_type else "the model's scheduler config")
    return components


def _load_directory(root: Path, name: str, device: torch.device, dtype: torch.dtype) -> Components:
    text_info = read_text_encoder_info(root)
    in_dir = text_info is None or text_info.get("kind", "clip") == "clip"
    variants = check_model(root)

    def load(what: str, fn):
        try:
            return fn()
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot load {what} from '{root / what}': {first}") from None

    unet = load("unet", lambda: UNet2DConditionModel.from_pretrained(
        root, subfolder="unet", use_safetensors=True, variant=variants["unet"], torch_dtype=dtype))
    vae = load("vae", lambda: AutoencoderKL.from_pretrained(
        root, subfolder="vae", use_safetensors=True, variant=variants["vae"], torch_dtype=dtype))
    layer = (text_info or {}).get("layer", "last")
    if in_dir:
        from transformers import CLIPTextModel, CLIPTokenizer

        from ldm.text.encoder import FrozenTextEncoder

        tokenizer = load("tokenizer", lambda: CLIPTokenizer.from_pretrained(root / "tokenizer"))
        clip = load("text_encoder", lambda: CLIPTextModel.from_pretrained(
            root / "text_encoder", use_safetensors=True, variant=variants["text_encoder"], dtype=dtype))
        text_encoder = FrozenTextEncoder.from_clip(tokenizer, clip, layer=layer)
    else:
        from ldm.text.config import TextEncoderConfig
        from ldm.text.loading import load_text_encoder

        cfg = TextEncoderConfig(kind=text_info["kind"], path=text_info.get("path", ""),
                                pretrained=text_info.get("pretrained"), layer=layer)
        text_encoder = load_text_encoder(cfg, dtype=dtype, device=device)
    scheduler_config = _read_json(root / "scheduler" / "scheduler_config.json")
    for module in (unet, vae, text_encoder):
        module.to(device).eval().requires_grad_(False)
    return Components(unet, vae, text_encoder, scheduler_config, name)


def check_model(root: Path) -> dict[str, str | None]:
    """Check the files the model needs (see ldm/weights.py) without loading anything; returns the weight variants."""
    if root.is_file():
        from ldm.singlefile.detect import detect

        detect(root)  # reads the header: refuses truncated files, unknown layouts, other architectures
        return {}
    text_info = read_text_encoder_info(root)
    # an open_clip text encoder (stage 2 with SD 2.x-style conditioning) is rebuilt from its description, so the
    # directory has no text_encoder/ or tokenizer/
    in_dir = text_info is None or text_info.get("kind", "clip") == "clip"
    return check_model_dir(root, COMPONENTS if in_dir else ("unet", "vae", "scheduler"))


def read_text_encoder_info(root: Path) -> dict[str, Any] | None:
    """Stage 2's `ldm_model.json` note on the text encoder (kind, path, pretrained, layer), if the model has one.

    diffusers' layout cannot say "use the penultimate layer" or "this is an open_clip model"; stage 2's export
    (ldm/unet/export.py) writes that here. Plain diffusers models have no such file: CLIP, last layer.
    """
    from ldm.unet.export import LDM_INFO

    path = root / LDM_INFO
    if not path.is_file():
        return None
    info = _read_json(path).get("text_encoder")
    if not isinstance(info, dict) or info.get("kind", "clip") not in ("clip", "open_clip") \
            or info.get("layer", "last") not in ("last", "penultimate"):
        raise UserError(f"'{path}' has no valid 'text_encoder' entry (kind clip|open_clip, layer last|penultimate)")
    return info


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"'{path}' is missing; a diffusers-format model directory needs it") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read '{path}': {e}") from None
