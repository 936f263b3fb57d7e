"""SDXL's micro-conditioning time ids for one pass, as diffusers' SDXL pipelines build them (`_get_add_time_ids`).

The base U-Net takes 6: original size (h, w), crop top-left (top, left), target size (h, w). The refiner takes 5:
original size, crop top-left and an aesthetic score (6.0 for the prompt, 2.5 for the negative prompt). A request
leaves them None for the defaults: the pass's own size (each pass's, with a hires fix) and crop (0, 0).

The negative branch: each negative_* value given is used, the rest default to the positive branch's sizes and a
(0, 0) crop, as diffusers' img2img and inpainting pipelines do. diffusers' txt2img pipeline copies the positive
branch's time ids whole when not both negative sizes are given (so it silently drops a lone negative size or crop);
here a txt2img pass with no negative_* value given copies them too, and one with any given uses what was given.
"""

from __future__ import annotations

import torch

from ldm.errors import UserError
from ldm.pipeline.request import GenerationRequest

AESTHETIC_SCORE = 6.0  # diffusers' and A1111's (sdxl_refiner_high_aesthetic_score) default
NEGATIVE_AESTHETIC_SCORE = 2.5  # sdxl_refiner_low_aesthetic_score


def time_ids(r: GenerationRequest, height: int, width: int, count: int,
             img2img: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) time ids, each (count,) float32, for a pass generating height x width pixels; `count` 6
    (base) or 5 (refiner: aesthetic score in place of the target size); `img2img` for a pass that starts from an image
    or hands over from the base (diffusers' img2img rules for the negative branch)."""
    if count not in (5, 6):
        raise ValueError(f"an SDXL U-Net takes 5 or 6 time ids, this one {count}")
    original = tuple(r.original_size or (height, width))
    crop = tuple(r.crop_top_left or (0, 0))
    target = tuple(r.target_size or (height, width))
    negatives = (r.negative_original_size, r.negative_crop_top_left, r.negative_target_size)
    if count == 5:
        positive = (*original, *crop, AESTHETIC_SCORE if r.aesthetic_score is None else r.aesthetic_score)
        score = NEGATIVE_AESTHETIC_SCORE if r.negative_aesthetic_score is None else r.negative_aesthetic_score
        negative = (*(r.negative_original_size or original), *(r.negative_crop_top_left or (0, 0)), score)
    else:
        positive = (*original, *crop, *target)
        if not img2img and all(v is None for v in negatives):
            negative = positive
        else:
            negative = (*(r.negative_original_size or original), *(r.negative_crop_top_left or (0, 0)),
                        *(r.negative_target_size or target))
    return torch.tensor(positive, dtype=torch.float32), torch.tensor(negative, dtype=torch.float32)


def time_id_count(unet_config, text_encoder) -> int:
    """SDXL's time ids per image: (the add embedding's input - the pooled size) / the time embedding's size; 0 for
    an SD 1.x/2.x U-Net."""
    if unet_config.addition_embed_type != "text_time":
        return 0
    return (unet_config.projection_class_embeddings_input_dim - text_encoder.pooled_size) // \
        unet_config.addition_time_embed_dim


def arch_of(count: int) -> str:
    """The model family a U-Net's time-id count says (ldm.models.spec.ARCHS)."""
    archs = {0: "sd", 6: "sdxl", 5: "sdxl-refiner"}
    if count not in archs:
        raise UserError(f"the U-Net's addition embedding fits {count} time ids; SDXL U-Nets take 6 (base) or 5 "
                        "(refiner): the U-Net and the text encoders come from different models")
    return archs[count]
