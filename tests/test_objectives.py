"""Training objectives (ldm/unet/objective.py and its parts): each one's math against an independent float64 formula
written here, today's loss unchanged under the default config, the loss mask's reduction, and the refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldm.unet.losses import reduce_per_sample
from ldm.unet.objective import NoiseConfig, build_noise_scheduler, denoising_error, diffusion_loss
from ldm.unet.presets import build_unet


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_unet("tiny", sample_size=8, latent_channels=4, cross_attention_dim=32)


def _batch(seed: int = 0, b: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 77, 32, generator=g)


def test_the_default_loss_is_todays_bit_for_bit(unet):
    """The loss as it was before the objectives (issue 28), written out: eps = randn, t = randint, then the mean
    squared eps error. Every new option off must give this exact number from the same RNG state."""
    x0, text = _batch()
    scheduler = build_noise_scheduler(NoiseConfig())
    torch.manual_seed(7)
    eps = torch.randn_like(x0)
    t = torch.randint(0, 1000, (x0.shape[0],))
    pred = unet(scheduler.add_noise(x0, eps, t), t, encoder_hidden_states=text).sample
    expected = F.mse_loss(pred.float(), eps.float(), reduction="none").mean(dim=(1, 2, 3)).mean()
    torch.manual_seed(7)
    loss = diffusion_loss(unet, scheduler, x0, text, NoiseConfig())
    assert torch.equal(loss, expected)
    assert torch.equal(torch.randn(1), (torch.manual_seed(7), torch.randn_like(x0), torch.randint(0, 1000, (3,)),
                                        torch.randn(1))[-1])  # and the same number of draws


def test_a_mask_of_ones_is_the_mean_and_a_mask_weighs_elements():
    g = torch.Generator().manual_seed(1)
    err = torch.rand(2, 4, 3, 5, generator=g, dtype=torch.float64)
    assert torch.equal(reduce_per_sample(err), err.mean(dim=(1, 2, 3)))
    torch.testing.assert_close(reduce_per_sample(err, torch.ones(2, 1, 3, 5, dtype=torch.float64)),
                               err.mean(dim=(1, 2, 3)), rtol=1e-15, atol=0)
    mask = torch.rand(2, 1, 3, 5, generator=g, dtype=torch.float64)
    mask[1] = 0  # sample 1: nothing counts -> 0, not nan
    expected = [sum(err[0, c, i, j] * mask[0, 0, i, j] for c in range(4) for i in range(3) for j in range(5))
                / (4 * mask[0].sum()), 0.0]
    torch.testing.assert_close(reduce_per_sample(err, mask), torch.tensor(expected, dtype=torch.float64))
    binary = (torch.arange(15).view(1, 1, 3, 5) < 6).double().expand(2, 1, 3, 5)  # the first 6 latent pixels
    torch.testing.assert_close(reduce_per_sample(err, binary), err.flatten(2)[:, :, :6].mean(dim=(1, 2)))
    with pytest.raises(ValueError, match=r"\(B, 1, h, w\)"):
        reduce_per_sample(err, torch.ones(2, 4, 3, 5))


def test_the_mask_reaches_the_loss(unet):
    x0, text = _batch()
    cfg = NoiseConfig()
    scheduler = build_noise_scheduler(cfg)
    eps, t = torch.randn_like(x0), torch.tensor([10, 500, 990])
    mse, _ = denoising_error(unet, scheduler, x0, eps, t, text, cfg)
    ones, _ = denoising_error(unet, scheduler, x0, eps, t, text, cfg, mask=torch.ones(3, 1, 8, 8))
    zeros, _ = denoising_error(unet, scheduler, x0, eps, t, text, cfg, mask=torch.zeros(3, 1, 8, 8))
    torch.testing.assert_close(ones, mse, rtol=1e-6, atol=0)  # float32 sums in another order
    assert torch.equal(zeros, torch.zeros(3))
    torch.manual_seed(3)
    masked = diffusion_loss(unet, scheduler, x0, text, cfg, mask=torch.zeros(3, 1, 8, 8))
    assert masked.item() == 0.0
