"""Validation of an autoencoder on held-out images: PSNR, SSIM, LPIPS and the latents' scale."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL
from torch import nn
from torch.utils.data import Dataset
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchvision.utils import make_grid

from ldm.data.dataset import collate_images


@torch.no_grad()
def evaluate_reconstructions(
    vae: AutoencoderKL,
    dataset: Dataset,
    accelerator: Accelerator,
    perceptual: nn.Module | None,
    batch_size: int = 16,
    grid_images: int = 8,
) -> tuple[dict[str, float], torch.Tensor | None, list[str]]:
    """Metrics over `dataset` (each process takes every n-th image; the sums are reduced), and an image grid.

    Reconstructions decode the posterior mode. The latent std is measured on posterior samples drawn from a private
    generator, so validation never moves the training RNG. `scaling_factor` = 1 / std, as SD's 0.18215 was measured.
    Returns the metrics (identical on every process), on the main process a grid (originals above reconstructions,
    in [0, 1]), and the names of this process's images that could not be decoded.
    """
    was_training = vae.training
    vae.eval()
    device = accelerator.device
    generator = torch.Generator().manual_seed(0)
    keys = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    # [psnr, ssim, lpips, images, z sum, z squared sum, z elements]
    sums = torch.zeros(7, dtype=torch.float64, device=device)
    grid = None
    skipped: list[str] = []
    for start in range(0, len(keys), batch_size):
        batch = collate_images([dataset[k] for k in keys[start : start + batch_size]])
        skipped += batch["skipped"]
        x = batch["pixel_values"].to(device)
        if x.shape[0] == 0:
            continue
        posterior = vae.encode(x).latent_dist
        x_hat = vae.decode(posterior.mode()).sample.clamp(-1, 1)
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(device)
        a, b = (x + 1) / 2, (x_hat.float() + 1) / 2  # [0, 1]
        psnr = peak_signal_noise_ratio(b, a, data_range=1.0, reduction="none", dim=(1, 2, 3))
        ssim = structural_similarity_index_measure(b, a, data_range=1.0, reduction="none")
        lp = perceptual(x, x_hat.float()).flatten() if perceptual is not None else torch.zeros_like(psnr)
        sums += torch.stack([
            psnr.sum(), ssim.sum(), lp.sum(), torch.tensor(float(x.shape[0]), device=device),
            z.sum(), z.pow(2).sum(), torch.tensor(float(z.numel()), device=device),
        ]).double()
        if grid is None and accelerator.is_main_process:
            n = min(grid_images, x.shape[0])
            grid = make_grid(torch.cat([a[:n], b[:n]]).cpu(), nrow=n)
    sums = accelerator.reduce(sums, reduction="sum")
    vae.train(was_training)
    n, zn = sums[3].clamp(min=1), sums[6].clamp(min=1)
    z_mean = sums[4] / zn
    z_std = (sums[5] / zn - z_mean**2).clamp(min=1e-12).sqrt()
    metrics = {
        "psnr": float(sums[0] / n),
        "ssim": float(sums[1] / n),
        "lpips": float(sums[2] / n),
        "latent_mean": float(z_mean),
        "latent_std": float(z_std),
        "scaling_factor": float(1.0 / z_std),
        "images": int(sums[3]),
    }
    return metrics, grid, skipped
