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
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldm.errors import UserError
from ldm.model_info import LDM_INFO, is_valid_text_encoder_info
from ldm.singlefile.keys import CLIP_PREFIX, OPEN_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX
from ldm.weights import PICKLE_SUFFIXES, check_safetensors_file

META_KEY = "ldm"  # our entry in the safetensors header's __metadata__
FORMAT = 1
FORMAT_SDXL = 2  # SDXL files: two text encoders and the pipeline's flags (a format-1 reader refuses them)
SD_SCALING_FACTOR = 0.18215  # SD 1.x/2.x kl-f8 VAE
Shapes = dict[str, tuple[int, ...]]


@dataclass
class Detected:
    """A single file's contents: which parts it has, their configs, and how it was recognised."""

    path: Path
    family: str  # "sd1" | "sd2" | "sdxl" | "sdxl-refiner" | "ldm" (our own SD file, configs from its metadata)
    shapes: Shapes
    unet_config: dict[str, Any] | None = None
    vae_config: dict[str, Any] | None = None
    text_config: dict[str, Any] | None = None  # a transformers CLIPTextConfig as a dict (SDXL: CLIP ViT-L)
    text_layout: str | None = None  # "clip" (cond_stage_model.transformer) | "open_clip" (cond_stage_model.model)
    tokenizer: dict[str, Any] = field(default_factory=dict)  # {"pad_token": ...} or {"pad_id": 0}
    scheduler_config: dict[str, Any] | None = None
    text_info: dict[str, Any] | None = None  # ldm_model.json's text_encoder entry (layer)
    ema_keys: int = 0  # model_ema.* tensors (not used: A1111, ComfyUI and diffusers load model.diffusion_model)
    # SDXL: the second text encoder (OpenCLIP ViT-bigG as a CLIPTextModelWithProjection config), its tokenizer's
    # settings, and model_index.json's flags (_class_name, force_zeros_for_empty_prompt, requires_aesthetics_score)
    text_config_2: dict[str, Any] | None = None
    tokenizer_2: dict[str, Any] = field(default_factory=dict)
    pipeline: dict[str, Any] = field(default_factory=dict)
    from_metadata: bool = False  # configs from our `ldm` metadata entry (an ldm-convert file)

    @property
    def inpainting(self) -> bool:
        return bool(self.unet_config) and self.unet_config["in_channels"] == 9

    @property
    def sdxl(self) -> bool:
        return self.family in ("sdxl", "sdxl-refiner")

    def describe(self) -> str:
        """One line: what was detected and what the file holds."""
        name = {"sd1": "Stable Diffusion 1.x (CLIP ViT-L text encoder)", "sd2": "Stable Diffusion 2.x (OpenCLIP "
                "ViT-H text encoder)", "sdxl": "Stable Diffusion XL (CLIP ViT-L + OpenCLIP ViT-bigG text encoders)",
                "sdxl-refiner": "Stable Diffusion XL refiner (OpenCLIP ViT-bigG text encoder, aesthetic-score "
                "conditioning)", "ldm": "an ldm-convert file (configs in its metadata)"}[self.family]
        if self.sdxl and self.from_metadata:
            name += ", an ldm-convert file (configs in its metadata)"
        texts = [c for c in (self.text_config, self.text_config_2) if c]
        parts = [p for p, c in (("U-Net", self.unet_config), ("VAE", self.vae_config),
                                ("2 text encoders" if len(texts) == 2 else "text encoder", texts)) if c]
        unet = self.unet_config or {}
        extra = []
        if unet:
            extra.append(f"{unet['in_channels']}-channel{' inpainting' if self.inpainting else ''} U-Net, "
                         f"channels {list(unet['block_out_channels'])}")
        if self.ema_keys:
            extra.append(f"{self.ema_keys} model_ema.* tensors not used")
        return f"'{self.path.name}': {name}; holds {', '.join(parts) or 'nothing loadable'}" + (
            f" ({'; '.join(extra)})" if extra else "")


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
    from ldm.singlefile.sdxl import detect_sdxl, sdxl_family

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


# ------------------------------------------------------------------------------------------- configs from shapes
def blocks(shapes: Shapes, pattern: str) -> list[int]:
    return sorted({int(m[1]) for k in shapes if (m := re.match(pattern, k))})


