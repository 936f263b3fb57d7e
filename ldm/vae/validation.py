"""Validation of an autoencoder on held-out images: the training loss terms, PSNR, SSIM, LPIPS and the latents' scale.

Each held-out image with dataset index `i` draws its posterior noise (C, h, w), float32, from
`ldm.training.validation.sample_generator(i)`: z = mean + std * noise. From that fixed posterior sample come the loss
terms training minimises (`rec_loss`: mean L1 or L2 per pixel as `loss.recon` says, `lpips_loss`, `kl_loss`: KL to
N(0, I) summed over latent elements; per image, averaged) and the latents' statistics; PSNR, SSIM and LPIPS are of
the posterior mode's reconstruction (what a reader of "how well does it reconstruct" means). The split across
processes, the fixed draws and the reduction are the mechanism both stages share (`ldm.training.validation`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchvision.utils import make_grid

from ldm.data.dataset import collate_images
from ldm.data.loader import KeyedSubset
from ldm.training.validation import Sums, process_batches, sample_generator


@torch.no_grad()
def evaluate_reconstructions(
    vae: AutoencoderKL,
    dataset: KeyedSubset,
    accelerator: Accelerator,
    perceptual: nn.Module | None,
    recon: Literal["l1", "l2"] = "l1",
    batch_size: int = 16,
    grid_images: int = 8,
) -> tuple[dict[str, Any], torch.Tensor | None, list[str]]:
    """Metrics over the held-out `dataset` (a collective: every process computes its share of the batches), and an
    image grid.

    The latent std, over the fixed posterior samples' elements, gives `scaling_factor` = 1 / std, as SD's 0.18215 was
    measured. Returns the metrics (identical on every process; "count": the images measured), on the main process a
    grid of `grid_images` (originals above mode reconstructions, in [0, 1]; None for 0), and the names of the images
    this process could not decode.
    """
    was_training = vae.training
    vae.eval()
    device = accelerator.device
    per_image = ["rec_loss", "kl_loss", "psnr", "ssim"] + (["lpips_loss", "lpips"] if perceptual is not None else [])
    sums = Sums([*per_image, "z", "z2"], device=device)  # z, z2: every latent element and its square
    grid = None
    skipped: list[str] = []
    for members, keep in process_batches(len(dataset), batch_size, accelerator.process_index,
                                         accelerator.num_processes):
        if not keep:
            continue  # a padding batch: stage 1 runs without FSDP, so its forward passes need no partner
        batch = collate_images([dataset[i] for i in members])
        skipped += batch["skipped"]
        x = batch["pixel_values"].to(device)  # (B, 3, H, W) in [-1, 1]
        if x.shape[0] == 0:
            continue
        posterior = vae.encode(x).latent_dist  # mean, std: (B, C, h, w)
        noise = torch.stack([torch.randn(posterior.mean.shape[1:], generator=sample_generator(int(i)))
                             for i in batch["indices"]]).to(device)
        z = posterior.mean + posterior.std * noise
        # the fixed sample's reconstruction as training decodes it (not clamped), and the mode's, in one call
        x_sampled, x_mode = vae.decode(torch.cat([z, posterior.mode()])).sample.float().chunk(2)
        x_mode = x_mode.clamp(-1, 1)
        error = (x - x_sampled).abs() if recon == "l1" else (x - x_sampled).pow(2)
        a, b = (x + 1) / 2, (x_mode + 1) / 2  # [0, 1]
        values = {
            "rec_loss": error.mean(dim=(1, 2, 3)),
            "kl_loss": posterior.kl(),  # (B,) summed over latent elements
            "psnr": peak_signal_noise_ratio(b, a, data_range=1.0, reduction="none", dim=(1, 2, 3)),
            "ssim": structural_similarity_index_measure(b, a, data_range=1.0, reduction="none"),
            "z": z, "z2": z.pow(2),
        }
        if perceptual is not None:
            scores = perceptual(torch.cat([x, x]), torch.cat([x_sampled, x_mode])).flatten()  # (2B,)
            values["lpips_loss"], values["lpips"] = scores.chunk(2)
        sums.add(values)
        if grid is None and grid_images > 0 and accelerator.is_main_process:
            n = min(grid_images, x.shape[0])
            grid = make_grid(torch.cat([a[:n], b[:n]]).cpu(), nrow=n)
    totals = sums.reduce(accelerator)
    vae.train(was_training)
    z_mean, z2_mean = totals.pop("z") or 0.0, totals.pop("z2") or 1.0
    z_std = max(z2_mean - z_mean**2, 1e-12) ** 0.5
    metrics = {**totals, "latent_mean": z_mean, "latent_std": z_std, "scaling_factor": 1.0 / z_std}
    return metrics, grid, skipped
