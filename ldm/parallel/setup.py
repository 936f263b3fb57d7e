"""Which backend runs, from the accelerator: one process or DDP, FSDP2 or DeepSpeed ZeRO-1/2, and the setups a
training script refuses at start (rather than at its first checkpoint)."""

from __future__ import annotations

from accelerate import Accelerator
from accelerate.utils import DistributedType

from ldm.errors import UserError
from ldm.parallel.backend import Backend
from ldm.parallel.fsdp import FsdpBackend, is_fsdp
from ldm.parallel.zero import ZeroBackend, is_zero


def backend_for(accelerator: Accelerator) -> Backend:
    """The backend of this accelerator's setup (checked by `require_supported_setup` at the run's start)."""
    if is_fsdp(accelerator):
        return FsdpBackend(accelerator)
    if is_zero(accelerator):
        return ZeroBackend(accelerator)
    return Backend(accelerator)


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
