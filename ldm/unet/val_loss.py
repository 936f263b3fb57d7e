"""Stage 2's validation loss: the training objective on held-out latents, at fixed noise and timesteps.

Each held-out item is scored once per band of training timesteps (`ldm.training.validation.timestep_bands`; 4 bands
of T = 1000: 0-250, 250-500, 500-750, 750-1000), so every band holds every item and the overall loss, their mean,
estimates the training loss at uniformly drawn timesteps with less spread. Item `index` (its dataset index) draws,
from `sample_generator(index)`, in float64 on the CPU, in this order:

    posterior noise      (C, h, w)   x0 = (mean + std * noise [- shift_factor]) * scaling_factor (`sample_latents`)
    then for each band [lo, hi), lowest first:
        t                ()          uniform integer in [lo, hi)
        eps              (C, h, w)   standard normal
        offset           (C, 1, 1)   only with noise.offset_noise > 0: eps += offset_noise * offset, as training does

The loss is `denoising_error`'s, training's: the eps, v or flow-velocity target, under `loss.type` and weighted by
`noise.min_snr_gamma` or `loss.weighting` ("loss", with the plain unweighted "mse" beside it when they differ). Flow
matching (`noise.prediction_type: flow`) puts band draw t at sigma = (t + 1) / T (so band 750-1000 reaches pure
noise) and scores the velocity eps - x0: a different quantity from a DDPM model's eps or v error, not comparable
with it. Timestep sampling (`noise.timestep_sampling`) and noise assignment (`noise.immiscible`) change where and with
which noise training looks; validation keeps its fixed uniform draws so that runs with different ones compare. What training adds to make learning harder is left out: no caption dropout
(the captioned loss is measured), no `noise.input_perturbation`, no flipped latents. Noising is done in float64, the
U-Net runs in the weights' dtype (under the run's autocast), and the errors are summed in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler

from ldm.latents.cache import LatentCache, collate_latents, sample_latents
from ldm.parallel.fsdp import reshard_after_inference
from ldm.text.conditioning import Conditioning
from ldm.training.validation import Sums, band_label, process_batches, sample_generator
from ldm.unet.conditioning import batch_conditioning
from ldm.unet.losses import LossConfig, elementwise_loss, reduce_per_sample
from ldm.unet.objective import PLAIN, NoiseConfig, predict, score


def fixed_draws(
    index: int, mean: torch.Tensor, std: torch.Tensor, scaling_factor: float, shift_factor: float | None,
    bands: Sequence[tuple[int, int]], offset_noise: float,
) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
    """Item `index`'s x0 (C, h, w) and, per band, its (t, eps (C, h, w)), all float64, in the module's order."""
    generator = sample_generator(index)
    x0 = sample_latents(mean.double()[None], std.double()[None], scaling_factor, shift_factor, generator)[0]
    draws = []
    for lo, hi in bands:
        t = int(torch.randint(lo, hi, (), generator=generator))
        eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        if offset_noise > 0:
            eps = eps + offset_noise * torch.randn(x0.shape[0], 1, 1, generator=generator, dtype=torch.float64)
        draws.append((t, eps))
    return x0, draws


@torch.no_grad()
def unet_val_loss(
    accelerator: Accelerator,
    unet: torch.nn.Module,
    scheduler: DDPMScheduler,
    cache: LatentCache,
    positions: Sequence[int],
    encode: Callable[[list[str]], Conditioning],
    cfg: NoiseConfig,
    bands: Sequence[tuple[int, int]],
    batch_size: int,
    loss: LossConfig = PLAIN,
) -> dict[str, Any]:
    """The validation loss of `unet` on the cache rows at `positions`: {"loss", ["mse"], "count", "bands": {"0-250":
    {...}, ...}}, the same on every process (a collective: call it on all, each computes its share).

    `encode`: captions -> their conditioning (the text encoder's or the text cache's `encode_conditioning`); SDXL's
    time ids come from the cache. Batches hold rows of one aspect-ratio bucket. The U-Net is put in eval mode (LoRA
    dropout off) and back (under FSDP2, resharded); the global RNG is not touched.
    """
    plain = cfg.min_snr_gamma == 0 and loss == PLAIN
    metrics = ["loss"] if plain else ["loss", "mse"]
    sums = Sums(metrics, [band_label(band) for band in bands], accelerator.device)
    was_training = unet.training
    unet.eval()
    for members, keep in process_batches(len(positions), batch_size, accelerator.process_index,
                                         accelerator.num_processes, cache.bucket_ids(positions)):
        batch = collate_latents([cache.row(positions[i]) for i in members])
        items = [fixed_draws(int(index), mean, std, cache.scaling_factor, cache.shift_factor, bands, cfg.offset_noise)
                 for index, mean, std in zip(batch["indices"], batch["mean"], batch["std"])]
        x0 = torch.stack([x for x, _ in items]).to(accelerator.device)  # (B, C, h, w) float64
        text = batch_conditioning(encode(batch["captions"]), batch)
        for k in range(len(bands)):
            t = torch.tensor([draws[k][0] for _, draws in items], device=accelerator.device)  # (B,)
            if cfg.prediction_type == "flow":
                t = (t + 1).float()  # sigma = (t + 1) / T in (0, 1]
            eps = torch.stack([draws[k][1] for _, draws in items]).to(accelerator.device)  # (B, C, h, w)
            with accelerator.autocast():
                pred, target = predict(unet, scheduler, x0, eps, t, text, cfg)
            err, weight = score(pred, target, t, scheduler, cfg, loss)
            mse = err if plain else reduce_per_sample(elementwise_loss(pred, target, "l2"))  # (B,)
            if keep:
                sums.add({"loss": err * weight, "mse": mse}, band=k)
    reshard_after_inference(unet)  # FSDP2: back to the shards an EMA swap and the next step expect
    unet.train(was_training)
    return sums.reduce(accelerator)
