"""Multi-process helpers: the replica check of a DDP run, and a main-process-first block that fails cleanly."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from ldm.errors import UserError


def replicas_identical(accelerator: Accelerator, module: torch.nn.Module) -> bool:
    """True when every process holds bit-identical parameters (a collective: every process must call it).

    Compares per-tensor checksums (sum and sum of squares in float64), cheap enough to run at every checkpoint.
    """
    params = [p.detach().double() for p in module.parameters()]
    checksums = torch.stack([torch.stack([p.sum(), p.pow(2).sum()]) for p in params]).flatten()
    gathered = accelerator.gather(checksums.to(accelerator.device)[None])  # (processes, 2 * tensors)
    return bool((gathered == gathered[0]).all())


@contextlib.contextmanager
def main_process_first(accelerator: Accelerator) -> Iterator[None]:
    """Like `accelerator.main_process_first()`, but a `UserError` in the main process's turn reaches every process.

    With accelerate's version the main process exits on a bad path before its barrier and the others die in it
    with a gloo/NCCL traceback. Here the others learn the message and raise the same one-line `UserError` instead of
    running the block. (Other exceptions still propagate as they are.)
    """
    if accelerator.num_processes == 1:
        yield
        return
    message = [None]
    if accelerator.is_main_process:
        try:
            yield
        except UserError as error:
            message[0] = str(error)
            raise
        finally:
            broadcast_object_list(message, from_process=0)
        return
    broadcast_object_list(message, from_process=0)  # waits for the main process's turn, like the barrier would
    if message[0] is not None:
        raise UserError(message[0])
    yield
