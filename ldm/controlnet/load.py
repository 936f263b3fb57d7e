"""Opening a ControlNet: find it (a path, or a name in --controlnet-dir), read what it is from its config or header
(no weight is read), check that it fits the model, load it (safetensors only, strictly).

Two layouts:
- a diffusers directory (`ControlNetModel.save_pretrained`): config.json + diffusion_pytorch_model.safetensors;
- a single .safetensors file with the original (lllyasviel's cldm) names, `control_model.` prefix or none
  (`ldm.singlefile.keys.controlnet_to_original`: the U-Net's names for the encoder it copies, plus `zero_convs.N.0`,
  `middle_block_out.0`, `input_hint_block.*`; SDXL adds `label_emb`), or with diffusers' names in one file
  (lllyasviel/sd_control_collection's `diffusers_xl_*`). A file's config is the model's U-Net's (a ControlNet copies
  the U-Net's encoder, diffusers' `ControlNetModel.from_unet`; attention heads are not in the weights) with what
  the file's shapes say: the hint channels and conditioning-embedding widths, the transformer depth per level.

What must fit the model, from configs and headers before any weight is read: the family (the cross-attention
width, 768 SD 1.x, 1024 SD 2.x, 2048 SDXL, and SDXL's "text_time" addition embedding, `label_emb`), the latent
channels, and the conditioning embedding's downsampling, which must be the VAE factor so that a control image at
the generation size meets the latents.

A1111 names a ControlNet `NAME [hash]`: the file's stem and its old 8-digit model hash, the sha256 of the 64 KiB at
offset 1 MiB (modules/sd_models.py `model_hash`); a directory's is that of its weights file.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from ldm.controlnet.unit import ControlUnit, model_name, where
from ldm.errors import UserError
from ldm.files import a1111_model_hash
from ldm.singlefile import keys
from ldm.weights import PICKLE_SUFFIXES, check_weights, read_safetensors

log = logging.getLogger(__name__)

CONFIG_CLASS = "ControlNetModel"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}  # cross-attention width -> family
# what ControlNetModel.from_unet copies from the U-Net's config
_FROM_UNET = ("in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "only_cross_attention",
              "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn",
              "norm_num_groups", "norm_eps", "cross_attention_dim", "attention_head_dim", "num_attention_heads",
              "use_linear_projection", "class_embed_type", "num_class_embeds", "upcast_attention",
              "resnet_time_scale_shift", "projection_class_embeddings_input_dim", "mid_block_type",
              "transformer_layers_per_block", "encoder_hid_dim", "encoder_hid_dim_type", "addition_embed_type",
              "addition_time_embed_dim")


@dataclass(frozen=True)
class ControlNetSpec:
    """A ControlNet's facts, from its config or header."""

    name: str  # the file's stem or the directory's name
    path: Path
    layout: str  # "diffusers" (a directory) | "original" | "diffusers-file" (diffusers' names in one file)
    prefix: str  # a file's key prefix ("control_model." or "")
    shapes: dict[str, tuple[int, ...]]  # a file's tensor shapes under diffusers' or the original names ({} for dirs)
    cross_attention_dim: int | None
    sdxl: bool  # SDXL's "text_time" addition embedding
    in_channels: int
    factor: int  # pixels per latent pixel of the conditioning embedding (2 ** its stride-2 convolutions)
    global_pool: bool = False  # diffusers' global_pool_conditions (shuffle models): a guess-mode model

    @cached_property
    def hash(self) -> str:
        """A1111's old 8-digit model hash (see the module docstring)."""
        path = min(self.path.glob("*.safetensors")) if self.path.is_dir() else self.path  # WEIGHTS_FILE, or a variant
        return a1111_model_hash(path)

    @property
    def title(self) -> str:
        return f"{self.name} [{self.hash}]"

    @property
    def family(self) -> str:
        return "SDXL" if self.sdxl else FAMILIES.get(self.cross_attention_dim or 0, "SD 1.x/2.x")


# ------------------------------------------------------------------------------------------------ finding and facts

