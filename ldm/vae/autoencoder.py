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

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        posterior = self.vae.encode(x).latent_dist  # mean, std: (B, C_z, H/f, W/f)
        x_hat = self.vae.decode(posterior.sample()).sample  # (B, 3, H, W); sample() draws from the global RNG
        return x_hat, posterior

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output convolution, where the adaptive GAN weight compares gradient norms."""
        return self.vae.decoder.conv_out.weight
