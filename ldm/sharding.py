"""Whole weights from sharded training state, and back: what checkpoints, EMA and export need under FSDP2 or
DeepSpeed ZeRO-1/2 (the DeepSpeed side is in ldm/zero.py).

Under accelerate's FSDP (version 2, `torch.distributed.fsdp.fully_shard`) every parameter, gradient, optimizer moment
and EMA shadow tensor is a DTensor holding one process's shard. ldm keeps one on-disk format for every setup: whole
tensors, written by the main process, so a checkpoint or model saved by an FSDP or DeepSpeed run loads in a DDP or
single-process run and the other way round. Gathering costs one model's worth of CPU memory on the main process (plus
the optimizer moments for checkpoints); that is the price of that portability, and fine up to SD-1.5-sized U-Nets.

Every function here is collective when the state is sharded: all processes must call it, in the same order.
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
from torch.distributed.tensor import DTensor, distribute_tensor

from ldm import zero
from ldm.errors import UserError

_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on the CPU of rank 0 only
_SCATTER = StateDictOptions(full_state_dict=True)  # every process passes the whole tensors; each keeps its shard


def is_sharded(accelerator: Accelerator) -> bool:
    """True under FSDP or DeepSpeed: optimizer state (and, under FSDP, weights and EMA) is split over the processes."""
    return is_fsdp(accelerator) or zero.is_zero(accelerator)


def is_fsdp(accelerator: Accelerator) -> bool:
    """True under FSDP: model, optimizer and EMA state are DTensor shards."""
    return accelerator.distributed_type == DistributedType.FSDP


def require_supported_setup(accelerator: Accelerator, *, sharding: bool) -> None:
    """Stop at start in a setup a training script cannot run correctly, rather than at the first checkpoint.

    `sharding`: whether the script supports FSDP2 and DeepSpeed ZeRO-1/2 (train_ldm.py does; train_vae.py, whose two
    models and discriminator are small, runs under DDP only).
    """
    kind = accelerator.distributed_type
    if kind in (DistributedType.FSDP, DistributedType.DEEPSPEED) and not sharding:
        raise UserError(f"{kind.value} is not supported by this script (its models fit on every GPU): launch with "
                        "plain multi-GPU DDP (configs/accelerate/multi-gpu.yaml)")
    if kind == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise UserError("FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate config "
                        "(configs/accelerate/fsdp.yaml)")
    if kind == DistributedType.MEGATRON_LM:
        raise UserError(f"{kind.value} is not supported by ldm's training scripts: use FSDP "
                        "(configs/accelerate/fsdp.yaml) to shard a model, or DDP (configs/accelerate/multi-gpu.yaml)")


def full_model_state(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole `state_dict()` (fp32 master weights under DeepSpeed): on the main process when sharded (CPU
    tensors; {} elsewhere), else as is."""
    if zero.is_zero(accelerator):
        return zero.master_weights(model)
    if not is_fsdp(accelerator):
        return accelerator.unwrap_model(model, keep_torch_compile=False).state_dict()
    return get_model_state_dict(model, options=_GATHER)


def load_full_model_state(accelerator: Accelerator, model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load whole tensors (every process passes them) into a model, sharded or not."""
    if zero.is_zero(accelerator):
        zero.load_master_weights(model, state)
    elif not is_fsdp(accelerator):
        accelerator.unwrap_model(model, keep_torch_compile=False).load_state_dict(state, strict=True)
    else:
        set_model_state_dict(model, dict(state), options=_SCATTER)


def full_optimizer_state(accelerator: Accelerator, model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """The optimizer's state with whole tensors, keyed by parameter name when sharded (main process; {} elsewhere).

    Without sharding it is the optimizer's own `state_dict()` (keyed by parameter index).
    """
    if zero.is_zero(accelerator):
        return zero.full_optimizer_state(model, optimizer)
    if not is_fsdp(accelerator):
        return optimizer.state_dict()
    return get_optimizer_state_dict(model, _unwrap_optimizer(optimizer), options=_GATHER)


def load_full_optimizer_state(accelerator: Accelerator, model: torch.nn.Module, optimizer: Any, state: dict) -> None:
    """Load a state from `full_optimizer_state` (either keying) into the optimizer of `model`, sharded or not."""
    keyed_by_name = any(isinstance(k, str) for k in state.get("state", {}))
    if zero.is_zero(accelerator):
        zero.load_optimizer_state(model, optimizer, state)
        return
    if not is_fsdp(accelerator) and not keyed_by_name:
        optimizer.load_state_dict(state)
        return
    if is_fsdp(accelerator) and not keyed_by_name and state.get("state"):
        raise UserError("this checkpoint's optimizer state is keyed by parameter index (saved without FSDP) and "
                        "cannot be matched to sharded parameters: resume it without FSDP, or start fresh")
    set_optimizer_state_dict(model, _unwrap_optimizer(optimizer), state, options=_SCATTER)


def full_tensors(accelerator: Accelerator, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Whole copies of (possibly sharded) tensors on the main process's CPU; [] on the others under FSDP."""
    if not is_fsdp(accelerator):
        return tensors
    out = []
    for t in tensors:  # one at a time, so only one whole tensor is ever gathered on each device
        whole = t.full_tensor() if isinstance(t, DTensor) else t
        if accelerator.is_main_process:
            out.append(whole.detach().cpu())
    return out


def shard_like(whole: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """`whole` laid out like `live`: this process's shard of it if `live` is a DTensor, else `whole` itself."""
    whole = whole.to(device=live.device, dtype=live.dtype)  # a DTensor's device is its local shard's
    return distribute_tensor(whole, live.device_mesh, live.placements) if isinstance(live, DTensor) else whole


def _unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
