"""`ldm_model.json`, the one home for it: what a diffusers model directory cannot say about its text encoder.

diffusers' layout cannot say "use the penultimate layer" or "this is an open_clip model". Stage 2's export
(`ldm.unet.export`) and ldm-convert (`ldm.singlefile.save`) write it at the top of a model directory, the pipeline
reads it; a plain diffusers model has no such file and means CLIP, last layer:

    {"text_encoder": {"kind": "clip" | "open_clip", "path": "...", "pretrained": "..." | null,
                      "layer": "last" | "penultimate"}}

"kind" and "layer" may be left out (clip, last); "path" and "pretrained" name an open_clip model to rebuild.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ldm.errors import UserError
from ldm.files import atomic_write_text

LDM_INFO = "ldm_model.json"
KINDS = ("clip", "open_clip")
LAYERS = ("last", "penultimate")


def is_valid_text_encoder_info(info: object) -> bool:
    """Whether `info` is a `text_encoder` entry this code can follow (a kind and a layer it knows)."""
    return isinstance(info, dict) and info.get("kind", "clip") in KINDS and info.get("layer", "last") in LAYERS


def read_text_encoder_info(root: Path) -> dict[str, Any] | None:
    """The `text_encoder` entry of `root`'s `ldm_model.json`, or None when the model has no such file; a file that
    cannot be read or holds no valid entry is a `UserError` naming it."""
    path = Path(root) / LDM_INFO
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read '{path}': {e}") from None
    info = info.get("text_encoder") if isinstance(info, dict) else None
    if not is_valid_text_encoder_info(info):
        raise UserError(f"'{path}' has no valid 'text_encoder' entry (kind clip|open_clip, layer last|penultimate)")
    return info


def write_text_encoder_info(directory: Path, info: dict[str, Any]) -> Path:
    """Write `directory/ldm_model.json` holding the `text_encoder` entry `info` (durably: `atomic_write_text`)."""
    if not is_valid_text_encoder_info(info):
        raise ValueError(f"not a valid 'text_encoder' entry for {LDM_INFO}: {info!r}")
    path = Path(directory) / LDM_INFO
    atomic_write_text(path, json.dumps({"text_encoder": info}, indent=1) + "\n")
    return path
