"""Fine-tuning a trained VAE without breaking the U-Nets that were trained on its latents.

A U-Net learns the latent space of one VAE: the latent each image encodes to, times one scaling factor. Teaching that
VAE new content (a colour, a texture) must leave that space where it is, or the U-Net's samples decode to the wrong
thing. Two ways, both from `train/train_vae.py`'s config:

- `model.freeze_encoder`: train the decoder only (how Stability fine-tuned SD's VAE into `sd-vae-ft-mse`,
  https://huggingface.co/stabilityai/sd-vae-ft-mse). The latents stay exactly the old ones; the decoder can only
  draw new content that the frozen encoder already tells apart.
- `loss.latent_anchor_weight`: train both, plus a penalty on how far the encoder's posterior means move from the
  pretrained encoder's, on every training image. Known content, already reconstructed, keeps its latents (its
  reconstruction gives no reason to move); new content's latents move only as far as the anchor lets them (in the
  pink demo, little: pink stays 4.0 from orange, README "The pink demo").

Either way the exported VAE keeps the pretrained VAE's scaling factor, which the U-Net was trained with.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from ldm.vae.loading import load_vae, vae_directory


def load_trainable_vae(path: str | Path, resolution: int, freeze_encoder: bool = False) -> AutoencoderKL:
    """The pretrained VAE (a VAE or model directory) in training mode: every parameter trainable, or the decoder's
    only."""
    vae = load_vae(vae_directory(path), resolution).train().requires_grad_(True)
    if freeze_encoder:
        for part in (vae.encoder, vae.quant_conv):
            if part is not None:  # `use_quant_conv: false` VAEs have none
                part.requires_grad_(False)
    return vae


class LatentAnchor(nn.Module):
    """A frozen copy of the pretrained encoder; the loss is how far the trained encoder's posterior means moved from
    it: the squared difference summed over latent elements, averaged over the batch (the KL term's convention)."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.encoder = copy.deepcopy(vae.encoder).requires_grad_(False).eval()
        quant = vae.quant_conv if vae.quant_conv is not None else nn.Identity()
        self.quant_conv = copy.deepcopy(quant).requires_grad_(False).eval()

    def train(self, mode: bool = True) -> LatentAnchor:  # the frozen copy stays in eval mode
        return self

    @torch.no_grad()
    def reference_mean(self, x: torch.Tensor) -> torch.Tensor:
        moments = self.quant_conv(self.encoder(x))  # (B, 2 C_z, h, w): mean and log-variance
        return DiagonalGaussianDistribution(moments).mean

    def forward(self, x: torch.Tensor, posterior: DiagonalGaussianDistribution) -> torch.Tensor:
        reference = self.reference_mean(x.float())  # in fp32 whatever autocast gave the trained encoder
        return (posterior.mean.float() - reference).pow(2).flatten(1).sum(1).mean()
