"""The OpenCLIP text-tower weights an SD 2.x diffusers text encoder has no place for, kept beside it in
`text_encoder/open_clip_extra.safetensors`, and the neutral ones a single file gets when a model has none.

SD 2.x conditions on the penultimate layer of OpenCLIP ViT-H's 24-block text tower. diffusers' SD 2 text encoder (a
transformers `CLIPTextModel`) is that tower cut one block short: 23 blocks, whose last hidden state (after
`final_layer_norm`) is the penultimate layer, and no contrastive head. So diffusers' reader drops three parts of an
original checkpoint (its `SD_2_TEXT_ENCODER_KEYS_TO_IGNORE`), all under `cond_stage_model.model.` (D = 1024):

    transformer.resblocks.23.*   the last block, 12 tensors: ln_1, attn.in_proj_weight (3D, D) / in_proj_bias (3D,),
                                 attn.out_proj (D, D) / (D,), ln_2, mlp.c_fc (4D, D) / (4D,), mlp.c_proj (D, 4D) / (D,)
    text_projection              (D, D): the pooled end token @ text_projection, CLIP's text embedding
    logit_scale                  (): log of the contrastive temperature's inverse

Tools that read the original layout build the whole tower: ComfyUI's SD 2 text model has 24 layers, an identity
(D, D) projection and a logit scale by default, and warns "clip missing" (18 keys) for a file without them
(https://github.com/comfyanonymous/ComfyUI: comfy/supported_models.py SD20, comfy/text_encoders/sd2_clip_config.json,
comfy/sd.py load_checkpoint_guess_config). So every SD 2.x-layout file `ldm-convert` writes has them:

- file -> directory keeps the file's (whatever the model has no place for: the blocks past its last, the projection,
  the scale), in open_clip's own names (the ones above without the prefix), in `text_encoder/open_clip_extra
  .safetensors`: beside the text encoder they belong to, so they go where `text_encoder/` is copied or swapped.
  transformers reads only `model.safetensors` there, so diffusers, this package and anything else loading the
  directory ignore the file. A tail equal to the neutral one (below) is not written: a directory without the file
  means it.
- directory -> file writes the kept ones back unchanged (a file -> directory -> file round trip is bit-exact) and
  the neutral ones for any part the directory does not have (a diffusers SD 2 directory, a model trained here).

The neutral tail changes no image:
- the last block: every weight zero but the layer norms' scales (1). Its attention and MLP outputs (`attn.out_proj`
  and `mlp.c_proj`, zero weight and bias) add exactly 0 to the residual stream, so the last layer's output is the
  penultimate layer's, bit for bit: what reads the penultimate layer (SD 2.x, ComfyUI's default, diffusers, this
  package) gets what it got before, and what reads the last layer now gets the same.
- `text_projection`: the identity (ComfyUI's default); `logit_scale`: ln(100) = 4.6052, the bound OpenCLIP's
  training clamps it to, where trained models sit (open_clip_train/train.py). SD 2.x's U-Net uses neither.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from ldm.errors import UserError
from ldm.singlefile.keys import OPEN_CLIP_PREFIX, State

EXTRA_FILE = "open_clip_extra.safetensors"  # in the model directory's text_encoder/
_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.")


def is_extra(name: str, layers: int) -> bool:
    """Whether `name` (an open_clip text-tower name, without `cond_stage_model.model.`) is one a `layers`-block
    diffusers text encoder has no place for."""
    if name in ("text_projection", "logit_scale"):
        return True
    m = _BLOCK.match(name)
    return m is not None and int(m[1]) >= layers


def neutral_extra(config: dict[str, Any], dtype: torch.dtype = torch.float32,
                  device: torch.device | str | None = None) -> State:
    """The neutral tail of a text encoder with `config` (a CLIPTextConfig as a dict): block `num_hidden_layers`
    (the identity on the residual stream), an identity (D, D) `text_projection`, `logit_scale` = ln(100)."""
    d, f, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    shapes = {"ln_1.weight": (d,), "ln_1.bias": (d,), "attn.in_proj_weight": (3 * d, d), "attn.in_proj_bias": (3 * d,),
              "attn.out_proj.weight": (d, d), "attn.out_proj.bias": (d,), "ln_2.weight": (d,), "ln_2.bias": (d,),
              "mlp.c_fc.weight": (f, d), "mlp.c_fc.bias": (f,), "mlp.c_proj.weight": (d, f), "mlp.c_proj.bias": (d,)}
    out = {f"transformer.resblocks.{n}.{k}": (torch.ones if k in ("ln_1.weight", "ln_2.weight") else torch.zeros)(
        s, dtype=dtype, device=device) for k, s in shapes.items()}
    out["text_projection"] = torch.eye(d, dtype=dtype, device=device)  # (D, D), used as pooled @ P
    out["logit_scale"] = torch.tensor(math.log(100), dtype=dtype, device=device)  # shape (): open_clip's
    return out


def check_extra(extra: State, config: dict[str, Any], where: Path) -> None:
    """Refuse a kept tail that is not this text encoder's: a name or a shape the neutral tail does not have (the
    projection may be (D, P) for any P)."""
    expected = {k: tuple(v.shape) for k, v in neutral_extra(config, device="meta").items()}
    for name, value in extra.items():
        shape = tuple(value.shape)
        fits = (name in expected and (shape == expected[name] or (name == "text_projection" and len(shape) == 2
                                                                  and shape[0] == expected[name][0])))
        if not fits:
            want = f"shape {expected[name]}" if name in expected else f"one of {sorted(expected)[:3]}..."
            raise UserError(f"'{where}': the OpenCLIP weight '{name}' {tuple(shape)} is not one of this text "
                            f"encoder's ({want}); the file is damaged or from another model: remove it (a neutral "
                            "one is used instead)")


def read_file_extra(path: Path, config: dict[str, Any], dtype: torch.dtype) -> State:
    """The text-tower tensors of single file `path` (SD 2.x layout) that its diffusers text encoder drops, in
    open_clip's names, in `dtype`; empty for a file without any (one written before ldm-convert kept them)."""
    from ldm.weights import read_safetensors

    layers = config["num_hidden_layers"]
    tensors = read_safetensors(path, lambda name: name.startswith(OPEN_CLIP_PREFIX)
                               and is_extra(name[len(OPEN_CLIP_PREFIX):], layers))[0]
    extra = {k[len(OPEN_CLIP_PREFIX):]: v.to(dtype) for k, v in tensors.items()}
    check_extra(extra, config, path)
    return extra


