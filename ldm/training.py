"""Small pieces both training loops share: agreement across processes, clipping, EMA swaps, skipped-image tallies."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from diffusers.training_utils import EMAModel

from ldm.errors import UserError

log = logging.getLogger(__name__)


def require_replicated_weights(accelerator: Accelerator) -> None:
    """Stop at once under FSDP/DeepSpeed: EMA, replica checks and checkpoints here assume every process holds whole
    weights and optimizer state (DDP or one process). Better now than at the first checkpoint, hours in."""
    kind = accelerator.distributed_type
    if kind in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise UserError(f"{kind.value} is not supported by ldm's training scripts yet: launch with plain "
                        "multi-GPU DDP (configs/accelerate/multi-gpu.yaml); sharded training is planned")


def all_processes(accelerator: Accelerator, flag: bool) -> bool:
    """True when `flag` is true on every process (a collective: every process must call it)."""
    votes = accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "sum")
    return int(votes) == accelerator.num_processes


def clip_gradients(
    accelerator: Accelerator, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], max_norm: float
) -> torch.Tensor:
    """Unscale (fp16) this optimizer's gradients and clip them; returns the norm before clipping (0: no clipping)."""
    accelerator.unscale_gradients(optimizer)
    return torch.nn.utils.clip_grad_norm_(params, max_norm or math.inf)


@contextlib.contextmanager
def ema_weights(ema: EMAModel | None, parameters: Iterable[torch.nn.Parameter]) -> Iterator[None]:
    """Temporarily swap the EMA weights into `parameters` (a no-op without EMA)."""
    if ema is None:
        yield
        return
    parameters = list(parameters)
    ema.store(parameters)
    ema.copy_to(parameters)
    try:
        yield
    finally:
        ema.restore(parameters)


class SkippedImages:
    """Names of undecodable images: each named once in the log, all counted across processes at the end."""

    def __init__(self, names: Iterable[str] = ()):
        self.names: set[str] = set(names)

    def note(self, names: Iterable[str]) -> None:
        names = set(names)
        for name in sorted(names - self.names):
            log.warning("skipped unreadable image %s", name)
        self.names |= names

    def gather(self) -> list[str]:
        """The union over all processes (a collective)."""
        return sorted(set().union(*gather_object([sorted(self.names)])))

    @staticmethod
    def summary(names: list[str], shown: int = 20) -> str:
        listed = f": {', '.join(names[:shown])}{' ...' if len(names) > shown else ''}" if names else ""
        return f"{len(names)} unreadable images skipped in total{listed}"
