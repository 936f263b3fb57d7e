"""Does a VAE keep the shapes readable? Reconstruct jittered renders of every combination and read them back.

Stage 2 can only be as faithful as its VAE's decoder: if a reconstruction loses a small shape's colour or corners,
no U-Net can produce a readable one. The demo's VAE must keep each attribute >= 99% readable.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from diffusers import AutoencoderKL

from ldm.data.shapes import Attributes, all_combinations, render
from ldm.eval.reader import attribute_accuracy, read_attributes


def render_batch(combos: list[Attributes], size: int, seed: int) -> tuple[list[Attributes], torch.Tensor]:
    """Jittered renders of `combos` (a fixed seed gives fixed images) as a (N, 3, size, size) tensor in [-1, 1]."""
    rng = random.Random(seed)
    arrays = [np.asarray(render(a, size, rng), dtype=np.float32) for a in combos]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0
    return combos, pixels


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8, rounded as saving a PNG would."""
    array = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return array.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def reconstruction_accuracy(
    vae: AutoencoderKL,
    combos: list[Attributes] | None = None,
    *,
    size: int = 32,
    repeats: int = 2,
    seed: int = 0,
    batch_size: int = 128,
) -> dict[str, float]:
    """Attribute accuracy of `vae`'s reconstructions (posterior mean) of `repeats` jittered renders of each of
    `combos` (default: all 630 combinations)."""
    combos = [a for _ in range(repeats) for a in (combos or all_combinations())]
    truth, pixels = render_batch(combos, size, seed)
    device, dtype = vae.device, vae.dtype
    pairs: list[tuple[Attributes, Attributes]] = []
    for start in range(0, len(truth), batch_size):
        x = pixels[start : start + batch_size].to(device, dtype)
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample.float()
        for a, image in zip(truth[start : start + batch_size], to_uint8(recon)):
            pairs.append((a, read_attributes(image)))
    return attribute_accuracy(pairs)
