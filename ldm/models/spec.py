"""What a model is, read from its headers and configs alone (no weight is loaded): the one place a `--model` value,
a server's model list, `ldm-eval`'s model or training's `model.pretrained` is turned into facts.

    spec = inspect_model("sd15.safetensors", prediction_type=None, vae=None)
    spec.family, spec.prediction_type, spec.train_timesteps, spec.default_size, spec.vae_factor, spec.parts

A model is a diffusers-format directory, a single `.safetensors` file in the original layout (ldm/singlefile), a
hub id (downloaded into the Hugging Face cache when online), or the bundled demo's name. Every file is checked
here (pickles, git-lfs pointers and truncated files refused, naming the file), so a broken model fails before any
weight is read; `ldm.models.load` then loads exactly what the spec describes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from ldm import hub
from ldm.demo import MODEL_DIR as DEMO_MODEL_DIR
from ldm.demo import NAME as DEMO_NAME
from ldm.errors import UserError
from ldm.model_info import read_text_encoder_info
from ldm.singlefile.detect import PREDICTION_TYPES, Detected, choose_prediction, detect
from ldm.singlefile.load import SD_SCHEDULER, check_vae_source, unet_config_for
from ldm.vae.load_vae import vae_factor
from ldm.weights import (
    COMPONENTS,
    SDXL_COMPONENTS,
    SDXL_REFINER_COMPONENTS,
    check_model_dir,
)

# what a model is, for the pipeline and the request: SD 1.x/2.x (one pipeline for both), an SDXL base (also its
# 9-channel inpainting twin), an SDXL refiner (bigG text tower only, aesthetic-score conditioning)
ARCHS = ("sd", "sdxl", "sdxl-refiner")
ARCH_NAMES = {"sd": "an SD 1.x/2.x model", "sdxl": "an SDXL base model", "sdxl-refiner": "an SDXL refiner"}

# What --model defaults to: the bundled 32-px shapes demo (ldm/demo). None would make --model required.
DEFAULT_MODEL: str | None = DEMO_NAME
NO_MODEL = "no model given: pass --model DIR (a diffusers-format Stable Diffusion directory)"

# what a Stable Diffusion repository needs; never the root-level single-file checkpoints or pickles next to them
_HUB_FILES = [
    "model_index.json", "scheduler/*.json", "tokenizer/*", "*/config.json",
    "unet/diffusion_pytorch_model*.safetensors*", "vae/diffusion_pytorch_model*.safetensors*",
    "text_encoder/model*.safetensors*",
]


@dataclass(frozen=True)
class ModelSpec:
    """One model's facts. `name` is how the user named it (what PNGs record); `root` is where it is."""

    name: str
    root: Path
    family: str  # "sd1" | "sd2" | "ldm" (an ldm-convert file) for single files; "diffusers" for directories
    unet_config: dict[str, Any]
    scheduler_config: dict[str, Any]  # with the prediction type that will be used
    prediction_source: str  # why that prediction type: "--prediction-type", "the model's scheduler config", ...
    vae_factor: int  # pixels per latent pixel
    default_size: int  # the native side in pixels
    parts: tuple[str, ...]  # which of unet, vae, text_encoder are inside
    text_info: dict[str, Any] | None = None  # ldm_model.json's text_encoder entry (open_clip, penultimate layer)
    variants: dict[str, str | None] = field(default_factory=dict)  # a directory's weight variants ('fp16')
    detected: Detected | None = field(default=None, compare=False, repr=False)  # a single file's header reading
    vae: str | None = None  # a VAE replacing the model's (--vae), checked
    prediction_override: str | None = None  # --prediction-type as given
    arch: str = "sd"  # ARCHS
    force_zeros_for_empty_prompt: bool = False  # SDXL: an empty negative prompt's conditioning is zeros

    @property
    def kind(self) -> str:
        """What the model is, in words: 'an SDXL refiner'."""
        return ARCH_NAMES[self.arch]

    @property
    def single_file(self) -> bool:
        return self.root.is_file()

    @property
    def prediction_type(self) -> str:
        """'epsilon', 'v_prediction', or 'flow' for a flow-matching model (its scheduler has no prediction type)."""
        if self.scheduler_config.get("_class_name") == "FlowMatchEulerDiscreteScheduler":
            return "flow"
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def train_timesteps(self) -> int:
        """The scheduler's training timesteps: the most steps a request may ask for."""
        return int(self.scheduler_config.get("num_train_timesteps", 1000))

    @property
    def inpainting_unet(self) -> bool:
        """A 9-channel U-Net (latents + mask + masked-image latents)."""
        return self.unet_config.get("in_channels") == 2 * self.unet_config.get("out_channels", 4) + 1

    @cached_property
    def hash(self) -> str:
        """A1111's short model hash: the first 10 hex digits of the sha256 of the file (for a directory, of its U-Net
        weights). Read on first use only: it reads the whole file."""
        path = self.root if self.single_file else sorted((self.root / "unet").glob("*.safetensors"))[0]
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()[:10]


