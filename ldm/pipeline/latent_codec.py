"""Pixels <-> the diffusion model's latents through the VAE: encode once per run, sample the posterior per image,
decode with the fp16 overflow fallback. Used by the pipeline for init images, inpainting and the hires fix."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from PIL import Image

from ldm.pipeline.seeds import per_image_noise
from ldm.pixels import float_to_uint8, pil_to_tensor, tensor_to_float_images
from ldm.vae.load_vae import vae_factor

log = logging.getLogger(__name__)


class LatentCodec:
    def __init__(self, vae: AutoencoderKL, device: torch.device, dtype: torch.dtype) -> None:
        self.vae, self.device, self.dtype = vae, device, dtype

    def encode(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, 3, H, W) in [-1, 1] -> the VAE posterior's (mean, std), each (b, C, h, w)."""
        x = image.to(self.device, self.dtype)
        dist = self.vae.encode(x).latent_dist
        if self.dtype == torch.float16 and not torch.isfinite(dist.mean).all():
            log.warning("VAE encode in fp16 gave NaN/inf; encoding again in fp32")
            with _vae_in_fp32(self.vae):
                dist = self.vae.encode(x.float()).latent_dist
            return dist.mean.to(self.dtype), dist.std.to(self.dtype)
        return dist.mean, dist.std

    def sample(self, posterior: tuple[torch.Tensor, torch.Tensor], gens: list[torch.Generator]) -> torch.Tensor:
        """z_i = mean + std * eps_i with eps_i from generator i, then into the diffusion model's latent scale."""
        mean, std = posterior
        eps = per_image_noise(gens, tuple(mean.shape[1:])).to(self.device, self.dtype)  # (b, C, h, w)
        z = mean + std * eps
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (z - shift) * self.vae.config.scaling_factor

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        """The diffusion model's latents -> the VAE decoder's input."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return latents / self.vae.config.scaling_factor + shift

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (b, C, h, w) -> images (b, 3, H, W) in [-1, 1]; an fp16 decode that overflows is redone in fp32.

        The SD 1.x/2.x VAE decoder's activations exceed fp16's range on some images and come out NaN (black images,
        A1111 #7633); decoding those again in fp32 costs one extra decode and only when it happens. bf16 keeps fp32's
        exponent range, so it cannot overflow where fp32 does not: a bf16 decode needs no fallback (its rounding,
        measured against fp32 by bench/bench_cpu_dtype.py, is in docs/inference.md's Precision section).
        """
        z = self.unscale(latents)
        decoded = self.vae.decode(z, return_dict=False)[0]
        if self.dtype == torch.float16 and torch.isnan(decoded).any():
            log.warning("VAE decode in fp16 gave NaN; decoding again in fp32")
            with _vae_in_fp32(self.vae):
                decoded = self.vae.decode(z.float(), return_dict=False)[0]
        return decoded

    def resize(self, latents: torch.Tensor, height: int, width: int, upscaler: str):
        """Latents (b, C, h, w) -> the start of a pass at height x width px (the hires fix's second pass): for
        `latent` the latents resized (b, C, H/f, W/f); for `lanczos` the VAE posterior (mean, std) of the decoded
        images resized in pixels, to be sampled per image."""
        f = self.vae_factor
        if upscaler == "latent":
            # A1111's "Latent": bilinear, no antialiasing (shared.latent_upscale_modes)
            return F.interpolate(latents, size=(height // f, width // f), mode="bilinear", align_corners=False)
        pixels = float_to_uint8(tensor_to_float_images(self.decode(latents)))  # (b, h*f, w*f, 3) uint8
        resized = [pil_to_tensor(Image.fromarray(p).resize((width, height), Image.LANCZOS)) for p in pixels]
        return self.encode(torch.cat(resized))  # (b, 3, H, W) -> posterior (mean, std), (b, C, H/f, W/f)

    @property
    def vae_factor(self) -> int:
        return vae_factor(self.vae.config)


class _vae_in_fp32:
    """Context: the VAE in fp32 for one call, then back to its dtype."""

    def __init__(self, vae: AutoencoderKL) -> None:
        self.vae, self.dtype = vae, vae.dtype

    def __enter__(self) -> AutoencoderKL:
        return self.vae.to(torch.float32)

    def __exit__(self, *exc) -> None:
        self.vae.to(self.dtype)
