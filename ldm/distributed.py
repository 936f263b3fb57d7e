"""Checks that hold a multi-process run to its promise of identical model replicas."""

from __future__ import annotations

import torch
from accelerate import Accelerator


def replicas_identical(accelerator: Accelerator, module: torch.nn.Module) -> bool:
    """True when every process holds bit-identical parameters (a collective: every process must call it).

    Compares per-tensor checksums (sum and sum of squares in float64), cheap enough to run at every checkpoint.
    """
    params = [p.detach().double() for p in module.parameters()]
    checksums = torch.stack([torch.stack([p.sum(), p.pow(2).sum()]) for p in params]).flatten()
    gathered = accelerator.gather(checksums.to(accelerator.device)[None])  # (processes, 2 * tensors)
    return bool((gathered == gathered[0]).all())
