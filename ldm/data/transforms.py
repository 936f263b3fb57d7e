"""`ImageTransform`: any decoded image -> the (3, R, R) float32 tensor in [-1, 1] the models train on, and where
its crop came from (`ldm.data.crops.CropGeometry`, for SDXL's micro-conditioning).

Randomness (crop offsets, the flip coin) comes from the `random.Random` the caller passes in: the dataset seeds it
from (seed, key), so augmentation is a pure function of the sample's key (see `ldm.data.dataset`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import PIL.Image
import torch

from ldm.data.crops import Box, CropGeometry
from ldm.errors import UserError
from ldm.image_io import to_rgb
from ldm.pixels import pil_to_tensor


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
        image = to_rgb(image)
        original_size = (image.height, image.width)
        image, box = self._resize_crop(image, rng)
        # Random draws always happen in the same order (crop offsets, then the flip coin), so a given
        # (transform, rng state) pair always yields the same output.
        flipped = self.random_flip and rng.random() < 0.5
        if flipped:
            image = image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
        crop = CropGeometry(original_size, box, (self.resolution, self.resolution), flipped)
        return pil_to_tensor(image)[0], crop  # (3, R, R)

    def _resize_crop(self, image: PIL.Image.Image, rng: random.Random) -> tuple[PIL.Image.Image, Box]:
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
        size = (self.resolution, self.resolution)
        if image.size == size:
            return image, box
        return image.resize(size, resample=PIL.Image.Resampling.BICUBIC, box=box), box
