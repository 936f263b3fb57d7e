"""The output of a LoRA run (train/train_ldm.py with `lora.enabled`): `lora/` with the adapter in both formats
(ldm/lora/save.py) and, with `lora.export_merged`, `model/`: the base U-Net (and text encoder, when it has an adapter
too) with the adapter fused into its weights, as a complete diffusers model directory."""

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
    text_encoder (with its adapter under `lora.text_encoder_targets`), noise_scheduler for the merged model. Main
    process only."""
    adapted_text = model_parts["text_encoder"] if cfg.lora.text_encoder_targets else None
    save_lora(out / "lora", unet, cfg.lora, base_model=cfg.model.pretrained, text_encoder=adapted_text)
    log.info("saved the LoRA adapter to %s", out / "lora")
    if not cfg.lora.export_merged:
        return
    merged = copy.deepcopy(unet)  # the live U-Net keeps its adapter
    if merged.dtype != torch.float32:  # a base kept in fp16/bf16 for training is exported in fp32
        merged.to(torch.float32)
    merged.fuse_lora()
    merged.unload_lora()
    if adapted_text is not None:
        model_parts = dict(model_parts, text_encoder=merged_text_encoder(adapted_text))
    export_model(out / "model", unet=merged, text_cfg=cfg.text_encoder, **model_parts)
    log.info("saved the base with the adapter fused in to %s", out / "model")


def merged_text_encoder(text_encoder: nn.Module) -> nn.Module:
    """A frozen fp32 copy of a `CLIPTextEncoder` (or of each of an `SDXLTextEncoder`'s towers) with its peft adapter
    fused into the weights and the peft layers removed (what diffusers' `fuse_lora` + `unload_lora` do to a
    pipeline's text encoders)."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(text_encoder)
    merged.to(torch.float32)
    for tower in merged.towers:
        for module in tower.model.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge()
        recurse_remove_peft_layers(tower.model)  # in place: each peft layer replaced by its (merged) base layer
        if hasattr(tower.model, "peft_config"):
            del tower.model.peft_config
    merged.requires_grad_(False)
    return merged.eval()
