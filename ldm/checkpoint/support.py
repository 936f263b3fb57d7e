"""What a checkpoint can hold: the distributed setups it supports, and the class names it records and checks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from accelerate.optimizer import AcceleratedOptimizer
from accelerate.scheduler import AcceleratedScheduler

from ldm.errors import UserError
from ldm.parallel.setup import backend_for, require_supported_setup

if TYPE_CHECKING:
    from accelerate import Accelerator


def check_supported(accelerator: Accelerator, optimizers: Mapping[str, Any], models: Mapping[str, Any]) -> None:
    # FSDP1, ZeRO-3 and Megatron keep state in their own layouts; refuse rather than save one process's shard.
    require_supported_setup(accelerator, sharding=True)
    if backend_for(accelerator).sharded:
        for name in optimizers:
            if name not in models:
                raise UserError(f"under FSDP or DeepSpeed, optimizer {name!r} needs the model it optimizes under the "
                                f"same name in models= (it has: {', '.join(models) or 'none'})")


def class_name(obj: Any) -> str:
    # accelerate's wrappers forward state_dict to the real object; record and compare the real class.
    if isinstance(obj, AcceleratedOptimizer):
        obj = obj.optimizer
        if hasattr(obj, "bit16_groups"):  # DeepSpeed's ZeRO optimizer, around the torch optimizer ldm built
            obj = obj.optimizer
    elif isinstance(obj, AcceleratedScheduler):
        obj = obj.scheduler
    return type(obj).__name__
