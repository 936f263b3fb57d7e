"""Writing helpers both conversions share (SD 1.x/2.x in save.py, SDXL in save_sdxl.py): component configs and
weights read from a directory, tokenizer checks, the atomic single-file and directory writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ldm.errors import UserError
from ldm.files import atomic_directory, atomic_write_safetensors, os_reason, remove_tree
from ldm.singlefile import keys
from ldm.singlefile.open_clip_extra import EXTRA_FILE

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

    files = sorted(p for p in sub.glob("*.safetensors") if p.name != EXTRA_FILE and (
        (variant is None) == (len(p.name.split(".")) == 2) or (variant is not None and f".{variant}" in p.name)))
    state: keys.State = {}
    for f in files:
        state.update(load_file(str(f)))
    return state

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


def file_dtype(path: Path) -> torch.dtype:
    """The dtype most of the file's U-Net is stored in (fp16 files stay fp16, fp32 stay fp32)."""
    from ldm.singlefile.detect import read_header
    from ldm.weights import check_safetensors_file

    read_header(path)  # pickles and other suffixes are refused first
    header = check_safetensors_file(path)
    kinds = [v["dtype"] for k, v in header.items() if k.startswith(keys.UNET_PREFIX)]
    common = max(set(kinds), key=kinds.count) if kinds else "F32"
    return {"F16": torch.float16, "BF16": torch.bfloat16}.get(common, torch.float32)
