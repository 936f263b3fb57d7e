"""`GenerationResult`: what one `Pipeline.generate` call returns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ldm.pipeline.request import GenerationRequest


@dataclass
class GenerationResult:
    images: list[Image.Image]  # final images (inpainting: pasted back onto the init image)
    params: list[GenerationRequest]  # one per image: the resolved request with that image's seed
    decoded: np.ndarray  # (N, H, W, 3) float32 in [0, 1]: the VAE's output before rounding and paste-back
    steps_run: int  # denoising steps actually run (fewer than `steps` for img2img with strength < 1)
    latents: torch.Tensor  # (N, C, h, w) float32 on the CPU: the final latents as the VAE decodes them (unscaled)
