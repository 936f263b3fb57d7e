"""The stage-1 loss pieces on known inputs."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ldm.errors import UserError
from ldm.vae.autoencoder import PosteriorAutoencoder
from ldm.vae.discriminator import PatchDiscriminator
from ldm.vae.losses import (
    LogVariance, adaptive_gan_weight, discriminator_loss, generator_gan_loss, kl_loss, reconstruction_nll,
)
from ldm.vae.perceptual import build_lpips
from ldm.vae.presets import VAE_PRESETS, build_vae, downsampling_factor


def posterior(mean: torch.Tensor, logvar: torch.Tensor) -> DiagonalGaussianDistribution:
    return DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))


def test_kl_of_standard_normal_posterior_is_zero():
    zeros = torch.zeros(3, 4, 8, 8)
    assert kl_loss(posterior(zeros, zeros)).item() == 0.0


def test_kl_matches_closed_form():
    # KL(N(mu, s^2) || N(0, 1)) = 0.5 * (mu^2 + s^2 - 1 - log s^2) per element, summed, averaged over the batch
    mean, logvar = torch.full((2, 4, 2, 2), 1.5), torch.full((2, 4, 2, 2), math.log(0.25))
    per_element = 0.5 * (1.5**2 + 0.25 - 1 - math.log(0.25))
    assert kl_loss(posterior(mean, logvar)).item() == pytest.approx(per_element * 16, rel=1e-5)


def test_reconstruction_nll_value_and_learned_logvar_gradient():
    x, x_hat = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    lv = LogVariance(init=0.3, learn=True)
    nll, logs = reconstruction_nll(x, x_hat, lv.logvar, kind="l1")
    # per pixel: 0.5 / e^0.3 + 0.3, summed over 48 pixels per image, averaged over 2 images
    assert nll.item() == pytest.approx(48 * (0.5 / math.exp(0.3) + 0.3), rel=1e-6)
    assert logs["rec_loss"].item() == pytest.approx(0.5)
    nll.backward()
    # d/dlv of 48 * (0.5 e^-lv + lv) = 48 * (1 - 0.5 e^-lv)
    assert lv.logvar.grad.item() == pytest.approx(48 * (1 - 0.5 * math.exp(-0.3)), rel=1e-5)


def test_l2_reconstruction():
    x, x_hat = torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), 0.5)
    nll, _ = reconstruction_nll(x, x_hat, torch.tensor(0.0), kind="l2")
    assert nll.item() == pytest.approx(12 * 0.25)


def test_gan_losses_on_known_logits():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    # hinge: 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))) = 0.5 * (0.25 + 0.5)
    assert discriminator_loss(real, fake, "hinge").item() == pytest.approx(0.375)
    expected = 0.5 * (
        (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-0.5))) / 2
        + (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(0.0))) / 2
    )
    assert discriminator_loss(real, fake, "vanilla").item() == pytest.approx(expected, rel=1e-6)
    assert generator_gan_loss(fake).item() == pytest.approx(1.0)


def test_adaptive_weight_matches_hand_computation():
    torch.manual_seed(0)
    w = torch.randn(3, 5, requires_grad=True)  # the "last layer"
    h = torch.randn(5, 7)
    y = torch.randn(3, 7)
    out = w @ h  # (3, 7)
    nll = (out - y).pow(2).sum()
    gan = -out.mean()
    # by hand: d nll / dw = 2 (wh - y) h^T ; d gan / dw = -(1/21) * 1 h^T
    g_nll = 2 * (w.detach() @ h - y) @ h.T
    g_gan = -torch.ones(3, 7) @ h.T / 21
    expected = g_nll.norm() / (g_gan.norm() + 1e-4)
    got = adaptive_gan_weight(nll, gan, w)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not got.requires_grad
    assert adaptive_gan_weight(nll, gan, w, max_weight=0.5).item() == 0.5  # clamped


def test_lpips_gradient_reaches_the_decoder_and_not_lpips():
    torch.manual_seed(0)
    model = PosteriorAutoencoder(build_vae("tiny", 32))
    lp = build_lpips("alex", pretrained_backbone=False)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    x_hat, _, _ = model(x)
    lp(x, x_hat).sum().backward()
    grad = model.last_layer.grad
    assert grad is not None and grad.abs().sum() > 0
    assert all(p.grad is None for p in lp.parameters())
    assert not lp.training


def test_lpips_pretrained_backbone_offline_says_which_option_to_set(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached weights
    import torchvision.models._api as api

    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(api.WeightsEnum, "get_state_dict", no_network)
    with pytest.raises(UserError, match="loss.lpips_pretrained_backbone=false"):
        build_lpips("alex", pretrained_backbone=True)


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_patch_discriminator_scores_patches(num_layers):
    d = PatchDiscriminator(base_channels=8, num_layers=num_layers)
    logits = d(torch.randn(2, 3, 64, 64))
    assert logits.shape[:2] == (2, 1) and logits.shape[-1] > 1  # a grid of patch logits, not one score
    widths = [m.out_channels for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert widths == [8] + [8 * min(2**i, 8) for i in range(1, num_layers + 1)] + [1]


def test_vae_presets():
    sizes = {name: sum(p.numel() for p in build_vae(name, 32).parameters()) for name in VAE_PRESETS}
    assert 83e6 < sizes["sd-f8"] < 84e6  # SD's kl-f8 layout
    assert downsampling_factor("sd-f8") == 8 and downsampling_factor("small-f4") == 4
    assert downsampling_factor("tiny") == 2
    with pytest.raises(UserError, match="unknown VAE preset 'huge'"):
        build_vae("huge", 32)
