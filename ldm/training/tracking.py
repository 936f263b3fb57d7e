"""Small helpers around accelerate's experiment trackers (TensorBoard by default)."""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator


def flat_config(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"train.lr": 1e-4, ...}; trackers' hyper-parameter tables take scalars and text only."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_config(value, prefix=f"{name}."))
        elif value is None or isinstance(value, (list, tuple)):
            flat[name] = str(value)
        else:
            flat[name] = value
    return flat


def log_image(accelerator: Accelerator, tag: str, image: torch.Tensor, step: int) -> None:
    """Log one (3, H, W) image in [0, 1] to every tracker that takes images (main process only)."""
    for tracker in accelerator.trackers:
        if hasattr(tracker, "log_images"):
            tracker.log_images({tag: image[None]}, step=step, dataformats="NCHW")
