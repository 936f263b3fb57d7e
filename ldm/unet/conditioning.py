"""What a stage-2 run conditions its U-Net on: the text encoder it uses (SD's one tower, or SDXL's two), that the
U-Net takes what that encoder gives, and a batch's `Conditioning` with SDXL's micro-conditioning time ids.

SD 1.x/2.x: the per-token text states alone. SDXL (`text_encoder.kind=sdxl`): the two towers' concatenated context
(B, 77, 2048), the second tower's pooled embedding (B, 1280) and 6 time ids per image (original size, crop top-left,
target size; recorded by the latent cache, `ldm.latents.micro_conditioning`), which its "text_time" addition
embedding takes as `added_cond_kwargs`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from ldm.errors import UserError
from ldm.latents.micro_conditioning import batch_time_ids
from ldm.models.load import load_sdxl_text_encoder
from ldm.models.spec import ModelSpec, inspect_model
from ldm.text.conditioning import Conditioning
from ldm.text.load_encoder import load_text_encoder
from ldm.text.sdxl import SDXLTextEncoder
from ldm.unet.presets import SDXL_TIME_IDS

if TYPE_CHECKING:
    from torch import nn

    from ldm.unet.config import LDMConfig


def load_run_text_encoder(cfg: LDMConfig, base: ModelSpec | None, dtype: torch.dtype,
                          device: torch.device) -> nn.Module:
    """The frozen text encoder of the run: `text_encoder.*`'s (a `FrozenTextEncoder`), or with `kind: sdxl` the
    towers of the SDXL model `text_encoder.path` names (empty: `model.pretrained`'s) as an `SDXLTextEncoder`."""
    text = cfg.text_encoder
    if base is not None and base.arch == "sdxl-refiner":
        raise UserError(f"model.pretrained '{base.name}' is an SDXL refiner: training a refiner is not supported (its "
                        "time ids hold an aesthetic score the latent cache does not record); fine-tune an SDXL base")
    if base is not None and base.arch == "sdxl" and text.kind != "sdxl":
        raise UserError(f"model.pretrained '{base.name}' is an SDXL model, whose U-Net takes SDXL's two text towers: "
                        "set text_encoder.kind=sdxl (with text_encoder.path empty, the model's own towers)")
    if text.kind != "sdxl":
        return load_text_encoder(text, dtype=dtype, device=device)
    if base is not None and base.arch == "sd":
        raise UserError(f"model.pretrained '{base.name}' is {base.kind}, but text_encoder.kind=sdxl gives SDXL's "
                        "conditioning: use an SDXL model.pretrained or another text_encoder.kind")
    source = inspect_model(text.path) if text.path else base
    assert source is not None  # LDMConfig.validate: an empty path needs model.pretrained
    return load_sdxl_text_encoder(source, dtype).to(device)


def check_unet_takes(unet_config: Mapping[str, Any], text_encoder: nn.Module) -> None:
    """The U-Net attends to the encoder's context width and, for SDXL, takes its pooled embedding and 6 time ids
    (its addition embedding's input = 6 * time embedding width + pooled width); else one line naming the fix."""
    width = text_encoder.hidden_size
    if unet_config["cross_attention_dim"] != width:
        raise UserError(f"the U-Net attends to {unet_config['cross_attention_dim']}-wide text states but the text "
                        f"encoder gives {width}: use a matching text_encoder.path")
    sdxl = isinstance(text_encoder, SDXLTextEncoder)
    takes_sdxl = unet_config.get("addition_embed_type") == "text_time"
    if sdxl and not takes_sdxl:
        raise UserError("text_encoder.kind=sdxl gives SDXL's conditioning, but the U-Net takes SD 1.x/2.x's (no "
                        "'text_time' addition embedding): use an SDXL preset (sdxl-tiny, sdxl-small, sdxl) or model")
    if takes_sdxl and not sdxl:
        raise UserError("the U-Net is SDXL-shaped (pooled text embedding and time ids) but the text encoder is SD's "
                        "single tower: set text_encoder.kind=sdxl")
    if sdxl:
        expected = SDXL_TIME_IDS * unet_config["addition_time_embed_dim"] + text_encoder.pooled_size
        got = unet_config["projection_class_embeddings_input_dim"]
        if got != expected:
            raise UserError(f"the U-Net's addition embedding takes {got} inputs, but {SDXL_TIME_IDS} time ids and the "
                            f"text towers' {text_encoder.pooled_size}-wide pooled embedding make {expected}: use "
                            "text towers that match the U-Net (text_encoder.path)")


def batch_conditioning(text: Conditioning, batch: Mapping[str, Any]) -> Conditioning:
    """A batch's conditioning: SDXL's gets the batch's time ids (B, 6) from the latent cache; SD's is unchanged."""
    return text if text.pooled is None else text.with_time_ids(batch_time_ids(batch))
