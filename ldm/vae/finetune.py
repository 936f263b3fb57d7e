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
  pink demo, little: pink stays 4.0 from orange, docs/demo.md, "The pink demo").

And for the decoder, `loss.decoder_anchor_weight`: its output on latents a U-Net generated
(`python -m ldm.pipeline.anchor_latents`) stays the pretrained decoder's. Samples sit off the encoded images, so a
decoder that still reconstructs every known image can draw them differently; in the pink demo generated orange and
yellow latents came out pink until this anchor held them.

Either way the exported VAE keeps the pretrained VAE's scaling factor, which the U-Net was trained with.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from ldm.errors import UserError
from ldm.vae.load_vae import load_vae, vae_directory
from ldm.weights import read_safetensors


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


def load_anchor_latents(path: str | Path, vae: AutoencoderKL) -> torch.Tensor:
    """The `latents` (N, C, h, w) of an `anchor_latents` file, checked against the VAE's latent channels."""
    if not Path(path).is_file():
        raise UserError(f"loss.decoder_anchor_latents: {path} is not a file; write it with python -m "
                        "ldm.pipeline.anchor_latents")
    tensors, _ = read_safetensors(Path(path), lambda k: k == "latents",
                                  problem=lambda why: f"loss.decoder_anchor_latents: cannot read {path}: {why}")
    latents = tensors.get("latents")
    channels = vae.config.latent_channels
    if latents is None or latents.ndim != 4 or latents.shape[1] != channels:
        found = "no 'latents' tensor" if latents is None else f"latents of shape {tuple(latents.shape)}"
        raise UserError(f"loss.decoder_anchor_latents: {path} holds {found}, not (N, {channels}, h, w) for this VAE; "
                        "write it with python -m ldm.pipeline.anchor_latents for a model using this VAE")
    return latents.float()


class DecoderAnchor(nn.Module):
    """A frozen copy of the pretrained decoder and the latents to hold it on; the loss is the squared difference
    between the trained decoder's images and the pretrained one's (in [-1, 1]), summed over pixels and averaged over
    the batch, as the reconstruction term sums its error per image.

    `draw(step, rank, n)` picks the step's latents from a generator seeded by (seed, step, rank): no RNG state to
    checkpoint, so a resumed run draws the same ones, and each process draws its own."""

    def __init__(self, vae: AutoencoderKL, latents: torch.Tensor, seed: int):
        super().__init__()
        self.decoder = copy.deepcopy(vae.decoder).requires_grad_(False).eval()
        post = vae.post_quant_conv if vae.post_quant_conv is not None else nn.Identity()
        self.post_quant_conv = copy.deepcopy(post).requires_grad_(False).eval()
        self.register_buffer("latents", latents, persistent=False)
        self.seed = seed

    def train(self, mode: bool = True) -> DecoderAnchor:  # the frozen copy stays in eval mode
        return self

    def draw(self, step: int, rank: int, n: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 4099 + rank)
        index = torch.randint(len(self.latents), (n,), generator=generator)
        return self.latents[index.to(self.latents.device)]

    def forward(self, z: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            reference = self.decoder(self.post_quant_conv(z.float()))  # in fp32 whatever autocast gave
        return (decoded.float() - reference).pow(2).flatten(1).sum(1).mean()
