"""Per-image randomness: image i of a run uses seed + i with its own CPU generator.

(ComfyUI draws instead one tensor for the whole batch from `torch.manual_seed(seed)` (comfy/sample.py
prepare_noise); `batch_noise` is that draw, for requests with `noise="comfy"`. Its first image is `per_image_noise`'s.)

Drawing every image's noise from its own generator on the CPU makes an image a function of its seed alone, not of
the batch size it was generated in or of the device (diffusers #612, #6233). The same generators go to the
scheduler's `step` (as diffusers' list-of-generators convention), so ancestral samplers' per-step noise is
per-image too.
"""

from __future__ import annotations

import random

import torch

MAX_SEED = 2**63 - 1


def random_seed() -> int:
    return random.SystemRandom().randrange(2**32)


def generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def per_image_noise(gens: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    """One (1, *shape) float32 draw from each generator -> (len(gens), *shape) on the CPU."""
    return torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in gens])


def batch_noise(generator: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """ComfyUI's initial noise: one float32 draw of the whole `shape` = (N, C, h, w) from a CPU generator seeded
    with the seed (the stream `torch.manual_seed(seed)` gives), on the CPU. Its first image is `per_image_noise`'s
    for that generator."""
    return torch.randn(shape, generator=generator, dtype=torch.float32)
