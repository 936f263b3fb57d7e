"""VAE training throughput (images/s) on this machine, at 32 and 64 px, with and without the GAN phase.

    python bench/bench_vae.py [--preset tiny] [--lpips alex] [--steps 20] [--batch-size 16]

Times the same optimizer step the training script takes (autoencoder forward/backward with L1 + LPIPS + KL, and from
`disc_start` on the adaptive GAN term plus the discriminator step), after a few warm-up steps, in one process.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from ldm.vae.autoencoder import PosteriorAutoencoder
from ldm.vae.discriminator import PatchDiscriminator
from ldm.vae.losses import (
    adaptive_gan_weight, discriminator_loss, generator_gan_loss, kl_loss, reconstruction_nll,
)
from ldm.vae.perceptual import build_lpips
from ldm.vae.presets import build_vae


def images_per_second(preset: str, resolution: int, batch_size: int, steps: int, gan: bool, lpips_net: str) -> float:
    torch.manual_seed(0)
    model = PosteriorAutoencoder(build_vae(preset, resolution))
    disc = PatchDiscriminator()
    lpips = build_lpips(lpips_net, pretrained_backbone=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-4, betas=(0.5, 0.9))
    x = torch.rand(batch_size, 3, resolution, resolution) * 2 - 1
    logvar = torch.zeros(())

    def step() -> None:
        x_hat, posterior, _ = model(x)
        nll, _ = reconstruction_nll(x, x_hat, logvar, lpips)
        loss = nll + 1e-6 * kl_loss(posterior)
        if gan:
            disc.requires_grad_(False)
            g = generator_gan_loss(disc(x_hat))
            loss = loss + 0.5 * adaptive_gan_weight(nll, g, model.last_layer) * g
        loss.backward()
        opt.step()
        opt.zero_grad()
        if gan:
            disc.requires_grad_(True)
            real, fake = disc(torch.cat([x, x_hat.detach()])).chunk(2)
            discriminator_loss(real, fake).backward()
            opt_d.step()
            opt_d.zero_grad()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lpips", default="alex", choices=["alex", "vgg"])
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, preset {args.preset}, batch {args.batch_size}, LPIPS {args.lpips}")
    print("| resolution | images/s (no GAN) | images/s (GAN on) | GAN-on / no-GAN |")
    print("|---|---|---|---|")
    for resolution in (32, 64):
        plain = images_per_second(args.preset, resolution, args.batch_size, args.steps, False, args.lpips)
        gan = images_per_second(args.preset, resolution, args.batch_size, args.steps, True, args.lpips)
        print(f"| {resolution} px | {plain:.1f} | {gan:.1f} | {gan / plain:.2f} |")


if __name__ == "__main__":
    main()
