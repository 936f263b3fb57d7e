"""The autoencoder as the training loop sees it: one forward that returns the reconstruction and the posterior."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn


class PosteriorAutoencoder(nn.Module):
    """Wraps diffusers' `AutoencoderKL`, whose own forward hides the posterior that the KL term needs.

    Distributed wrappers (DDP, FSDP) hook into `forward`, so encode and decode must happen inside one forward call.
    """

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(
        self, x: torch.Tensor, extra_latents: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution, torch.Tensor | None]:
        """The reconstruction (B, 3, H, W), the posterior, and the decoder's images of `extra_latents` (decoded in
        the same call, so inside this forward; None without them)."""
        posterior = self.vae.encode(x).latent_dist  # mean, std: (B, C_z, H/f, W/f)
        z = posterior.sample()  # sample() draws from the global RNG
        if extra_latents is None:
            return self.vae.decode(z).sample, posterior, None
        if extra_latents.shape[2:] == z.shape[2:]:  # one decoder call for both
            x_hat, extra = self.vae.decode(torch.cat([z, extra_latents.to(z.dtype)])).sample.split(
                [len(z), len(extra_latents)])
            return x_hat, posterior, extra
        return self.vae.decode(z).sample, posterior, self.vae.decode(extra_latents.to(z.dtype)).sample

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output convolution, where the adaptive GAN weight compares gradient norms."""
        return self.vae.decoder.conv_out.weight