def unet_config_from_shapes(unet: Shapes, family: str, path: Path) -> dict[str, Any]:
    """The family's preset with the sizes of this file: levels, channels, blocks per level, attention per level."""
    from ldm.unet.presets import UNET_PRESETS

    conv_in = unet["input_blocks.0.0.weight"]  # (C0, in_channels, 3, 3)
    inputs = blocks(unet, r"input_blocks\.(\d+)\.")[1:]
    downs = [i for i in inputs if f"input_blocks.{i}.0.op.weight" in unet]
    if not inputs or "out.2.weight" not in unet:
        raise UserError(f"'{path}': the U-Net (model.diffusion_model.*) is incomplete (no input blocks or no "
                        "out.2); the file is damaged or of another architecture")
    lpb = (downs[0] - 1) if downs else len(inputs)
    levels = len(downs) + 1
    channels, attention = [], []
    for level in range(levels):
        first = 1 + level * (lpb + 1)
        key = f"input_blocks.{first}.0.out_layers.3.weight"
        if key not in unet:
            raise UserError(f"'{path}': the U-Net has no '{UNET_PREFIX}{key}'; the file is damaged or of another "
                            "architecture")
        channels.append(unet[key][0])
        attention.append(f"input_blocks.{first}.1.proj_in.weight" in unet)
    context = next((s[1] for k, s in unet.items() if k.endswith("attn2.to_k.weight")), None)
    if context is None:
        raise UserError(f"'{path}': the U-Net has no cross-attention (attn2) layers; not a text-to-image SD model")
    depth = len(blocks(unet, r"input_blocks\.1\.1\.transformer_blocks\.(\d+)\.")) or 1
    preset = dict(UNET_PRESETS["sd15" if family == "sd1" else "sd21"])
    preset.update(
        block_out_channels=tuple(channels), layers_per_block=lpb,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        in_channels=conv_in[1], out_channels=unet["out.2.weight"][0], cross_attention_dim=context,
        transformer_layers_per_block=depth, sample_size=64,
    )
    if family == "sd2":  # SD 2.x: 64 channels per head (num_head_channels: 64 in its config)
        preset["attention_head_dim"] = tuple(max(1, c // 64) for c in channels)
    return preset


def vae_config_from_shapes(vae: Shapes, path: Path) -> dict[str, Any]:
    """SD's kl-f8 preset (`sd-f8`) with this file's levels, channels and blocks per level."""
    from ldm.vae.presets import preset_kwargs

    levels = blocks(vae, r"encoder\.down\.(\d+)\.")
    if not levels or "encoder.conv_in.weight" not in vae or "decoder.conv_out.weight" not in vae:
        raise UserError(f"'{path}': the VAE weights are incomplete (no encoder.down.*, encoder.conv_in or "
                        "decoder.conv_out); the file is damaged or not an SD VAE")
    config = preset_kwargs("sd-f8")
    channels = tuple(vae[f"encoder.down.{i}.block.0.conv2.weight"][0] for i in levels)
    latent = vae["decoder.conv_in.weight"][1]
    config.update(
        block_out_channels=channels, layers_per_block=len(blocks(vae, r"encoder\.down\.0\.block\.(\d+)\.")),
        down_block_types=("DownEncoderBlock2D",) * len(levels), up_block_types=("UpDecoderBlock2D",) * len(levels),
        latent_channels=latent, in_channels=vae["encoder.conv_in.weight"][1],
        out_channels=vae["decoder.conv_out.weight"][0], use_quant_conv="quant_conv.weight" in vae,
        use_post_quant_conv="post_quant_conv.weight" in vae, mid_block_add_attention="encoder.mid.attn_1.q.weight" in vae,
        scaling_factor=SD_SCALING_FACTOR, sample_size=512,
    )
    return config


def text_config_from_shapes(text: Shapes, layout: str, path: Path) -> dict[str, Any]:
    """CLIP ViT-L (SD 1.x) or OpenCLIP ViT-H's text tower as a transformers CLIPTextConfig (as a dict)."""
    from ldm.text.tiny import BOS_ID, EOS_ID

    if layout == "clip":
        text = {k.removeprefix("text_model."): s for k, s in text.items()}
        token, position = "embeddings.token_embedding.weight", "embeddings.position_embedding.weight"
        layers, fc1, act = len(blocks(text, r"encoder\.layers\.(\d+)\.")), "encoder.layers.0.mlp.fc1.weight", \
            "quick_gelu"
    else:
        token, position, fc1, act = "token_embedding.weight", "positional_embedding", \
            "transformer.resblocks.0.mlp.c_fc.weight", "gelu"
        # SD 2.x conditions on the penultimate block's output (then ln_final): the model is one block shorter,
        # as diffusers' SD 2 text encoder is (23 of OpenCLIP ViT-H's 24)
        layers = len(blocks(text, r"transformer\.resblocks\.(\d+)\.")) - 1
    if token not in text or position not in text or fc1 not in text or layers < 1:
        raise UserError(f"'{path}': the text encoder weights are incomplete (no {token}, {position} or layers); "
                        "the file is damaged")
    vocab, hidden = text[token]
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=text[fc1][0], num_hidden_layers=layers,
                num_attention_heads=max(1, hidden // 64), max_position_embeddings=text[position][0],
                hidden_act=act, projection_dim=hidden, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID)


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
