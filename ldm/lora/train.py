"""LoRA adapters for training, on a diffusers U-Net and (with `lora.text_encoder_targets`) a transformers CLIP text
encoder: injected with peft (as diffusers' own LoRA scripts do), the base frozen (in the run's weight dtype), the
adapters in fp32, and a module view of the adapters for checkpoints.

Why fp32 adapters: under fp16 mixed precision the gradient scaler refuses fp16 gradients ("Attempting to unscale FP16
gradients", diffusers #2780, #6086, #10910), and fp16 master weights lose small updates (black images); so the
frozen base may be fp16/bf16 to save memory, but every trainable parameter is fp32, and autocast casts per op.
"""

from __future__ import annotations

import logging

import torch
from diffusers import UNet2DConditionModel
from diffusers.training_utils import cast_training_params
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from ldm.errors import UserError
from ldm.lora.config import ATTENTION_TARGETS, CLIP_MLP_TARGETS, CLIP_TEXT_TARGETS, FEED_FORWARD_TARGETS, LoRAConfig

log = logging.getLogger(__name__)

ADAPTABLE = (nn.Linear, nn.Conv2d)  # what peft's LoRA wraps among a U-Net's layers
UNET_KEY, TEXT_KEY = "lora.targets", "lora.text_encoder_targets"


def check_targets(model: nn.Module, targets: list[str], what: str = "the U-Net", key: str = UNET_KEY) -> None:
    """Every target must name at least one module of `model` (peft's rule: the name, or a name ending in
    ".<target>"), and only layers LoRA can wrap; otherwise one line naming the target."""
    examples = ATTENTION_TARGETS + FEED_FORWARD_TARGETS if key == UNET_KEY else CLIP_TEXT_TARGETS + CLIP_MLP_TARGETS
    modules = dict(model.named_modules())
    for target in targets:
        matched = [m for name, m in modules.items() if name == target or name.endswith(f".{target}")]
        if not matched:
            raise UserError(f"config key '{key}': '{target}' matches no module of {what}; use module names "
                            f"such as {', '.join(examples)}")
        wrong = next((m for m in matched if not isinstance(m, ADAPTABLE)), None)
        if wrong is not None:
            raise UserError(f"config key '{key}': '{target}' names a {type(wrong).__name__}, not a linear or "
                            f"convolution layer; name the layers inside it (e.g. to_out.0 rather than to_out)")


def check_unet_targets_early(unet_config: dict, targets: list[str]) -> None:
    """`check_targets` on the base U-Net's modules built from its config alone (`ModelSpec.unet_config`: no weights,
    on the meta device), so that a misspelt target stops the run before the latent cache is built."""
    from accelerate import init_empty_weights

    if not unet_config:  # a file without a U-Net: loading it says so
        return
    with init_empty_weights(include_buffers=False):
        check_targets(UNet2DConditionModel.from_config(unet_config), targets)


def lora_config(cfg: LoRAConfig, targets: list[str]) -> LoraConfig:
    """peft's config for `targets`, with the run's rank, alpha and dropout (the same for U-Net and text encoder).

    lora_A starts Gaussian (std 1/rank) and lora_B at zero, as in diffusers' scripts: the adapted model starts out
    identical to the base."""
    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, init_lora_weights="gaussian",
                      target_modules=list(targets))


def add_lora(unet: nn.Module, cfg: LoRAConfig, base_dtype: torch.dtype = torch.float32) -> list[nn.Parameter]:
    """Freeze `unet` (cast to `base_dtype`), add the adapters of `cfg`, return the trainable (fp32) parameters.

    Draws from torch's RNG, so call it at the same point of a run (resume-safe: a resumed run overwrites the
    adapters with the checkpoint's).
    """
    check_targets(unet, cfg.targets)
    return _adapt(unet, unet, cfg, cfg.targets, base_dtype, "the U-Net",
                  lambda: unet.add_adapter(lora_config(cfg, cfg.targets)))


def add_text_encoder_lora(text_encoder: nn.Module, cfg: LoRAConfig,
                          base_dtype: torch.dtype = torch.float32) -> list[nn.Parameter]:
    """`add_lora` for a `CLIPTextEncoder` (ldm/text/encoder.py), or each of an `SDXLTextEncoder`'s two towers, on
    `cfg.text_encoder_targets`: the adapters go into the transformers `CLIPTextModel` (SDXL's second:
    `CLIPTextModelWithProjection`) of each tower (`.model`), with peft's `inject_adapter_in_model` (what
    transformers' `add_adapter` calls; that one insists on a newer peft). Call it right after `add_lora` (same RNG
    remarks)."""
    towers = text_encoder.towers
    params = []
    for i, tower in enumerate(towers):
        model = tower_model(tower)
        what = "the text encoder" if len(towers) == 1 else f"text encoder {i + 1} of SDXL's two"
        check_targets(model, cfg.text_encoder_targets, what, TEXT_KEY)
        params += _adapt(tower, model, cfg, cfg.text_encoder_targets, base_dtype, what,
                         lambda model=model: inject_adapter_in_model(lora_config(cfg, cfg.text_encoder_targets), model))
    text_encoder.train()  # SDXL's encoder trains when its towers do
    return params


def tower_model(tower: nn.Module) -> nn.Module:
    """A text tower's transformers CLIP model, which LoRA adapts (open_clip towers are refused)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    model = getattr(tower, "model", None)
    if not isinstance(model, (CLIPTextModel, CLIPTextModelWithProjection)):  # the config refuses open_clip
        raise UserError(f"config key '{TEXT_KEY}': text-encoder LoRA needs a transformers CLIP text encoder, not a "
                        f"{type(tower).__name__}")
    return model


def _adapt(owner: nn.Module, model: nn.Module, cfg: LoRAConfig, targets: list[str], base_dtype: torch.dtype,
           what: str, inject) -> list[nn.Parameter]:  # type: ignore[no-untyped-def]
    owner.requires_grad_(False)
    if next(owner.parameters()).dtype != base_dtype:  # the frozen base in the run's dtype (memory); adapters fp32
        owner.to(dtype=base_dtype)
    inject()
    cast_training_params(model, dtype=torch.float32)
    # from_pretrained leaves a model in eval mode, where the adapters' dropout would do nothing
    owner.train()
    params = [p for p in owner.parameters() if p.requires_grad]
    total = sum(p.numel() for p in owner.parameters())
    trainable = sum(p.numel() for p in params)
    log.info("LoRA rank %d, alpha %g on %s%s: %s trainable parameters of %s (%.2f%%)", cfg.rank, cfg.alpha,
             ", ".join(targets), "" if what == "the U-Net" else f" of {what}", f"{trainable:,}", f"{total:,}",
             100 * trainable / total)
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