def list_controlnets(directory: str | Path) -> dict[str, Path]:
    """Name -> path of every ControlNet in `directory` and below: `*.safetensors` files by stem, diffusers
    directories (config.json of a ControlNetModel) by name, the first in sorted order on a clash (with a warning)."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise UserError(f"--controlnet-dir '{directory}' is not a directory")
    found: dict[str, Path] = {}

    def walk(folder: Path) -> None:
        for path in sorted(folder.iterdir()):
            if path.is_dir():
                if _is_controlnet_dir(path):
                    _add(found, path.name, path)
                else:
                    walk(path)
            elif path.suffix == ".safetensors":
                _add(found, path.stem, path)

    walk(root)
    return found


def _add(found: dict[str, Path], name: str, path: Path) -> None:
    if name in found:
        log.warning("two ControlNets are named '%s' (%s and %s); using the first", name, found[name], path)
    else:
        found[name] = path


def _is_controlnet_dir(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("_class_name") == CONFIG_CLASS
    except (OSError, ValueError, AttributeError):
        return False


def find_controlnet(model: str, directory: str | Path | None) -> Path:
    """What a unit's `model` names: a name (or A1111 title 'NAME [hash]') in `directory`, else a path."""
    if directory is not None:
        listed = list_controlnets(directory)
        if model_name(model) in listed:
            return listed[model_name(model)]
    path = Path(model).expanduser()
    if path.exists():
        return path
    if directory is None:
        raise UserError(f"ControlNet '{model}' is not a file or directory: pass its path, or --controlnet-dir DIR "
                        "that holds it")
    pickles = [p for p in Path(directory).expanduser().rglob(f"{model_name(model)}.*") if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise UserError(f"ControlNet '{model}' is only in --controlnet-dir as the pickle file '{pickles[0]}', which "
                        "is never loaded: use its .safetensors version")
    raise UserError(f"ControlNet '{model_name(model)}' is not in --controlnet-dir '{directory}' (it has: "
                    f"{', '.join(list_controlnets(directory)) or 'nothing'}) nor a path")


def inspect_controlnet(path: Path) -> ControlNetSpec:
    """A ControlNet's facts from its config.json or safetensors header; a one-line `UserError` for anything else."""
    if path.is_dir():
        return _inspect_dir(path)
    from ldm.singlefile.detect import read_header  # refuses pickles, truncated files, git-lfs pointers

    shapes, _ = read_header(path)
    prefix = keys.CONTROLNET_PREFIX if f"{keys.CONTROLNET_PREFIX}input_hint_block.0.weight" in shapes else ""
    if f"{prefix}input_hint_block.0.weight" in shapes:
        shapes = {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)}
        hint = {int(m[1]) for k in shapes if (m := re.match(r"input_hint_block\.(\d+)\.weight$", k))}
        attention = next((s for k, s in shapes.items() if k.endswith("attn2.to_k.weight")), None)
        return ControlNetSpec(path.stem, path, "original", prefix, shapes, attention[1] if attention else None,
                              "label_emb.0.0.weight" in shapes, shapes["input_blocks.0.0.weight"][1],
                              2 ** (len(hint) // 2 - 1))
    if "controlnet_cond_embedding.conv_in.weight" in shapes:
        blocks = {int(m[1]) for k in shapes if (m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.weight$",
                                                              k))}
        attention = next((s for k, s in shapes.items() if k.endswith("attn2.to_k.weight")), None)
        return ControlNetSpec(path.stem, path, "diffusers-file", "", shapes, attention[1] if attention else None,
                              "add_embedding.linear_1.weight" in shapes, shapes["conv_in.weight"][1],
                              2 ** (len(blocks) // 2))
    raise _not_a_controlnet(path, shapes)


def _inspect_dir(path: Path) -> ControlNetSpec:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"'{path}' is not a ControlNet directory (config.json + {WEIGHTS_FILE}): cannot read its "
                        f"config.json ({e})") from None
    if not isinstance(config, dict) or config.get("_class_name") != CONFIG_CLASS:
        what = config.get("_class_name") if isinstance(config, dict) else None
        raise UserError(f"'{path}' is not a ControlNet directory: its config.json is a {what or 'something else'}, "
                        f"not a {CONFIG_CLASS}")
    check_weights(path)
    widths = config.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)
    return ControlNetSpec(path.name, path, "diffusers", "", {}, config.get("cross_attention_dim"),
                          config.get("addition_embed_type") == "text_time", config.get("in_channels", 4),
                          2 ** (len(widths) - 1), bool(config.get("global_pool_conditions")))


def _not_a_controlnet(path: Path, shapes: dict[str, tuple[int, ...]]) -> UserError:
    from collections import Counter

    if any(k.startswith(keys.UNET_PREFIX) for k in shapes):
        return UserError(f"'{path}' is a Stable Diffusion checkpoint, not a ControlNet: pass it as --model")
    if any(".lora_" in k or k.startswith("lora_") for k in shapes):
        return UserError(f"'{path}' is a LoRA, not a ControlNet: pass it with --lora")
    groups = Counter(".".join(k.split(".")[:2]) for k in shapes)
    found = ", ".join(f"{g}.* ({n})" for g, n in groups.most_common(4)) or "no tensors"
    return UserError(f"'{path}' is not a ControlNet (no input_hint_block.* or controlnet_cond_embedding.* weights): "
                     f"found {found}")


def check_fits(spec: ControlNetSpec, unet_config: Any, vae_factor: int, name: str) -> None:
    """Refuse a ControlNet made for another model (family, latent channels, VAE factor), naming both, in one line."""
    sdxl = unet_config.get("addition_embed_type") == "text_time"
    context = unet_config.get("cross_attention_dim")
    model = "SDXL" if sdxl else FAMILIES.get(context, "SD 1.x/2.x")
    if spec.sdxl != sdxl or (spec.cross_attention_dim is not None and spec.cross_attention_dim != context):
        has = [f"{spec.cross_attention_dim}-dim text features"] if spec.cross_attention_dim else []
        has += ["text_time embedding"] if spec.sdxl else []
        raise UserError(f"{name} is a ControlNet for {spec.family} ({', '.join(has) or 'no cross-attention'}) but the "
                        f"model is {model} ({context}-dim): use a ControlNet made for the model's family")
    latent = unet_config.get("out_channels", 4)
    if spec.in_channels != latent:
        raise UserError(f"{name} takes {spec.in_channels}-channel latents, the model's have {latent}: use a "
                        "ControlNet made for it")
    if spec.factor != vae_factor:
        raise UserError(f"{name} downsamples its control image by {spec.factor}, the model's VAE by {vae_factor}: "
                        "use a ControlNet made for the model's family")


def check_units(units: tuple[ControlUnit, ...], unet_config: Any, vae_factor: int,
                directory: str | Path | None) -> list[ControlNetSpec]:
    """Every unit's ControlNet found, inspected and checked against the model; no weight is read."""
    specs = []
    for i, unit in enumerate(units):
        spec = inspect_controlnet(find_controlnet(unit.model, directory))
        check_fits(spec, unet_config, vae_factor, f"{where(units, i)} ({spec.path})")
        specs.append(spec)
    return specs


# ----------------------------------------------------------------------------------------------------------- loading

def load_controlnet(spec: ControlNetSpec, unet_config: Any, device: torch.device, dtype: torch.dtype):
    """The `ControlNetModel`, frozen, on `device` in `dtype`."""
    from diffusers import ControlNetModel

    if spec.layout == "diffusers":
        try:
            model = ControlNetModel.from_pretrained(spec.path, torch_dtype=dtype, use_safetensors=True)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot load the ControlNet '{spec.path}': {first}") from None
    else:
        model = _load_file(spec, unet_config, dtype)
    return model.to(device).eval().requires_grad_(False)


def _load_file(spec: ControlNetSpec, unet_config: Any, dtype: torch.dtype):
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel

    from ldm.singlefile.load import load_strict

    config = _file_config(spec, unet_config)
    with init_empty_weights(include_buffers=False):
        model = ControlNetModel.from_config(config)
    names = list(model.state_dict())
    original = keys.controlnet_to_original(names, dict(model.config)) if spec.layout == "original" else \
        {n: n for n in names}
    to_ours = {v: k for k, v in original.items()}
    tensors, _ = read_safetensors(spec.path, lambda k: k.startswith(spec.prefix))
    state = {to_ours.get(k[len(spec.prefix):], k[len(spec.prefix):]): v.to(dtype) for k, v in tensors.items()}
    return load_strict(model, state, "ControlNet", spec.path)


def _file_config(spec: ControlNetSpec, unet_config: Any) -> dict[str, Any]:
    """The model's U-Net config (what from_unet copies) with the file's hint block and transformer depths."""
    config = {k: unet_config[k] for k in _FROM_UNET if k in unet_config}
    shapes, lpb = spec.shapes, config["layers_per_block"]
    levels = len(config["block_out_channels"])
    if spec.layout == "original":
        hint = sorted({int(m[1]) for k in shapes if (m := re.match(r"input_hint_block\.(\d+)\.weight$", k))})
        widths = [shapes[f"input_hint_block.{i}.weight"][0] for i in hint[:-1]][::2]
        conditioning = shapes["input_hint_block.0.weight"][1]
        depth = [_count(shapes, rf"input_blocks\.{1 + level * (lpb + 1)}\.1\.transformer_blocks\.(\d+)\.")
                 for level in range(levels)]
    else:
        blocks = sorted({int(m[1]) for k in shapes
                         if (m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.weight$", k))})
        widths = [shapes["controlnet_cond_embedding.conv_in.weight"][0]] + [
            shapes[f"controlnet_cond_embedding.blocks.{j}.weight"][0] for j in blocks[1::2]]
        conditioning = shapes["controlnet_cond_embedding.conv_in.weight"][1]
        depth = [_count(shapes, rf"down_blocks\.{level}\.attentions\.0\.transformer_blocks\.(\d+)\.")
                 for level in range(levels)]
    config.update(conditioning_channels=conditioning, conditioning_embedding_out_channels=tuple(widths),
                  in_channels=spec.in_channels)
    if any(depth):  # levels without attention keep the U-Net's value (diffusers ignores it there)
        unet_depth = config.get("transformer_layers_per_block", 1)
        unet_depth = [unet_depth] * levels if isinstance(unet_depth, int) else list(unet_depth)
        config["transformer_layers_per_block"] = tuple(d or u for d, u in zip(depth, unet_depth))
    return config


def _count(shapes: dict[str, Any], pattern: str) -> int:
    return len({m[1] for k in shapes if (m := re.match(pattern, k))})
