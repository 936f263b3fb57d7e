"""The one place a training loop and the checkpoints ask how the model is distributed: `Backend`, here for one process
and DDP (every process holds the whole model and optimizer), and the base that the sharded backends override
(ldm/parallel/fsdp.py for FSDP2, ldm/parallel/zero.py for DeepSpeed ZeRO-1/2). `ldm.parallel.setup.backend_for`
picks one from the accelerator (the training loop does so once; checkpointing asks again, as it keeps no state).

ldm keeps one on-disk format for every backend: whole tensors, written by the main process, so a checkpoint or model
saved under one backend loads under any other. A backend gives whole state out (`model_state`, `optimizer_state`,
`full_tensors`) and takes it back (`load_model_state`, `load_optimizer_state`, `shard_like`); the sharded ones
gather and scatter to do so, which costs one model's worth of CPU memory on the main process (plus the optimizer
moments for checkpoints): the price of that portability, and fine up to SD-1.5-sized U-Nets.

Under a sharded backend every method that touches state is collective: all processes must call it, in the same
order. Here (one process, DDP) none of them communicates.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
from torch.distributed.tensor import DTensor

if TYPE_CHECKING:
    from diffusers.training_utils import EMAModel

SCATTER = StateDictOptions(full_state_dict=True)  # every process passes the whole tensors; each keeps its shard


class Backend:
    """One process or DDP: whole weights, gradients and optimizer state on every process.

    Call `configure` once, before `accelerator.prepare`, to give it the loop's settings (the checkpoint functions
    need none of them).
    """

    sharded = False  # some state (optimizer state; under FSDP weights and EMA too) is split over the processes
    replicated = True  # every process holds the whole trained weights, so the replica check applies
    fp32_masters = False  # the weights are trained as fp32 master copies apart from the module (DeepSpeed)

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator

    # ---- the loop's settings and its log line

    def configure(self, *, micro_batch: int, grad_accum: int, max_grad_norm: float, mixed_precision: str) -> None:
        """The training loop's batch per process, accumulation, clipping (0: none) and `train.mixed_precision`."""
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.max_grad_norm, self.mixed_precision = max_grad_norm, mixed_precision

    def describe(self, what: str) -> str | None:
        """A log line saying how `what` (e.g. "the U-Net") is distributed; None where nothing is split."""
        return None

    # ---- training steps

    def micro_step(self, model: torch.nn.Module, *, last: bool) -> contextlib.AbstractContextManager:
        """Wraps one micro-batch's forward and backward: gradients are synchronised on the `last` one only."""
        return contextlib.nullcontext() if last else self.accelerator.no_sync(model)

    def backward(self, model: torch.nn.Module, loss: torch.Tensor) -> None:
        """Accumulate the gradients of one micro-batch's loss (mean over `grad_accum` micro-batches)."""
        self.accelerator.backward(loss / self.grad_accum)

    def step(self, model: torch.nn.Module, optimizer: Any, finite: bool) -> tuple[bool, torch.Tensor | None]:
        """Clip and apply the accumulated gradients; `finite`: every process's losses were finite.

        Returns whether the update was applied and the gradient norm before clipping (None when not computed). A
        non-finite gradient norm skips the update, except with fp16, whose gradient scaler skips overflowing steps
        itself (and lowers its scale).
        """
        if not finite:
            return False, None
        grad_norm = clip_gradients(self.accelerator, optimizer, list(model.parameters()), self.max_grad_norm)
        if self.mixed_precision != "fp16" and not torch.isfinite(grad_norm):
            return False, grad_norm
        optimizer.step()
        return True, grad_norm

    def ema_source(self, model: torch.nn.Module) -> list[torch.Tensor]:
        """The tensors the EMA follows: the module's parameters (this process's shards under FSDP)."""
        return list(self.accelerator.unwrap_model(model).parameters())

    # ---- whole state, for checkpoints and the exported model

    def model_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The model's whole `state_dict()`: on the main process when sharded (CPU tensors; {} elsewhere)."""
        return self._unwrap(model).state_dict()

    def load_model_state(self, model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        """Load whole tensors (every process passes them) into the model."""
        self._unwrap(model).load_state_dict(state, strict=True)

    def optimizer_state(self, model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
        """The optimizer's state with whole tensors: here its own `state_dict()` (keyed by parameter index); keyed
        by parameter name when sharded (on the main process; {} elsewhere)."""
        return optimizer.state_dict()

    def load_optimizer_state(self, model: torch.nn.Module, optimizer: Any, state: dict) -> None:
        """Load a state from `optimizer_state` under any backend (keyed by index or by name) into the optimizer."""
        if not keyed_by_name(state):
            optimizer.load_state_dict(state)
            return
        set_optimizer_state_dict(model, self._torch_optimizer(optimizer), state, options=SCATTER)

    def full_tensors(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Whole copies of (possibly sharded) tensors on the main process's CPU; here the tensors themselves."""
        return tensors

    def shard_like(self, whole: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        """`whole` laid out like `live`: on its device, in its dtype (and this process's shard under FSDP)."""
        return whole.to(device=live.device, dtype=live.dtype)

    def whole_weights(self, model: torch.nn.Module, ema: EMAModel | None) -> dict[str, torch.Tensor]:
        """The weights to export: the model's whole state with the EMA's weights (if any) in place of its
        parameters; complete on the main process (when sharded the others get a partial dict)."""
        weights = self.model_state(model)
        if ema is not None:
            names = [name for name, _ in self._unwrap(model).named_parameters()]  # the EMA's order
            for name, shadow in zip(names, ema.shadow_params):
                whole = self.full_tensors([shadow])  # one at a time: one whole extra tensor at most
                if whole:
                    weights[name] = whole[0]
        return weights

    def _unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.unwrap_model(model, keep_torch_compile=False)

    @staticmethod
    def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
        return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one


def keyed_by_name(state: dict) -> bool:
    """True for an optimizer state saved under a sharded backend (keyed by parameter name, not index)."""
    return any(isinstance(k, str) for k in state.get("state", {}))


def clip_gradients(
    accelerator: Accelerator, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], max_norm: float
) -> torch.Tensor:
    """Unscale (fp16) this optimizer's gradients and clip them; returns the norm before clipping (0: no clipping)."""
    accelerator.unscale_gradients(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm or math.inf)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm  # FSDP2: a replicated DTensor
