"""A run's init image and mask, prepared once for every batch, and the paste-back that finishes an inpainted image."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.pipeline import images as im
from ldm.pipeline.denoise import Inpaint
from ldm.pipeline.latent_codec import LatentCodec
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


def inpaint_state(job: Job, known: torch.Tensor | None, noise: torch.Tensor, gens: list[torch.Generator],
                  codec: LatentCodec, nine_channel: bool) -> Inpaint:
    """What an inpainting batch adds to the loop: the latent blend mask, and for a 9-channel U-Net its mask and
    masked-image latents (drawn from `gens` after the noise: draw 3). `noise`, `known`: (b, C, h, w)."""
    b = noise.shape[0]
    h, w = noise.shape[-2:]
    mask = job.mask.to(codec.device)  # (1, 1, H, W)
    # blend: repaint a latent pixel if any pixel under it is masked, so no masked pixel keeps the old content
    blend = F.max_pool2d(mask, codec.vae_factor).to(codec.dtype).expand(b, 1, h, w)  # (b, 1, h, w)
    state = Inpaint(blend_mask=blend, known_latents=known, noise=noise)
    if nine_channel:
        # 9-channel U-Nets were trained on a nearest-downsampled mask and the masked image's latents
        state.unet_mask = F.interpolate(mask, size=(h, w)).to(codec.dtype).expand(b, 1, h, w)
        masked_image = job.image * (job.mask < 0.5)  # (1, 3, H, W), masked pixels set to 0 (grey)
        state.masked_image_latents = codec.sample(codec.encode(masked_image), gens)
    return state
