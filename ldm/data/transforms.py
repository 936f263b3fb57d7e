"""`ImageTransform`: any decoded image -> the (3, R, R) float32 tensor in [-1, 1] the models train on, and where
its crop came from (`ldm.data.crops.CropGeometry`, for SDXL's micro-conditioning).

Randomness (crop offsets, the flip coin) comes from the `random.Random` the caller passes in: the dataset seeds it
from (seed, key), so augmentation is a pure function of the sample's key (see `ldm.data.dataset`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch

from ldm.data.crops import CropGeometry
from ldm.errors import UserError
from ldm.image_io import to_rgb
from ldm.pixels import pil_to_tensor


class MaskSizeError(ValueError):
    """A loss mask of another size than its image (the dataset skips the image, saying so)."""


@dataclass(frozen=True)
class ImageTransform:
    """Resize the shorter side to `resolution`, crop a square, maybe flip; return (3, R, R) float32 in [-1, 1]."""

    resolution: int
    center_crop: bool = True  # False -> random crop
    random_flip: bool = False  # horizontal flip with p=0.5

    def __post_init__(self) -> None:
        if self.resolution < 1:
            raise UserError(f"image resolution must be a positive integer, got {self.resolution}: fix data.resolution")

    def __call__(self, image: PIL.Image.Image, rng: random.Random) -> torch.Tensor:
        return self.apply(image, rng)[0]  # (3, R, R)

    def apply(self, image: PIL.Image.Image, rng: random.Random) -> tuple[torch.Tensor, CropGeometry]:
        """The (3, R, R) pixels and their crop geometry."""
        pixels, crop, _ = self.apply_with_mask(image, None, rng)
        return pixels, crop

    def apply_with_mask(
        self, image: PIL.Image.Image, mask: PIL.Image.Image | None, rng: random.Random
    ) -> tuple[torch.Tensor, CropGeometry, torch.Tensor | None]:
        """The (3, R, R) pixels, their crop geometry, and the loss mask (an 'L' image of the image's size;
        `ldm.data.masks`) through the very same resize, crop and flip: (1, R, R) float32 in [0, 1], or None."""
        image = to_rgb(image)
        original_size = (image.height, image.width)
        # Choose the square crop in *source* pixels and resample only that box. This equals "resize the shorter
        # side to R, then crop R x R" but never materialises a huge intermediate (a 1 x 10000 strip would otherwise
        # become R x 10000R), and runs one antialiased bicubic resample.
        width, height = image.size
        side = min(width, height)
        if self.center_crop:
            left, top = (width - side) / 2, (height - side) / 2
        else:
            left, top = rng.randint(0, width - side), rng.randint(0, height - side)
        box = (left, top, left + side, top + side)
        # Random draws always happen in the same order (crop offsets, then the flip coin), so a given
        # (transform, rng state) pair always yields the same output.
        flipped = self.random_flip and rng.random() < 0.5
        crop = CropGeometry(original_size, box, (self.resolution, self.resolution), flipped)
        return place(image, mask, crop)


def place(
    image: PIL.Image.Image, mask: PIL.Image.Image | None, crop: CropGeometry
) -> tuple[torch.Tensor, CropGeometry, torch.Tensor | None]:
    """Resample `crop.box` of the RGB `image` (and of its same-sized 'L' `mask`) to `crop.target_size` with one
    antialiased bicubic resample, mirror both when `crop.flipped`: ((3, H, W) in [-1, 1], crop, (1, H, W) in [0, 1])."""
    if mask is not None and mask.size != image.size:
        raise MaskSizeError(f"its mask is {mask.size[0]}x{mask.size[1]} but its image {image.size[0]}x{image.size[1]}")
    height, width = crop.target_size
    out = []
    for picture in (image, mask):
        if picture is not None:
            if picture.size != (width, height):
                picture = picture.resize((width, height), resample=PIL.Image.Resampling.BICUBIC, box=crop.box)
            if crop.flipped:
                picture = picture.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(picture)
    pixels = pil_to_tensor(out[0])[0]  # (3, H, W)
    weights = None if out[1] is None else torch.from_numpy(np.asarray(out[1], dtype=np.float32) / 255.0)[None]
    return pixels, crop, weights  # (1, H, W)