def write_extra(text_dir: Path, extra: State, config: dict[str, Any]) -> Path | None:
    """Write `extra` to `text_dir/open_clip_extra.safetensors`, unless it is empty or the neutral tail itself."""
    from ldm.files import atomic_write_safetensors

    if not extra:
        return None
    dtype = next(iter(extra.values())).dtype
    neutral = neutral_extra(config, dtype)
    if extra.keys() == neutral.keys() and all(torch.equal(v, neutral[k]) for k, v in extra.items()):
        return None
    path = text_dir / EXTRA_FILE
    atomic_write_safetensors(path, {k: v.contiguous() for k, v in extra.items()})
    return path


def directory_extra(text_dir: Path, config: dict[str, Any], dtype: torch.dtype) -> State:
    """The tail a single file gets for the text encoder in `text_dir`, in open_clip's names and `dtype`: the kept
    one (`open_clip_extra.safetensors`), with the neutral part for whatever it lacks."""
    from ldm.weights import check_safetensors_file, read_safetensors

    out = neutral_extra(config, dtype)
    path = text_dir / EXTRA_FILE
    if path.is_file():
        check_safetensors_file(path)  # truncated, a git-lfs pointer: named
        kept = read_safetensors(path)[0]
        check_extra(kept, config, path)
        out.update({k: v.to(dtype) for k, v in kept.items()})
    return out
