"""A run's init image and mask, prepared once for every batch, and the paste-back that finishes an inpainted image."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ldm.pipeline import images as im
from ldm.pipeline.request import GenerationRequest
from ldm.pixels import pil_to_tensor


@dataclass
class Job:
    """The per-run inputs every batch shares, resolved once."""

    height: int
    width: int
    image: torch.Tensor | None = None  # (1, 3, H, W) in [-1, 1]
    mask: torch.Tensor | None = None  # (1, 1, H, W) 1 = repaint
    original: Image.Image | None = None  # the init image as given (inpainting pastes back onto it)
    original_mask: Image.Image | None = None  # the mask at the original's size
    alpha: np.ndarray | None = None  # (H0, W0) paste-back weight: 0 outside the mask, feathered inward


def prepare_job(r: GenerationRequest) -> Job:
    """The init image and mask as tensors at the generation size (sizes resolved and checked in `r`)."""
    if r.init_image is None:
        return Job(r.height, r.width)
    original = r.init_image
    image = im.fit_to_size(original, (r.width, r.height))
    job = Job(r.height, r.width, image=pil_to_tensor(image), original=original)
    if r.mask is not None:
        original_mask = im.fit_mask(r.mask, original.size)
        job.original_mask = original_mask
        job.mask = im.mask_to_tensor(original_mask.resize((r.width, r.height), Image.NEAREST))
        job.alpha = im.feather(im.mask_to_tensor(original_mask), r.mask_blur)[0, 0].numpy()
    return job


def finish(pixels: np.ndarray, job: Job) -> Image.Image:
    """uint8 (H, W, 3) -> the output image; inpainting pastes it onto the original init image (at its size)."""
    generated = Image.fromarray(pixels)
    if job.alpha is None:
        return generated
    if generated.size != job.original.size:
        generated = generated.resize(job.original.size, Image.LANCZOS)
    return Image.fromarray(im.paste_back(np.asarray(generated), np.asarray(job.original), job.alpha))
