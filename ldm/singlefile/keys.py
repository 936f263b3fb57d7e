"""diffusers names -> the original (CompVis) single-file names: the direction diffusers does not ship.

diffusers reads the original layout (`diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`); this module is their
inverse and nothing more. The writer (`ldm.singlefile.save.directory_to_file`) then runs diffusers' own converters
on what each `*_to_original` gave and checks (`check_inverse`) that they give back exactly the state dict it started
from, so a file written here is, by construction, one diffusers (and therefore A1111 and ComfyUI, which use the same
names) reads back as the same model.

ControlNets are read through `controlnet_to_original`, the names a ControlNet file in the original layout has for
each of the model's weights (ldm/controlnet/load.py), since diffusers' reader knows only the 4-level hint block and
no SDXL `label_emb`; where it does read a file, both give the same (tests/test_controlnet.py).

Shapes that differ between the layouts: the VAE's mid-block attention is 1x1 convolutions in the original
((C, C, 1, 1)) and linear layers in diffusers ((C, C)); OpenCLIP keeps q, k and v in one `in_proj` ((3D, D)) where
transformers' CLIP has three (D, D) projections. Both are reshapes/concatenations, so the round trip is exact.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from diffusers.loaders import single_file_utils as sfu

from ldm.errors import UserError

UNET_PREFIX = sfu.LDM_UNET_KEY  # "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: transformers' CLIPTextModel under .text_model
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: open_clip's text tower
# SDXL (Stability's sgm layout): base = CLIP ViT-L (transformers names) + OpenCLIP ViT-bigG; refiner = bigG only
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_BIGG_PREFIX = "conditioner.embedders.1.model."
SDXL_REFINER_BIGG_PREFIX = "conditioner.embedders.0.model."

State = dict[str, torch.Tensor]

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_UNET_LAYERS = sfu.DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]  # diffusers -> original: time embedding, conv_in, conv_norm_out, conv_out
_ADD_EMBEDDING = sfu.DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]  # SDXL: add_embedding -> label_emb.0
_VAE_LAYERS = sfu.DIFFUSERS_TO_LDM_MAPPING["vae"]
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
               "self_attn.out_proj": "attn.out_proj"}
_OPEN_CLIP_TOP = {"embeddings.position_embedding.weight": "positional_embedding",
                  "embeddings.token_embedding.weight": "token_embedding.weight",
                  "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


def _no_layout(part: str, key: str) -> UserError:
    return UserError(f"the {part} has a weight ('{key}') that the original single-file layout has no name for; "
                     "keep this model as a diffusers directory")


# ------------------------------------------------------------------------------------------------------------ U-Net
def unet_to_original(state: State, config: dict[str, Any]) -> State:
    """diffusers `UNet2DConditionModel` state dict -> `model.diffusion_model.*` (SD 1.x/2.x/XL input/middle/output
    blocks). Input block 0 is conv_in; each level then has `layers_per_block` (resnet, attention) entries and a
    downsampler (not the last level); each up level has `layers_per_block + 1` entries, the upsampler in its last.
    SDXL's micro-conditioning embedding (`add_embedding`, addition_embed_type "text_time") is `label_emb.0`; its
    per-level transformer depth needs no renaming (`transformer_blocks.N` keep their names)."""
    lpb = config["layers_per_block"]
    addition = config.get("addition_embed_type")
    if (not isinstance(lpb, int) or config.get("class_embed_type") or addition not in (None, "text_time")
            or config.get("reverse_transformer_layers_per_block")):
        raise UserError("this U-Net (per-level layers_per_block, class embeddings, an addition embedding other than "
                        "SDXL's, or reverse_transformer_layers_per_block) has no original single-file layout; keep "
                        "it as a diffusers directory")
    layers = {**_UNET_LAYERS, **(_ADD_EMBEDDING if addition == "text_time" else {})}
    up_attention = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    out: State = {}
    for key, value in state.items():
        out[UNET_PREFIX + _unet_name(key, lpb, up_attention, layers)] = value
    return out


def _unet_name(key: str, lpb: int, up_attention: list[bool], layers: dict[str, str]) -> str:
    if key in layers:
        return layers[key]
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        i = 1 + level * (lpb + 1) + j
        return f"input_blocks.{i}.0.{_resnet(rest, key)}" if kind == "resnets" else f"input_blocks.{i}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", key):
        return f"input_blocks.{1 + int(m[1]) * (lpb + 1) + lpb}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2], key)}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        i = level * (lpb + 1) + j
        return f"output_blocks.{i}.0.{_resnet(rest, key)}" if kind == "resnets" else f"output_blocks.{i}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", key):
        level = int(m[1])
        # the upsampler follows the resnet (.0) and, in a cross-attention level, the attention (.1)
        return f"output_blocks.{level * (lpb + 1) + lpb}.{2 if up_attention[level] else 1}.conv.{m[2]}"
    raise _no_layout("U-Net", key)


def _resnet(rest: str, key: str) -> str:
    head, _, tail = rest.partition(".")
    if head not in _RESNET:
        raise _no_layout("U-Net", key)
    return f"{_RESNET[head]}.{tail}"


# ------------------------------------------------------------------------------------------------------- ControlNet
CONTROLNET_PREFIX = sfu.LDM_CONTROLNET_KEY  # "control_model." (lllyasviel's cldm files; many files drop it)


def controlnet_to_original(names: list[str], config: dict[str, Any]) -> dict[str, str]:
    """diffusers `ControlNetModel` names -> the original (cldm) names, without the `control_model.` prefix.

    A ControlNet is a copy of the U-Net's encoder (conv_in, time embedding, SDXL's label_emb, input and middle
    blocks: the U-Net's own names, from `_unet_name`) plus its own parts: `zero_convs.N.0` (one 1x1 zero conv per
    input block, diffusers' `controlnet_down_blocks.N`), `middle_block_out.0` (`controlnet_mid_block`) and
    `input_hint_block.{0,2,4,...}` (the conditioning embedding's convolutions, SiLUs between them:
    conv_in, blocks.0, ..., conv_out)."""
    lpb = config["layers_per_block"]
    addition = config.get("addition_embed_type")
    if not isinstance(lpb, int) or config.get("class_embed_type") or addition not in (None, "text_time"):
        raise UserError("this ControlNet (per-level layers_per_block, class embeddings or an addition embedding "
                        "other than SDXL's) has no original single-file layout")
    layers = {**_UNET_LAYERS, **(_ADD_EMBEDDING if addition == "text_time" else {})}
    hint_out = 2 * (2 * len(config["conditioning_embedding_out_channels"]) - 1)  # 14 for the usual 4 levels
    out: dict[str, str] = {}
    for key in names:
        if m := re.fullmatch(r"controlnet_down_blocks\.(\d+)\.(weight|bias)", key):
            out[key] = f"zero_convs.{m[1]}.0.{m[2]}"
        elif m := re.fullmatch(r"controlnet_mid_block\.(weight|bias)", key):
            out[key] = f"middle_block_out.0.{m[1]}"
        elif m := re.fullmatch(r"controlnet_cond_embedding\.conv_in\.(weight|bias)", key):
            out[key] = f"input_hint_block.0.{m[1]}"
        elif m := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)\.(weight|bias)", key):
            out[key] = f"input_hint_block.{2 * (int(m[1]) + 1)}.{m[2]}"
        elif m := re.fullmatch(r"controlnet_cond_embedding\.conv_out\.(weight|bias)", key):
            out[key] = f"input_hint_block.{hint_out}.{m[1]}"
        else:
            out[key] = _unet_name(key, lpb, [], layers)
    return out


# -------------------------------------------------------------------------------------------------------------- VAE
def vae_to_original(state: State, config: dict[str, Any], prefix: str = VAE_PREFIX) -> State:
    """diffusers `AutoencoderKL` state dict -> `first_stage_model.*` (encoder.down.N / decoder.up.N, reversed)."""
    levels = len(config["block_out_channels"])
    out: State = {}
    for key, value in state.items():
        name, value = _vae_name(key, value, levels, _VAE_LAYERS)
        out[prefix + name] = value
    return out


def _vae_name(key: str, value: torch.Tensor, levels: int, layers: dict[str, str]) -> tuple[str, torch.Tensor]:
    if key in layers:
        return layers[key], value
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_shortcut(m[3])}", value
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}", value
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{_shortcut(m[3])}", value
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}", value
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_shortcut(m[3])}", value
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\."
                         r"(weight|bias)", key):
        if m[2] != "group_norm" and m[3] == "weight":
            value = value.reshape(*value.shape, 1, 1)  # linear (C, C) -> 1x1 conv (C, C, 1, 1)
        return f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}", value
    raise _no_layout("VAE", key)


def _shortcut(rest: str) -> str:
    return rest.replace("conv_shortcut", "nin_shortcut")


# ----------------------------------------------------------------------------------------------------- text encoder
def clip_to_original(state: State, prefix: str = CLIP_PREFIX) -> State:
    """transformers `CLIPTextModel` -> `<prefix>text_model.*` (SD 1.x `cond_stage_model.transformer.`, SDXL's first
    encoder `conditioner.embedders.0.transformer.`: transformers' own names under a prefix)."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()}


def open_clip_to_original(state: State, prefix: str = OPEN_CLIP_PREFIX) -> State:
    """transformers `CLIPTextModel` / `CLIPTextModelWithProjection` -> `<prefix>*` in open_clip's names (SD 2.x
    `cond_stage_model.model.`, SDXL's bigG `conditioner.embedders.{1,0}.model.`): q, k and v concatenated into
    `in_proj_weight`/`in_proj_bias` ((3D, D) / (3D,)), the rest renamed. The projection (bigG) is transposed:
    open_clip's `text_projection` is (D, P), used as `pooled @ P`; transformers' `text_projection.weight` is the
    nn.Linear's (P, D)."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out: State = {}
    for key, value in state.items():
        if key in _OPEN_CLIP_TOP:
            out[prefix + _OPEN_CLIP_TOP[key]] = value
            continue
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T  # (P, D) -> (D, P)
            continue
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if m is None:
            raise _no_layout("text encoder", key)
        block = f"{prefix}transformer.resblocks.{m[1]}."
        if m[2] in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            if m[2] == "self_attn.q_proj":
                parts = [state[f"encoder.layers.{m[1]}.self_attn.{p}_proj.{m[3]}"] for p in "qkv"]
                out[block + f"attn.in_proj_{m[3]}"] = torch.cat(parts, dim=0)
            continue
        if m[2] not in _CLIP_LAYER:
            raise _no_layout("text encoder", key)
        out[block + f"{_CLIP_LAYER[m[2]]}.{m[3]}"] = value
    return out


# ----------------------------------------------------------------------------------------------- diffusers' readers
def unet_from_original(checkpoint: State, config: dict[str, Any]) -> State:
    return sfu.convert_ldm_unet_checkpoint(checkpoint, config)


def controlnet_from_original(checkpoint: State, config: dict[str, Any]) -> State:
    """diffusers' reader of SD 1.x/2.x ControlNets (the usual 4-level hint block; no SDXL label_emb)."""
    return sfu.convert_controlnet_checkpoint(checkpoint, config)


def vae_from_original(checkpoint: State, config: dict[str, Any]) -> State:
    return sfu.convert_ldm_vae_checkpoint(checkpoint, config)


def clip_from_original(checkpoint: State, prefix: str = CLIP_PREFIX) -> State:
    """SD 1.x / SDXL text weights under `prefix` -> transformers 5 `CLIPTextModel` names (no `text_model.` level)."""
    state = sfu.convert_ldm_clip_checkpoint({k: v for k, v in checkpoint.items() if k.startswith(prefix)})
    return {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}


def open_clip_from_original(checkpoint: State, hidden_size: int, prefix: str = OPEN_CLIP_PREFIX,
                            projection: bool = False, layers: int | None = None) -> State:
    """OpenCLIP text weights under `prefix` -> transformers names without the `text_model.` level: SD 2.x's
    `CLIPTextModel`, whose `layers` blocks are OpenCLIP's first (the blocks past them, OpenCLIP's last, are dropped:
    diffusers' converter drops it only when it is block 23 of 24; ldm/singlefile/open_clip_extra.py keeps it), or
    with `projection` SDXL's bigG `CLIPTextModelWithProjection` (`text_projection.weight` kept, transposed back by
    diffusers' converter; the caller adds the `text_model.` level that model has)."""

    class _Config:  # the converter reads only the model's hidden size, to split in_proj
        class config:
            pass

    _Config.config.hidden_size = hidden_size
    state = sfu.convert_open_clip_checkpoint(_Config, {k: v for k, v in checkpoint.items() if k.startswith(prefix)},
                                             prefix=prefix)
    state = {k.removeprefix("text_model."): v for k, v in state.items() if projection or k != "text_projection.weight"}
    if layers is None:
        return state
    return {k: v for k, v in state.items() if not k.startswith("encoder.layers.") or int(k.split(".")[2]) < layers}


def check_inverse(ours: State, back: State, part: str) -> None:
    """diffusers' reader gave back the same names and the very same tensors (values compared, not just shapes)."""
    if ours.keys() != back.keys():
        missing, extra = sorted(ours.keys() - back.keys()), sorted(back.keys() - ours.keys())
        raise AssertionError(f"{part}: diffusers' converter does not invert ours (lost {missing[:3]}, "
                             f"new {extra[:3]})")
    for key, value in ours.items():
        if value.shape != back[key].shape or not torch.equal(value, back[key]):
            raise AssertionError(f"{part}: '{key}' does not survive diffusers' converter")
