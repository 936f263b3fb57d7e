"""Does a VAE keep the shapes readable? Reconstruct jittered renders of every combination and read them back.

Stage 2 can only be as faithful as its VAE's decoder: if a reconstruction loses a small shape's colour or corners,
no U-Net can produce a readable one. The demo's VAE must keep each attribute >= 99% readable.
"""

from __future__ import annotations

import random

import torch
from diffusers import AutoencoderKL

from ldm.demo.reader import attribute_accuracy, read_attributes
from ldm.demo.shapes import Attributes, all_combinations, render
from ldm.pixels import float_to_uint8, pil_to_tensor, tensor_to_float_images


def render_pixels(combos: list[Attributes], size: int, seed: int) -> torch.Tensor:
    """Jittered renders of `combos` (a fixed seed gives fixed images) as a (N, 3, size, size) tensor in [-1, 1]."""
    rng = random.Random(seed)
    return torch.cat([pil_to_tensor(render(a, size, rng)) for a in combos])


@torch.no_grad()
def reconstruction_accuracy(
    vae: AutoencoderKL,
    combos: list[Attributes] | None = None,
    *,
    size: int = 32,
    repeats: int = 2,
    seed: int = 0,
    batch_size: int = 128,
    new_colors: tuple[str, ...] = (),
) -> dict[str, float]:
    """Attribute accuracy of `vae`'s reconstructions (posterior mean) of `repeats` jittered renders of each of
    `combos` (default: all 630 combinations); `new_colors` join the reader's palette."""
    combos = [a for _ in range(repeats) for a in (combos or all_combinations())]
    pixels = render_pixels(combos, size, seed)
    device, dtype = vae.device, vae.dtype
    pairs: list[tuple[Attributes, Attributes]] = []
    for start in range(0, len(combos), batch_size):
        x = pixels[start : start + batch_size].to(device, dtype)
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample
        for a, image in zip(combos[start : start + batch_size], float_to_uint8(tensor_to_float_images(recon))):
            pairs.append((a, read_attributes(image, new_colors)))
    return attribute_accuracy(pairs)
