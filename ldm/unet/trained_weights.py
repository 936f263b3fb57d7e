"""What a stage-2 run trains, as one object that the training loop (train/train_ldm.py) asks instead of branching on
`lora.enabled`: the whole U-Net (`TrainedWeights`), or LoRA adapters on the U-Net and, with
`lora.text_encoder_targets`, on the text encoder too (`LoRAWeights`).

The loop asks, in this order:

    trained = trained_weights(cfg, accelerator, backend)    # LoRA's settings checked before any latent is cached
    trained.check_text_encoder(text_encoder)                # its adapter targets, as soon as it is loaded
    params = trained.parameters_to_train(unet, text_encoder, dtype)  # LoRA adds its adapters (draws from the RNG)
    unet, optimizer = trained.prepare(unet, optimizer)      # accelerate's wrappers; a trained text encoder's too
    ema = trained.make_ema(decay)
    ckpt = trained.checkpoint(optimizer, ema)               # models, optimizers and emas under their names on disk
    trained.resume_check(path), trained.state()             # LoRA: its settings, stored in and checked against
    with backend.micro_step(unet, ...), trained.text_sync(last=last):   # every micro-batch
        text = trained.condition(captions, encode_text, empty)  # a Conditioning (SDXL: with the pooled embedding)
    backend.step(trained.modules, ...); ema.step(trained.ema_source())  # every step
    with trained.ema_weights(ema): ...                      # the samples
    trained.export(out, ema, vae=vae, noise_scheduler=noise_scheduler)  # the end

The whole-U-Net case lives here beside LoRA's because the two are one interface, read side by side.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel
from torch import nn

from ldm.lora.export import export_lora, require_lora_backend
from ldm.lora.resume import STATE_KEY, check_lora_settings, lora_settings
from ldm.lora.train import (
    TEXT_KEY, AdapterWeights, add_lora, add_text_encoder_lora, check_targets, check_unet_targets_early, tower_model,
)
from ldm.models.spec import ModelSpec
from ldm.text.conditioning import Conditioning
from ldm.training.run import ema_weights
from ldm.unet.export import export_model
from ldm.unet.objective import drop_captions
from ldm.unet.uncond_words import UncondWords

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ldm.parallel.backend import Backend
    from ldm.unet.config import LDMConfig

# the lines these objects log are the training script's, under its name (as before they moved here)
log = logging.getLogger("train_ldm")

Encode = Callable[[Sequence[str]], Conditioning]  # captions -> context (B, 77, D) [and SDXL's pooled (B, P)]


def trained_weights(cfg: LDMConfig, accelerator: Accelerator, backend: Backend,
                    base: ModelSpec | None) -> TrainedWeights:
    """What this run trains. With `lora.enabled`, the backend and the U-Net targets (on `base`, model.pretrained's
    spec) are checked here: call it before any latent is cached, so that a misconfigured run stops at once."""
    if not cfg.lora.enabled:
        return TrainedWeights(cfg, accelerator, backend)
    require_lora_backend(backend)
    check_unet_targets_early(base.unet_config, cfg.lora.targets)
    return LoRAWeights(cfg, accelerator, backend)


class TrainedWeights:
    """The whole U-Net trains: every parameter, clipped as one module, its EMA over the backend's view of the weights,
    checkpointed as "unet" and exported as a diffusers model directory. The text encoder stays frozen."""

    def __init__(self, cfg: LDMConfig, accelerator: Accelerator, backend: Backend):
        self.cfg, self.accelerator, self.backend = cfg, accelerator, backend
        self.uncond = UncondWords(0.0)  # train.uncond_words: the loop sets it once the captions are known

    def check_text_encoder(self, text_encoder: nn.Module) -> None:
        """Refuse a bad text-encoder target before the latent cache is built (none here)."""

    def parameters_to_train(self, unet: nn.Module, text_encoder: nn.Module,
                            base_dtype: torch.dtype) -> list[nn.Parameter]:
        """The parameters to train, once the U-Net is built or loaded (`base_dtype`: the run's weight dtype). LoRA
        adds its adapters here, drawing from torch's RNG: call it at the same point of every run (resume-safe)."""
        self.text_encoder = text_encoder  # the unwrapped module: tokenizer, sampling, export
        return list(unet.parameters())

    def prepare(self, unet: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        """`accelerator.prepare` the U-Net and optimizer; sets `modules`, what is clipped (one gradient norm) and
        checked for identical replicas at checkpoints."""
        unet, optimizer = self.accelerator.prepare(unet, optimizer)
        self.unet, self.raw = unet, self.accelerator.unwrap_model(unet)
        self.modules: nn.Module = unet
        return unet, optimizer

    def make_ema(self, decay: float) -> EMAModel:
        """Made after `prepare`, so under FSDP it holds (and updates) each process's shard only; it follows the fp32
        master weights under DeepSpeed with mixed precision."""
        return EMAModel(self.ema_source(), decay=decay, model_cls=UNet2DConditionModel, model_config=self.raw.config)

    def ema_source(self) -> list[torch.Tensor]:
        """The tensors `ema.step` follows."""
        return self.backend.ema_source(self.unet)

    def ema_weights(self, ema: EMAModel | None) -> contextlib.AbstractContextManager:
        """The EMA's weights swapped in for a while (for the samples); a no-op without EMA."""
        return ema_weights(ema, self.raw.parameters())

    def checkpoint(self, optimizer: Any, ema: EMAModel | None) -> dict[str, dict[str, Any]]:
        """`save_checkpoint`'s and `load_checkpoint`'s models, optimizers and emas (without the schedulers)."""
        return dict(models={"unet": self.unet}, optimizers={"unet": optimizer},
                    emas={"unet": ema} if ema is not None else {})

    def resume_check(self, checkpoint: Path) -> Callable[[dict[str, Any]], None] | None:
        """`load_checkpoint`'s `check_state` for resuming from `checkpoint` (None: nothing to check)."""
        return None

    def state(self) -> dict[str, Any]:
        """What a checkpoint's `state` holds besides the step and the batches consumed."""
        return {}

    def text_sync(self, *, last: bool) -> contextlib.AbstractContextManager:
        """The text encoder's part of `backend.micro_step` (a frozen one has no gradients to synchronise)."""
        return contextlib.nullcontext()

    def condition(self, captions: list[str], encode_text: Encode, empty: Conditioning) -> Conditioning:
        """Captions -> their conditioning (context (B, 77, D), SDXL's pooled (B, P)), `train.caption_dropout` of them
        the unconditional branch's; `encode_text` and `empty` (batch 1): the frozen encoder's `encode_conditioning`
        and `empty_conditioning`, or the text cache's lookups of them."""
        with torch.no_grad():  # `self.uncond`: some captions become unseen words first (train.uncond_words)
            return drop_captions(encode_text(self.uncond(captions)), empty, self.cfg.train.caption_dropout)

    def export(self, out: Path, ema: EMAModel | None, *, vae: nn.Module, noise_scheduler: Any) -> None:
        """`out/model`: a complete diffusers model directory with the EMA weights (whole fp32 tensors, gathered when
        sharded). Call on every process."""
        weights = self.backend.whole_weights(self.unet, ema)  # collective; complete on the main process
        if self.accelerator.is_main_process:
            final = UNet2DConditionModel.from_config(self.raw.config)
            final.load_state_dict(weights)
            export_model(out / "model", unet=final, vae=vae, text_encoder=self.text_encoder,
                         noise_scheduler=noise_scheduler, text_cfg=self.cfg.text_encoder)
            log.info("saved the model to %s", out / "model")


class LoRAWeights(TrainedWeights):
    """Only adapters train: a frozen base (in the run's dtype) with fp32 adapters on the U-Net and, with
    `lora.text_encoder_targets`, on the text encoder, both sets in one optimizer, clipped together and in one EMA.
    Checkpoints hold the adapters ("lora", "lora_text_encoder") and the settings they depend on; the frozen base comes
    from `model.pretrained` again. Under one process or DDP only (`require_lora_backend`)."""

    def __init__(self, cfg: LDMConfig, accelerator: Accelerator, backend: Backend):
        super().__init__(cfg, accelerator, backend)
        self.train_text = bool(cfg.lora.text_encoder_targets)  # adapters on the text encoder too

    def check_text_encoder(self, text_encoder: nn.Module) -> None:
        if self.train_text:
            for tower in text_encoder.towers:  # SDXL: both towers get adapters on the targets
                check_targets(tower_model(tower), self.cfg.lora.text_encoder_targets, "the text encoder", TEXT_KEY)

    def parameters_to_train(self, unet: nn.Module, text_encoder: nn.Module,
                            base_dtype: torch.dtype) -> list[nn.Parameter]:
        self.text_encoder = text_encoder
        self.params = add_lora(unet, self.cfg.lora, base_dtype=base_dtype)
        if self.train_text:
            self.params += add_text_encoder_lora(text_encoder, self.cfg.lora, base_dtype=base_dtype)
        return self.params

    def prepare(self, unet: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        unet, optimizer = super().prepare(unet, optimizer)
        # a trained text encoder is prepared too: under DDP its adapters' gradients are all-reduced by its own wrapper
        # (called as text(ids)); `text_encoder` stays the unwrapped module
        self.text = self.text_encoder
        if self.train_text:
            self.text = self.accelerator.prepare(self.text_encoder)
            # clipped together (one gradient norm over both adapter sets) and checked together at checkpoints
            self.modules = nn.ModuleList([unet, self.text])
        return unet, optimizer

    def make_ema(self, decay: float) -> EMAModel:
        return EMAModel(self.params, decay=decay)

    def ema_source(self) -> list[torch.Tensor]:
        return self.params

    def ema_weights(self, ema: EMAModel | None) -> contextlib.AbstractContextManager:
        return ema_weights(ema, self.params)

    def checkpoint(self, optimizer: Any, ema: EMAModel | None) -> dict[str, dict[str, Any]]:
        adapters = {"lora": AdapterWeights(self.raw)}
        if self.train_text:
            adapters["lora_text_encoder"] = AdapterWeights(self.text_encoder)
        return dict(models=adapters, optimizers={"lora": optimizer}, emas={"lora": ema} if ema is not None else {})

    def resume_check(self, checkpoint: Path) -> Callable[[dict[str, Any]], None]:
        # a checkpoint trained with another base, rank, alpha, dropout or targets is refused before loading
        return lambda saved: check_lora_settings(checkpoint, saved, self.cfg)

    def state(self) -> dict[str, Any]:
        return {STATE_KEY: lora_settings(self.cfg)}

    def text_sync(self, *, last: bool) -> contextlib.AbstractContextManager:
        return self.backend.micro_step(self.text, last=last) if self.train_text else contextlib.nullcontext()

    def condition(self, captions: list[str], encode_text: Encode, empty: Conditioning) -> Conditioning:
        if not self.train_text:
            return super().condition(captions, encode_text, empty)
        # through the adapted encoder, with gradients; the empty prompt too (row B), since inference's unconditional
        # branch is the adapted encoder's (unless an SDXL model's is zeros: `force_zeros_for_empty_prompt`)
        out = self.text(self.text_encoder.tokenize([*self.uncond(captions), ""]))
        context, pooled = out if isinstance(out, tuple) else (out, None)  # (B + 1, 77, D); SDXL's pooled (B + 1, P)
        text = Conditioning(context[:-1], None if pooled is None else pooled[:-1])
        empty = Conditioning(context[-1:], None if pooled is None else pooled[-1:])
        if getattr(self.text_encoder, "force_zeros_for_empty_prompt", False):
            empty = empty.zeros_like()
        return drop_captions(text, empty, self.cfg.train.caption_dropout)

    def export(self, out: Path, ema: EMAModel | None, *, vae: nn.Module, noise_scheduler: Any) -> None:
        """`out/lora`: the adapter (its EMA weights) in diffusers' and kohya's formats, and with `lora.export_merged`
        `out/model`. Written by the main process; the others return at once."""
        if self.accelerator.is_main_process:
            self.text_encoder.eval()
            with self.ema_weights(ema):
                export_lora(out, self.raw, self.cfg, vae=vae, text_encoder=self.text_encoder,
                            noise_scheduler=noise_scheduler)