def inspect_model(model: str | Path | None, *, prediction_type: str | None = None,
                  vae: str | Path | None = None) -> ModelSpec:
    """A model's spec from its headers and configs; raises a one-line `UserError` for anything missing or broken.
    `prediction_type` overrides the model's ('epsilon' | 'v_prediction'); `vae` (a file or directory) replaces its
    VAE and is checked here too."""
    name = str(model if model is not None else DEFAULT_MODEL)
    root = resolve_model(None if model is None else str(model))
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise UserError(f"--prediction-type must be one of {', '.join(PREDICTION_TYPES)}, got '{prediction_type}'")
    spec = _inspect_file(name, root, prediction_type) if root.is_file() else _inspect_dir(name, root, prediction_type)
    if vae is not None:
        check_vae_source(vae)
        spec = replace(spec, vae=str(vae))
    return spec


def _inspect_file(name: str, root: Path, prediction_type: str | None) -> ModelSpec:
    d = detect(root)  # reads the header: refuses truncated files, unknown layouts, other architectures
    prediction, source = choose_prediction(d, prediction_type)
    unet = unet_config_for(d, prediction)
    factor = 2 ** (len((d.vae_config or {"block_out_channels": (1, 1, 1, 1)})["block_out_channels"]) - 1)
    scheduler = {**(d.scheduler_config or SD_SCHEDULER), "prediction_type": prediction}
    # family: "sd1" | "sd2" | "ldm" | "sdxl" | "sdxl-refiner" (ldm-convert SDXL files too, from their metadata)
    parts = tuple(p for p, c in (("unet", d.unet_config), ("vae", d.vae_config), ("text_encoder", d.text_config),
                                 ("text_encoder_2", d.text_config_2)) if c)
    arch = d.family if d.sdxl else "sd"
    force_zeros = bool(d.pipeline.get("force_zeros_for_empty_prompt", arch == "sdxl"))
    return ModelSpec(name, root, d.family, unet, scheduler, source, factor, _side(unet) * factor, parts,
                     text_info=d.text_info, detected=d, prediction_override=prediction_type, arch=arch,
                     force_zeros_for_empty_prompt=force_zeros)


def _inspect_dir(name: str, root: Path, prediction_type: str | None) -> ModelSpec:
    arch, index = _dir_arch(root)
    if arch != "sd":
        variants = check_model_dir(root, SDXL_COMPONENTS if arch == "sdxl" else SDXL_REFINER_COMPONENTS)
        unet = read_json(root / "unet" / "config.json")
        scheduler = read_json(root / "scheduler" / "scheduler_config.json")
        source = "the model's scheduler config"
        if prediction_type is not None:
            scheduler, source = {**scheduler, "prediction_type": prediction_type}, "--prediction-type"
        factor = vae_factor(read_json(root / "vae" / "config.json"))
        parts = ("unet", "vae", "text_encoder", "text_encoder_2") if arch == "sdxl" else ("unet", "vae",
                                                                                         "text_encoder_2")
        return ModelSpec(name, root, "diffusers", unet, scheduler, source, factor, _side(unet) * factor, parts,
                         variants=variants, prediction_override=prediction_type, arch=arch,
                         force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", arch == "sdxl")))
    text_info = read_text_encoder_info(root)
    # an open_clip text encoder (stage 2 with SD 2.x-style conditioning) is rebuilt from its description, so the
    # directory has no text_encoder/ or tokenizer/
    in_dir = text_info is None or text_info.get("kind", "clip") == "clip"
    variants = check_model_dir(root, COMPONENTS if in_dir else ("unet", "vae", "scheduler"))
    unet = read_json(root / "unet" / "config.json")
    factor = vae_factor(read_json(root / "vae" / "config.json"))
    scheduler = read_json(root / "scheduler" / "scheduler_config.json")
    source = "the model's scheduler config"
    if prediction_type is not None:
        scheduler, source = {**scheduler, "prediction_type": prediction_type}, "--prediction-type"
    return ModelSpec(name, root, "diffusers", unet, scheduler, source, factor, _side(unet) * factor,
                     ("unet", "vae", "text_encoder"), text_info=text_info, variants=variants,
                     prediction_override=prediction_type)


def _dir_arch(root: Path) -> tuple[str, dict[str, Any]]:
    """A diffusers directory's family from its model_index.json: SDXL has a text_encoder_2 (a refiner no
    text_encoder); no index (stage 2's exports) or no text_encoder_2 is SD 1.x/2.x."""
    path = root / "model_index.json"
    index = read_json(path) if path.is_file() else {}
    def present(key: str) -> bool:
        value = index.get(key)
        return isinstance(value, list) and value[0] is not None
    if not present("text_encoder_2"):
        return "sd", index
    return ("sdxl" if present("text_encoder") else "sdxl-refiner"), index


def _side(unet_config: dict[str, Any]) -> int:
    sample = unet_config.get("sample_size", 64)
    return int(sample[0] if isinstance(sample, (list, tuple)) else sample)


def resolve_model(model: str | None) -> Path:
    """--model value -> a local directory or file (downloading a hub id into the HF cache when online)."""
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


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"'{path}' is missing; a diffusers-format model directory needs it") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read '{path}': {e}") from None
