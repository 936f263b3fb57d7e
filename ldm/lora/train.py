"""LoRA adapters on a diffusers U-Net for training: injected with peft (as diffusers' own LoRA scripts do), the base
frozen (in the run's weight dtype), the adapters in fp32, and a module view of the adapters for checkpoints.

Why fp32 adapters: under fp16 mixed precision the gradient scaler refuses fp16 gradients ("Attempting to unscale FP16
gradients", diffusers #2780, #6086, #10910), and fp16 master weights lose small updates (black images); so the
frozen base may be fp16/bf16 to save memory, but every trainable parameter is fp32, and autocast casts per op.
"""

from __future__ import annotations

import logging

import torch
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from torch import nn

from ldm.errors import UserError
from ldm.lora.config import ATTENTION_TARGETS, FEED_FORWARD_TARGETS, LoRAConfig

log = logging.getLogger(__name__)

ADAPTABLE = (nn.Linear, nn.Conv2d)  # what peft's LoRA wraps among a U-Net's layers


def check_targets(model: nn.Module, targets: list[str], what: str = "the U-Net") -> None:
    """Every target must name at least one module of `model` (peft's rule: the name, or a name ending in
    ".<target>"), and only layers LoRA can wrap; otherwise one line naming the target."""
    modules = dict(model.named_modules())
    for target in targets:
        matched = [m for name, m in modules.items() if name == target or name.endswith(f".{target}")]
        if not matched:
            raise UserError(f"config key 'lora.targets': '{target}' matches no module of {what}; use module names "
                            f"such as {', '.join(ATTENTION_TARGETS + FEED_FORWARD_TARGETS)}")
        wrong = next((m for m in matched if not isinstance(m, ADAPTABLE)), None)
        if wrong is not None:
            raise UserError(f"config key 'lora.targets': '{target}' names a {type(wrong).__name__}, not a linear or "
                            f"convolution layer; name the layers inside it (e.g. to_out.0 rather than to_out)")


def add_lora(unet: nn.Module, cfg: LoRAConfig, base_dtype: torch.dtype = torch.float32) -> list[nn.Parameter]:
    """Freeze `unet` (cast to `base_dtype`), add the adapters of `cfg`, return the trainable (fp32) parameters.

    lora_A starts Gaussian (std 1/rank) and lora_B at zero, as in diffusers' scripts: the adapted U-Net starts out
    identical to the base. Draws from torch's RNG, so call it at the same point of a run (resume-safe: a resumed run
    overwrites the adapters with the checkpoint's).
    """
    check_targets(unet, cfg.targets)
    unet.requires_grad_(False)
    if unet.dtype != base_dtype:  # the frozen base in the run's weight dtype (memory), trained parts below in fp32
        unet.to(dtype=base_dtype)
    unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                init_lora_weights="gaussian", target_modules=list(cfg.targets)))
    cast_training_params(unet, dtype=torch.float32)
    params = [p for p in unet.parameters() if p.requires_grad]
    total = sum(p.numel() for p in unet.parameters())
    trainable = sum(p.numel() for p in params)
    log.info("LoRA rank %d, alpha %g on %s: %s trainable parameters of %s (%.2f%%)", cfg.rank, cfg.alpha,
             ", ".join(cfg.targets), f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return params


class AdapterWeights(nn.Module):
    """The trainable parameters of `model`, under their names in `model`, as a module of their own.

    The parameters are `model`'s own objects (not copies), so `state_dict()` reads the adapters and `load_state_dict`
    writes them back into `model`: a checkpoint of this module holds the adapters only (the frozen base comes from
    `model.pretrained` again), and resumes through the ordinary checkpoint code.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            *path, leaf = name.split(".")
            owner: nn.Module = self
            for part in path:
                if part not in owner._modules:
                    owner.add_module(part, nn.Module())
                owner = owner._modules[part]
            owner.register_parameter(leaf, param)
