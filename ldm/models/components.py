"""The loaded parts of a model, as the pipeline uses them: one definition for every way of loading one (a diffusers
directory or a single file in `ldm.models.load`, stage 2's validation models)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ldm.errors import UserError


@dataclass
class Components:
    unet: Any  # diffusers UNet2DConditionModel
    vae: Any  # diffusers AutoencoderKL
    text_encoder: Any  # ldm.text.encoder.FrozenTextEncoder
    scheduler_config: dict[str, Any]
    name: str  # how the model is named in PNG metadata: what the user passed to --model

    def check_fit(self) -> None:
        """Parts that do not fit each other would fail deep inside the U-Net; say which ones, before any work."""
        from ldm.text.sdxl import SDXLTextEncoder

        c, unet = self.vae.config.latent_channels, self.unet.config
        if unet.out_channels != c or unet.in_channels not in (c, 2 * c + 1):
            raise UserError(
                f"the U-Net ({unet.in_channels} in / {unet.out_channels} out channels) does not fit the VAE's "
                f"{c} latent channels (expected {c} or {2 * c + 1} in, {c} out)"
            )
        if unet.cross_attention_dim != self.text_encoder.hidden_size:
            raise UserError(
                f"the U-Net attends to {unet.cross_attention_dim}-dim text features but the text encoder gives "
                f"{self.text_encoder.hidden_size}-dim ones: text encoder and U-Net come from different models"
            )
        if (unet.addition_embed_type == "text_time") != isinstance(self.text_encoder, SDXLTextEncoder):
            raise UserError("the U-Net and the text encoder are of different families (SDXL and SD 1.x/2.x): "
                            "they come from different models")
