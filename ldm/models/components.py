"""The loaded parts of a model, as the pipeline uses them: one definition for every way of loading one (a diffusers
directory or a single file in `ldm.models.load`, stage 2's validation models)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Components:
    unet: Any  # diffusers UNet2DConditionModel
    vae: Any  # diffusers AutoencoderKL
    text_encoder: Any  # ldm.text.encoder.FrozenTextEncoder
    scheduler_config: dict[str, Any]
    name: str  # how the model is named in PNG metadata: what the user passed to --model
