"""The output of a LoRA run (train/train_ldm.py with `lora.enabled`): `lora/` with the adapter in both formats
(ldm/lora/save.py) and, with `lora.export_merged`, `model/`: the base U-Net with the adapter fused into its weights,
as a complete diffusers model directory."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.errors import UserError
from ldm.lora.save import save_lora
from ldm.unet.export import export_model

log = logging.getLogger(__name__)


def require_lora_backend(backend: Any) -> None:
    """LoRA runs under one process or DDP: the adapters are small, so sharding them buys nothing, and the sharded
    backends' whole-state gathering covers whole models only."""
    if backend.sharded:
        raise UserError("lora.enabled runs under one process or DDP (adapters are small enough to replicate): launch "
                        "with plain multi-GPU DDP (configs/accelerate/multi-gpu.yaml), not FSDP or DeepSpeed")


def export_lora(out: Path, unet: nn.Module, cfg: Any, **model_parts: Any) -> None:
    """`unet`: the trained, unwrapped U-Net with its adapter; `cfg`: the run's LDMConfig; `model_parts`: vae,
    text_encoder, noise_scheduler for the merged model. Main process only."""
    save_lora(out / "lora", unet, cfg.lora, base_model=cfg.model.pretrained)
    log.info("saved the LoRA adapter to %s", out / "lora")
    if not cfg.lora.export_merged:
        return
    merged = copy.deepcopy(unet)  # the live U-Net keeps its adapter
    if merged.dtype != torch.float32:  # a base kept in fp16/bf16 for training is exported in fp32
        merged.to(torch.float32)
    merged.fuse_lora()
    merged.unload_lora()
    export_model(out / "model", unet=merged, text_cfg=cfg.text_encoder, **model_parts)
    log.info("saved the base with the adapter fused in to %s", out / "model")
