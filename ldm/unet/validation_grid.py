"""Validation samples during stage 2: fixed prompts and seeds, with guidance, through the inference pipeline: the
image grid (`sample_grid`) and the images of the sample metrics (`sample_images`, `ldm.training.sample_metrics`)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torchvision.utils import make_grid

from ldm.models.components import Components
from ldm.parallel.fsdp import is_fsdp, reshard_after_inference
from ldm.pipeline.pipeline import Pipeline
from ldm.text.encoder import FrozenTextEncoder
from ldm.unet.config import SampleConfig


@torch.no_grad()
def sample_grid(
    accelerator: Accelerator,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: FrozenTextEncoder,
    noise_scheduler: DDPMScheduler,
    cfg: SampleConfig,
) -> torch.Tensor | None:
    """One image per prompt (prompt i with seed cfg.seed + i), as a (3, H, W) grid in [0, 1] on the main process.

    Every process draws its share of the prompts and the images are gathered, so no process idles at a barrier
    long enough to hit the distributed timeout, and the grid is the same whatever the number of processes.
    """
    items = [(prompt, cfg.seed + i) for i, prompt in enumerate(cfg.prompts)]
    images = sample_images(accelerator, unet, vae, text_encoder, noise_scheduler, cfg, items)
    gathered = sorted(gather_object([(i, image.permute(1, 2, 0).numpy()) for i, image in images]),
                      key=lambda pair: pair[0])
    if not accelerator.is_main_process or not gathered:
        return None
    tiles = torch.stack([torch.from_numpy(img).permute(2, 0, 1).float() / 255 for _, img in gathered])
    return make_grid(tiles, nrow=min(len(tiles), 8))


@torch.no_grad()
def sample_images(
    accelerator: Accelerator,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: FrozenTextEncoder,
    noise_scheduler: DDPMScheduler,
    cfg: SampleConfig,
    items: Sequence[tuple[str, int]],
) -> list[tuple[int, torch.Tensor]]:
    """This process's share of `items` (the global list of (prompt, seed); item k goes to process k % processes),
    drawn with `cfg`'s guidance scale, steps and sampler: [(k, uint8 (3, H, W))]. A collective under FSDP."""
    was_training = unet.training
    unet.eval()
    components = Components(unet=unet, vae=vae, text_encoder=text_encoder,
                            scheduler_config=dict(noise_scheduler.config), name="training")
    pipe = Pipeline(components, accelerator.device, torch.float32)
    mine = list(range(accelerator.process_index, len(items), accelerator.num_processes))
    if is_fsdp(accelerator):
        # Under FSDP every forward pass gathers weights from all processes: every process must make the same number
        # of them, so a process with one item fewer draws item 0 once more and drops the picture.
        rounds = -(-len(items) // accelerator.num_processes)
        mine += [-1] * (rounds - len(mine))
    # A DeepSpeed engine's module holds bf16/fp16 weights under mixed precision: run it under autocast.
    dtype = next(unet.parameters()).dtype
    low_precision = torch.autocast(accelerator.device.type, dtype) if dtype != torch.float32 else contextlib.nullcontext()
    images = []
    for k in mine:
        prompt, seed = items[max(k, 0)]
        with low_precision:
            result = pipe(prompt, steps=cfg.steps, cfg=cfg.cfg, sampler=cfg.sampler, seed=seed, show_progress=False)
        if k >= 0:
            images.append((k, torch.from_numpy(np.array(result.images[0])).permute(2, 0, 1)))  # (3, H, W) uint8
    # FSDP2 leaves some units' parameters whole after a forward without backward: without this the next training
    # step would run them with the weights sampled with (the EMA's, swapped in) instead of the restored ones
    reshard_after_inference(unet)
    unet.train(was_training)
    return images
