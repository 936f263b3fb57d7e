"""A unit's control image -> the ControlNet's conditioning at one pass's size: (1, 3, H, W) float in [0, 1].

Order as the A1111 extension's with "Pixel Perfect" (the preprocessor runs at the resolution the map is used at):
1. fit the image to H x W by the unit's resize mode (A1111's names, scripts/enums.py `ResizeMode`):
   "Crop and Resize" (the default) crops the centre to the generation's aspect ratio, then resizes;
   "Just Resize" stretches; "Resize and Fill" resizes to fit inside, preprocesses, then pads to H x W with the
   median colour of the map's border (A1111's fill), so the padding adds no edges;
2. the preprocessor: 'none' (the image is the control map) or 'canny' (ldm/controlnet/canny.py, as a 3-channel map);
3. uint8 -> float32 / 255, diffusers' `VaeImageProcessor(do_normalize=False)`: ControlNets take [0, 1] maps.
Resizing is PIL's Lanczos, as diffusers' control image processor does, so an image of the generation's aspect
ratio gives diffusers' conditioning exactly (a control image at the generation size is not resampled at all).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image

from ldm.controlnet.canny import canny
from ldm.controlnet.unit import RESIZE_MODES, ControlUnit

log = logging.getLogger(__name__)


def control_map(unit: ControlUnit, height: int, width: int) -> np.ndarray:
    """The unit's control map at height x width: (H, W, 3) uint8."""
    image = unit.image.convert("RGB")
    w0, h0 = image.size
    mode = unit.resize_mode
    if mode == RESIZE_MODES[0] and w0 * height != h0 * width:  # crop the centre to the target's aspect ratio
        if w0 * height > h0 * width:  # wider than the target
            cw = max(1, round(h0 * width / height))
            box = ((w0 - cw) // 2, 0, (w0 - cw) // 2 + cw, h0)
        else:
            ch = max(1, round(w0 * height / width))
            box = (0, (h0 - ch) // 2, w0, (h0 - ch) // 2 + ch)
        log.info("control image is %dx%d; cropping its centre to %dx%d to fit %dx%d (Crop and Resize)", w0, h0,
                 box[2] - box[0], box[3] - box[1], width, height)
        image = image.crop(box)
    size = (width, height)
    if mode == RESIZE_MODES[2]:  # fit inside
        k = min(width / w0, height / h0)
        size = (max(1, min(width, round(w0 * k))), max(1, min(height, round(h0 * k))))
    if image.size != size:
        image = image.resize(size, Image.LANCZOS)
    pixels = np.asarray(image)  # (h, w, 3)
    if unit.preprocess == "canny":
        low, high = unit.thresholds()
        pixels = np.repeat(canny(pixels, low, high)[..., None], 3, axis=2)
    if size != (width, height):
        border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])  # (n, 3)
        canvas = np.empty((height, width, 3), np.uint8)
        canvas[:] = np.median(border, axis=0).astype(np.uint8)
        top, left = (height - size[1]) // 2, (width - size[0]) // 2
        canvas[top:top + size[1], left:left + size[0]] = pixels
        pixels = canvas
    return pixels


def control_tensor(unit: ControlUnit, height: int, width: int, device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor:
    """(1, 3, H, W) in [0, 1], as diffusers' control image processor gives it."""
    pixels = control_map(unit, height, width).astype(np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1)[None].to(device, dtype)
