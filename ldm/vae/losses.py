"""The pieces of the autoencoder's loss, as plain functions the training loop composes.

Conventions follow the LDM autoencoders (https://github.com/CompVis/latent-diffusion, `contperceptual.py`): the
reconstruction NLL and the KL are summed over pixels/latent elements and averaged over the batch; the GAN term is a
mean over patch logits, weighted adaptively so its gradient at the decoder's last layer is comparable to the NLL's.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn


class LogVariance(nn.Module):
    """A learned scalar output log-variance: NLL = |x - x_hat| / exp(logvar) + logvar.

    It lives in its own module so it is optimised with the VAE (LDM forgets to pass it to the optimizer) and saved
    in checkpoints without dragging the LPIPS network along.
    """

    def __init__(self, init: float = 0.0, learn: bool = False):
        super().__init__()
        self.logvar = nn.Parameter(torch.tensor(float(init)), requires_grad=learn)


def reconstruction_nll(
    x: torch.Tensor,
    x_hat: torch.Tensor,
    logvar: torch.Tensor,
    perceptual: nn.Module | None = None,
    perceptual_weight: float = 1.0,
    kind: Literal["l1", "l2"] = "l1",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """NLL summed over pixels, averaged over the batch; images in [-1, 1], shape (B, C, H, W)."""
    rec = (x - x_hat).abs() if kind == "l1" else (x - x_hat).pow(2)  # (B, C, H, W)
    logs = {"rec_loss": rec.detach().mean()}
    if perceptual is not None and perceptual_weight > 0:
        p = perceptual(x.float(), x_hat.float())  # (B, 1, 1, 1), broadcast over pixels as in LDM
        rec = rec + perceptual_weight * p
        logs["lpips_loss"] = p.detach().mean()
    nll = rec / torch.exp(logvar) + logvar
    logs["logvar"] = logvar.detach()
    return nll.sum() / x.shape[0], logs


def kl_loss(posterior: DiagonalGaussianDistribution) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) summed over latent elements, averaged over the batch."""
    return posterior.kl().mean()


def generator_gan_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator wants its reconstructions scored as real (used for both hinge and vanilla GANs)."""
    return -logits_fake.mean()


def discriminator_loss(
    logits_real: torch.Tensor, logits_fake: torch.Tensor, kind: Literal["hinge", "vanilla"] = "hinge"
) -> torch.Tensor:
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def adaptive_gan_weight(
    nll_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """||d nll / d w|| / (||d gan / d w|| + 1e-4) at the decoder's last layer `w`, clamped to [0, max_weight].

    Balances the two terms without tuning a fixed GAN weight (Esser et al. 2021, https://arxiv.org/abs/2012.09841).
    The weight is a constant for the backward pass (detached).
    """
    (nll_grad,) = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)
    (gan_grad,) = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)
    weight = nll_grad.norm() / (gan_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
