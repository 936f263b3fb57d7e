"""Named `UNet2DConditionModel` layouts, chosen by name in the config (`model.preset=sd15`)."""

from __future__ import annotations

from typing import Any

from diffusers import UNet2DConditionModel

from ldm.errors import UserError

_DOWN = {True: "CrossAttnDownBlock2D", False: "DownBlock2D"}
_UP = {True: "CrossAttnUpBlock2D", False: "UpBlock2D"}


def _layout(channels: tuple[int, ...], cross_attention: tuple[bool, ...], **extra: Any) -> dict[str, Any]:
    return dict(
        block_out_channels=channels,
        down_block_types=tuple(_DOWN[a] for a in cross_attention),
        up_block_types=tuple(_UP[a] for a in reversed(cross_attention)),
        **extra,
    )


# `cross_attention_dim`, `in_channels`/`out_channels` and `sample_size` are filled in from the text encoder, the VAE
# and the data; everything else is the preset.
UNET_PRESETS: dict[str, dict[str, Any]] = {
    # for tests: ~1M parameters
    "tiny": _layout((32, 64), (False, True), layers_per_block=1, attention_head_dim=8, norm_num_groups=32),
    # ~7M parameters (cross_attention_dim 64): small domains such as the 32-px shapes demo, on a CPU
    "small": _layout((64, 128, 128), (False, True, True), layers_per_block=1, attention_head_dim=8),
    # ~4.1M parameters (cross_attention_dim 32): the bundled 32-px shapes demo on 16x16x4 latents, trained on a CPU
    "shapes": _layout((32, 64, 128), (False, True, True), layers_per_block=1, attention_head_dim=8),
    # ~110M parameters: 64-256 px domains on one GPU
    "base": _layout((128, 256, 512), (True, True, True), layers_per_block=2, attention_head_dim=8),
    # Stable Diffusion 1.5's layout (~860M parameters with cross_attention_dim 768)
    "sd15": _layout((320, 640, 1280, 1280), (True, True, True, False), layers_per_block=2, attention_head_dim=8),
    # Stable Diffusion 2.x's layout (~865M parameters with cross_attention_dim 1024): 64 channels per head and linear
    # proj_in/proj_out; 2.1 also upcasts attention to fp32 (its fp16 attention overflows otherwise)
    "sd2": _layout((320, 640, 1280, 1280), (True, True, True, False), layers_per_block=2,
                   attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
    "sd21": _layout((320, 640, 1280, 1280), (True, True, True, False), layers_per_block=2,
                    attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, upcast_attention=True),
    # Stable Diffusion XL base 1.0 (~2.6B parameters with cross_attention_dim 2048 = CLIP-L 768 + bigG 1280): no
    # attention in the first level, 2 and 10 transformer blocks in the others (10 in the middle block too), and the
    # "text_time" micro-conditioning: 6 time ids (original size, crop, target size) x 256 + bigG's pooled 1280 = 2816
    "sdxl": _layout((320, 640, 1280), (False, True, True), layers_per_block=2, attention_head_dim=(5, 10, 20),
                    use_linear_projection=True, transformer_layers_per_block=(1, 2, 10),
                    addition_embed_type="text_time", addition_time_embed_dim=256,
                    projection_class_embeddings_input_dim=2816),
    # Stable Diffusion XL refiner 1.0 (~2.3B parameters with cross_attention_dim 1280, bigG only): 4 transformer
    # blocks wherever there is attention; 5 time ids (sizes, crop and the aesthetic score) x 256 + 1280 = 2560
    "sdxl-refiner": _layout((384, 768, 1536, 1536), (False, True, True, False), layers_per_block=2,
                            attention_head_dim=(6, 12, 24, 24), use_linear_projection=True,
                            transformer_layers_per_block=4, addition_embed_type="text_time",
                            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2560),
}


def build_unet(name: str, *, sample_size: int, latent_channels: int, cross_attention_dim: int,
               pooled_size: int | None = None) -> UNet2DConditionModel:
    """`pooled_size`: an SDXL preset's pooled text embedding width (the second text tower's projection), which its
    "text_time" addition embedding takes beside the 6 embedded time ids; None for SD presets."""
    if name not in UNET_PRESETS:
        raise UserError(f"unknown U-Net preset '{name}': choose one of {', '.join(UNET_PRESETS)}")
    preset = dict(UNET_PRESETS[name])
    if is_sdxl_preset(name) and "projection_class_embeddings_input_dim" not in preset:
        if pooled_size is None:
            raise UserError(f"U-Net preset '{name}' is SDXL-shaped: it needs SDXL's text towers "
                            "(text_encoder.kind=sdxl)")
        time_ids_width = SDXL_TIME_IDS * preset["addition_time_embed_dim"]  # each time id embedded sinusoidally
        preset["projection_class_embeddings_input_dim"] = time_ids_width + pooled_size
    return UNet2DConditionModel(
        **preset,
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        cross_attention_dim=cross_attention_dim,
    )


def is_sdxl_preset(name: str) -> bool:
    """Whether the preset takes SDXL's conditioning (pooled text embedding and micro-conditioning time ids)."""
    return UNET_PRESETS[name].get("addition_embed_type") == "text_time"


# ---- SDXL-shaped presets for training from scratch: SDXL's block structure (no attention in the first level, more
# transformer blocks deeper down, linear proj_in/proj_out, 64-channel heads, the "text_time" addition embedding of
# the pooled text embedding and 6 time ids) at reduced width. `cross_attention_dim` and the addition embedding's
# input width follow the text towers (SDXL's: 2048 and 6 * 256 + 1280 = 2816).
SDXL_TIME_IDS = 6  # original size, crop top-left, target size (ldm/latents/micro_conditioning.py)


def _sdxl_layout(channels: tuple[int, ...], depth: tuple[int, ...], heads: tuple[int, ...], time_embed: int,
                 **extra: Any) -> dict[str, Any]:
    return _layout(channels, tuple(d > 0 for d in depth), layers_per_block=2,
                   transformer_layers_per_block=tuple(max(d, 1) for d in depth), attention_head_dim=heads,
                   use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=time_embed,
                   **extra)


UNET_PRESETS.update({
    # for tests: ~2M parameters, the tiny SDXL model's layout (ldm/pipeline/tiny.py; towers of context 64, pooled 32)
    "sdxl-tiny": _sdxl_layout((32, 64), (0, 2), heads=(2, 4), time_embed=8, norm_num_groups=1),
    # SDXL's three levels at 2/5 of its width, depths 0/2/4 instead of 0/2/10 (~248M parameters with context 2048)
    "sdxl-small": _sdxl_layout((128, 256, 512), (0, 2, 4), heads=(2, 4, 8), time_embed=256),
})
