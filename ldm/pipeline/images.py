"""Images in and out of the pipeline: loading (with user-facing errors), masks and the paste-back.

Decoding a user's file is shared with training and the server and lives in `ldm.image_io`; pixel <-> tensor
conversion lives in `ldm.pixels`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.image_io import open_image, open_mask

log = logging.getLogger(__name__)


def load_image(path: str | Path, what: str = "init image") -> Image.Image:
    """RGB image, EXIF rotation applied (what the user sees in a viewer is what gets used), transparency on white;
    the rule and the pixel limit of every user image (`ldm.image_io`)."""
    path = Path(path)
    return open_image(path, f"{what} '{path}'")


def load_mask(path: str | Path) -> Image.Image:
    """The mask file as a greyscale image (white = repaint); a mask with transparency is its alpha channel
    (`ldm.image_io.to_mask`)."""
    path = Path(path)
    return open_mask(path, f"mask '{path}'")


def fit_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Binary mask ('L', 0 or 255) of `size` (W, H), thresholded at mid-grey.

    A mask of another size than the init image is resized to it (nearest neighbour, so it stays binary) with a
    warning naming both sizes, as A1111 does: stretching is almost always what a user who exported the mask at
    another resolution meant, and the warning makes it visible when it was not.
    """
    mask = mask.convert("L")
    if mask.size != size:
        log.warning("mask is %dx%d but the init image is %dx%d; resizing the mask to %dx%d", *mask.size, *size, *size)
        mask = mask.resize(size, Image.NEAREST)
    return mask.point(lambda v: 255 if v >= 128 else 0)


def fit_to_size(image: Image.Image, size: tuple[int, int], what: str = "init image") -> Image.Image:
    """Resize to the generation size (W, H), saying so; a no-op when the sizes agree."""
    if image.size == size:
        return image
    log.warning("%s is %dx%d; resizing it to %dx%d to generate", what, *image.size, *size)
    return image.resize(size, Image.LANCZOS)


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """(H, W) binary 'L' image -> (1, 1, H, W) float32, 1 = repaint."""
    return torch.from_numpy((np.asarray(mask) >= 128).astype(np.float32))[None, None]


def feather(mask: torch.Tensor, blur: int) -> torch.Tensor:
    """Binary (1, 1, H, W) mask -> blend weight in [0, 1] that ramps up *inward* from the mask's edge over `blur` px.

    alpha = (e_0 + e_1 + ... + e_blur) / (blur + 1), with e_k the mask eroded k times by a 3x3 square: a pixel at
    chessboard distance d >= 1 from the nearest unmasked pixel gets min(d, blur + 1) / (blur + 1). Because every e_k
    lies inside the mask, alpha is exactly 0 outside it: the feathering never touches a pixel the user kept, and
    no mask pixel is lost however thin the mask is (the outermost ring still gets 1 / (blur + 1)).
    """
    alpha = mask.clone()
    eroded = mask
    for _ in range(blur):
        # erosion = 1 - dilation of the complement; max_pool pads with -inf, so the image border does not erode
        eroded = 1.0 - F.max_pool2d(1.0 - eroded, kernel_size=3, stride=1, padding=1)
        alpha += eroded
    return alpha / (blur + 1)


def paste_back(generated: np.ndarray, original: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Composite uint8 (H, W, 3) images: original where alpha = 0 (bit for bit), generated where alpha = 1."""
    a = alpha[..., None].astype(np.float32)  # (H, W, 1)
    mixed = original.astype(np.float32) * (1.0 - a) + generated.astype(np.float32) * a
    out = np.rint(mixed).astype(np.uint8)
    # make the two ends exact rather than trusting float rounding
    out[alpha == 0] = original[alpha == 0]
    out[alpha == 1] = generated[alpha == 1]
    return out
