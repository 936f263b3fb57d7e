"""Validation samples during stage 2: fixed prompts and seeds, with guidance, through the inference pipeline."""

from __future__ import annotations

import contextlib

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
    was_training = unet.training
    unet.eval()
    components = Components(unet=unet, vae=vae, text_encoder=text_encoder,
                            scheduler_config=dict(noise_scheduler.config), name="training")
    pipe = Pipeline(components, accelerator.device, torch.float32)
    mine = list(range(accelerator.process_index, len(cfg.prompts), accelerator.num_processes))
    if is_fsdp(accelerator):
        # Under FSDP every forward pass gathers weights from all processes: every process must make the same number
        # of them, so a process with one prompt fewer draws prompt 0 once more and drops the picture.
        rounds = -(-len(cfg.prompts) // accelerator.num_processes)
        mine += [-1] * (rounds - len(mine))
    # A DeepSpeed engine's module holds bf16/fp16 weights under mixed precision: run it under autocast.
    dtype = next(unet.parameters()).dtype
    low_precision = torch.autocast(accelerator.device.type, dtype) if dtype != torch.float32 else contextlib.nullcontext()
    images = []
    for i in mine:
        j = max(i, 0)
        with low_precision:
            result = pipe(cfg.prompts[j], steps=cfg.steps, cfg=cfg.cfg, sampler=cfg.sampler, seed=cfg.seed + j,
                          show_progress=False)
        if i >= 0:
            images.append((i, np.array(result.images[0])))  # (H, W, 3) uint8
    # FSDP2 leaves some units' parameters whole after a forward without backward: without this the next training
    # step would run them with the weights sampled with (the EMA's, swapped in) instead of the restored ones
    reshard_after_inference(unet)
    unet.train(was_training)
    gathered = sorted(gather_object(images), key=lambda pair: pair[0])
    if not accelerator.is_main_process or not gathered:
        return None
    tiles = torch.stack([torch.from_numpy(img).permute(2, 0, 1).float() / 255 for _, img in gathered])
    return make_grid(tiles, nrow=min(len(tiles), 8))
