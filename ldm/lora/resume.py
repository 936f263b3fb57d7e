"""What a LoRA checkpoint's adapters were trained with, and refusing to resume them under other settings.

A LoRA checkpoint holds the adapters only; the frozen base comes from `model.pretrained` again. So resuming with
another base, or another rank, alpha, dropout or target list, would silently train a different adapter (alpha and
dropout do not show in any tensor's shape). The settings go into the checkpoint's `state` (state.json, the ordinary
checkpoint mechanism) under "lora", and a resume compares them before anything is loaded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ldm.errors import UserError

log = logging.getLogger(__name__)

STATE_KEY = "lora"


def _resolved(path: str) -> str:
    """A local path as an absolute one (so that `runs/base` and `./runs/base` compare equal); a hub id as it is."""
    local = Path(path).expanduser()
    return str(local.resolve()) if path and local.exists() else path


def lora_settings(cfg: Any) -> dict[str, Any]:
    """`cfg` (an LDMConfig) -> what the adapters depend on, as stored in the checkpoint state."""
    lora = cfg.lora
    return {"rank": lora.rank, "alpha": float(lora.alpha), "dropout": float(lora.dropout),
            "targets": list(lora.targets), "text_encoder_targets": list(lora.text_encoder_targets),
            "model.pretrained": _resolved(cfg.model.pretrained), "text_encoder.path": _resolved(cfg.text_encoder.path)}


_KEYS = {"rank": "lora.rank", "alpha": "lora.alpha", "dropout": "lora.dropout", "targets": "lora.targets",
         "text_encoder_targets": "lora.text_encoder_targets", "model.pretrained": "model.pretrained",
         "text_encoder.path": "text_encoder.path"}


def check_lora_settings(checkpoint: Path, state: dict[str, Any], cfg: Any) -> None:
    """Refuse (one line) a checkpoint whose adapters were trained with other settings than `cfg`'s."""
    saved = state.get(STATE_KEY)
    if saved is None:
        log.warning("checkpoint %s does not record its LoRA settings (made by an older version): rank, alpha, "
                    "dropout, targets and base are not checked", checkpoint)
        return
    now = lora_settings(cfg)
    for name, key in _KEYS.items():
        if name in saved and saved[name] != now[name]:
            raise UserError(f"checkpoint {checkpoint} was trained with {key}={_show(saved[name])}, this run has "
                            f"{key}={_show(now[name])}: resume with the checkpoint's value or start fresh with "
                            "--resume none")


def _show(value: Any) -> str:
    if isinstance(value, list):
        return f"[{','.join(value)}]"
    return f"{value:g}" if isinstance(value, float) else str(value)
