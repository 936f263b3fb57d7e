"""Pixels <-> tensors: the one convention every stage shares, 8-bit RGB (0..255) <-> float32 in [-1, 1].

The VAE trains on what `pil_to_tensor` makes of dataset images, the latent cache stores what the VAE encodes of
them, the text tower pretrains on renders converted the same way, and the pipeline feeds init images through it
again: all of them must agree to the last bit, which one function guarantees. The arithmetic is that of diffusers'
`VaeImageProcessor` (x / 255 * 2 - 1 in float32, and back with (x / 2 + 0.5) clamped, * 255, rounded), so img2img,
inpainting and the PNGs written match diffusers' pipelines exactly. On uint8 input x / 255 * 2 - 1 is bit-identical
to x / 127.5 - 1 for all 256 values (tests/test_pixels.py), so caches written with either stay valid.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch


def pil_to_tensor(image: PIL.Image.Image) -> torch.Tensor:
    """(H, W, 3) uint8 RGB image -> (1, 3, H, W) float32 in [-1, 1]; 0 -> -1.0 and 255 -> 1.0 exactly."""
    array = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0) * 2.0 - 1.0


def tensor_to_float_images(decoded: torch.Tensor) -> np.ndarray:
    """VAE output (B, 3, H, W) in [-1, 1] -> (B, H, W, 3) float32 in [0, 1]."""
    return (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()


def float_to_uint8(images: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) in [0, 1] -> uint8, rounding as diffusers does (so the PNGs match its outputs)."""
    return (images * 255).round().astype(np.uint8)
