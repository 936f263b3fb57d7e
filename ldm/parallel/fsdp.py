"""The FSDP2 backend: whole state out of DTensor shards, and back.

Under accelerate's FSDP (version 2, `torch.distributed.fsdp.fully_shard`) every parameter, gradient, optimizer moment
and EMA shadow tensor is a DTensor holding one process's shard. Whole tensors are gathered onto the main process's
CPU with `torch.distributed.checkpoint`'s state-dict API (optimizer state then keyed by parameter name), and
scattered back from whole tensors every process passes. Every method here that touches state is collective.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

from ldm.errors import UserError
from ldm.parallel.backend import SCATTER, Backend, keyed_by_name

GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on the CPU of rank 0 only


def is_fsdp(accelerator: Accelerator) -> bool:
    """True under FSDP: model, optimizer and EMA state are DTensor shards."""
    return accelerator.distributed_type == DistributedType.FSDP


def reshard_after_inference(model: torch.nn.Module) -> None:
    """Put every FSDP2 unit of `model` back into its shards after forward passes without a backward (validation,
    samples); a no-op for a model without FSDP. FSDP2 leaves some units whole after a forward, expecting the backward
    to need them at once: the root, and the last unit run (U-Net: its `conv_norm_out`). With no backward coming they
    stay whole: `parameters()` then gives plain tensors instead of the DTensor shards (an EMA swap fails on them), and
    the next training forward reuses those whole tensors even though the shards changed in between (EMA weights
    swapped in and out)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()  # not recursive; a no-op for a unit already sharded


class FsdpBackend(Backend):
    """FSDP2: weights, gradients, optimizer moments and the EMA are sharded over the processes."""

    sharded = True
    replicated = False  # each process holds its shard only: there are no replicas to compare

    def describe(self, what: str) -> str | None:
        return f"FSDP2: {what}, its optimizer state and EMA are sharded over {self.accelerator.num_processes} processes"

    def model_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return get_model_state_dict(model, options=GATHER)

    def load_model_state(self, model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        set_model_state_dict(model, dict(state), options=SCATTER)

    def optimizer_state(self, model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
        return get_optimizer_state_dict(model, self._torch_optimizer(optimizer), options=GATHER)

    def load_optimizer_state(self, model: torch.nn.Module, optimizer: Any, state: dict) -> None:
        if not keyed_by_name(state) and state.get("state"):
            raise UserError("this checkpoint's optimizer state is keyed by parameter index (saved without FSDP) and "
                            "cannot be matched to sharded parameters: resume it without FSDP, or start fresh")
        set_optimizer_state_dict(model, self._torch_optimizer(optimizer), state, options=SCATTER)

    def full_tensors(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Whole copies of (possibly sharded) tensors on the main process's CPU; [] on the others."""
        out = []
        for t in tensors:  # one at a time, so only one whole tensor is ever gathered on each device
            whole = t.full_tensor() if isinstance(t, DTensor) else t
            if self.accelerator.is_main_process:
                out.append(whole.detach().cpu())
        return out

    def shard_like(self, whole: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        whole = super().shard_like(whole, live)  # a DTensor's device is its local shard's
        return distribute_tensor(whole, live.device_mesh, live.placements) if isinstance(live, DTensor) else whole
