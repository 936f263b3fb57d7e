"""Collectives that keep processes in step: one failure raised everywhere, a flag all agree on, replica checks.

The rule every multi-process step of `ldm` follows: a process that fails must not leave the others waiting in the
next collective (they would hang until a gloo/NCCL timeout and die with a traceback that names nothing). So work
that can fail runs through `run_on_all` (or `raise_if_any_failed`): every process reports its outcome, every process
learns every outcome, and if any failed, all of them raise:

- this process's own error when it has one (an `OSError` worded for the user by the caller as a `UserError`);
- else another process's `UserError` as it is (its message is complete), its `OSError` worded by the caller and
  ending in `(on process <rank>)`, or a `RuntimeError` naming the process for anything else (a bug).

Outcomes travel as JSON in a uint8 tensor through `accelerator.gather`, which works on every backend (gloo, NCCL)
and pickles nothing.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from accelerate import Accelerator

from ldm.errors import UserError
from ldm.files import os_reason

T = TypeVar("T")

_USER, _OS, _BUG = "user", "os", "bug"


def attempt(work: Callable[[], T]) -> tuple[T | None, Exception | None]:
    """Run `work`, returning (result, None) or (None, its exception) instead of raising, so that a failure can be
    shared with the other processes before anyone raises."""
    try:
        return work(), None
    except Exception as error:  # noqa: BLE001 - every failure must reach the other processes, then it is re-raised
        return None, error


def run_on_all(
    accelerator: Accelerator,
    work: Callable[[], T] | None,
    *,
    what: str,
    describe_os_error: Callable[[str], str] | None = None,
    on_failure: Callable[[], None] | None = None,
) -> list[T | None]:
    """Run `work` on this process (None: nothing to do here), then `raise_if_any_failed`; every process's result,
    by rank, when none failed. A collective: call it on every process."""
    result, error = attempt(work) if work is not None else (None, None)
    return raise_if_any_failed(
        accelerator, error, result, what=what, describe_os_error=describe_os_error, on_failure=on_failure
    )


def raise_if_any_failed(
    accelerator: Accelerator,
    error: Exception | None,
    result: Any = None,
    *,
    what: str,
    describe_os_error: Callable[[str], str] | None = None,
    on_failure: Callable[[], None] | None = None,
) -> list[Any]:
    """Share this process's outcome (`error`, or `result`) with all processes; raise on all of them if any failed.

    `what` names the operation in the message of an unexpected error elsewhere ("<what> failed on process <rank>:
    ..."). `describe_os_error(reason)` turns an `OSError`'s reason (e.g. "No space left on device (path)") into the
    `UserError` message; without it, an `OSError` counts as unexpected. `on_failure` runs on every process before
    it raises (e.g. removing a temporary directory). Also a barrier.

    Returns every process's `result`, by rank. Results must be JSON values; with several processes they come back
    decoded from JSON (tuples as lists).
    """
    failure = None if error is None else _failure(error, describe_os_error)
    if accelerator.num_processes == 1:
        outcomes = [[result, failure]]
    else:
        outcomes = gather_json(accelerator, [result, failure])
    failures = [(rank, f) for rank, (_, f) in enumerate(outcomes) if f is not None]
    if not failures:
        return [r for r, _ in outcomes]
    if on_failure is not None:
        on_failure()
    if error is not None:
        if isinstance(error, OSError) and describe_os_error is not None:
            raise UserError(describe_os_error(os_reason(error))) from error
        raise error
    rank, (kind, text) = failures[0]
    if kind == _USER:
        raise UserError(text)
    if kind == _OS:
        assert describe_os_error is not None
        raise UserError(describe_os_error(f"{text} (on process {rank})"))
    raise RuntimeError(f"{what} failed on process {rank}: {text}")


def _failure(error: Exception, describe_os_error: Callable[[str], str] | None) -> list[str]:
    if isinstance(error, UserError):
        return [_USER, str(error)]
    if isinstance(error, OSError) and describe_os_error is not None:
        return [_OS, os_reason(error)]
    return [_BUG, f"{type(error).__name__}: {error}"]


def gather_json(accelerator: Accelerator, value: Any) -> list[Any]:
    """Every process's JSON-able `value`, by rank (a collective). Two gathers: the lengths, then the padded bytes."""
    data = json.dumps(value, allow_nan=False).encode("utf-8")
    lengths = accelerator.gather(torch.tensor([len(data)], device=accelerator.device)).cpu()  # (processes,)
    row = torch.zeros(1, int(lengths.max()), dtype=torch.uint8)
    row[0, : len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    rows = accelerator.gather(row.to(accelerator.device)).cpu()  # (processes, longest)
    return [json.loads(r[:n].numpy().tobytes()) for r, n in zip(rows, lengths.tolist())]


def gather_rows(accelerator: Accelerator, rows: torch.Tensor) -> torch.Tensor:
    """Every process's rows (n_p, D), a different n_p on each, concatenated by rank on every process (a collective).
    Two gathers: the counts, then the rows padded to the longest; float rows travel as they are, without pickling."""
    if accelerator.num_processes == 1:
        return rows
    counts = accelerator.gather(torch.tensor([len(rows)], device=accelerator.device)).cpu()  # (processes,)
    longest = int(counts.max())
    if longest == 0:
        return rows
    padded = torch.zeros(longest, *rows.shape[1:], dtype=rows.dtype)
    padded[: len(rows)] = rows
    gathered = accelerator.gather(padded.to(accelerator.device)).cpu()  # (processes * longest, D)
    return torch.cat([gathered[p * longest: p * longest + int(n)] for p, n in enumerate(counts.tolist())])


def all_processes(accelerator: Accelerator, flag: bool) -> bool:
    """True when `flag` is true on every process (a collective: every process must call it)."""
    votes = accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "sum")
    return int(votes) == accelerator.num_processes


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
    """Like `accelerator.main_process_first()`, but a failure in the main process's turn reaches every process.

    With accelerate's version the main process exits on a bad path before its barrier and the others die in it
    with a gloo/NCCL traceback. Here the others wait for the main process's outcome instead of a barrier, and on a
    failure raise too (the same one-line `UserError` for a `UserError`) instead of running the block.
    """
    if accelerator.num_processes == 1:
        yield
        return
    what = "the main process's first turn"
    if accelerator.is_main_process:
        try:
            yield
        except Exception as error:
            raise_if_any_failed(accelerator, error, what=what)  # re-raises `error`, once the others know of it
        else:
            raise_if_any_failed(accelerator, None, what=what)
        return
    raise_if_any_failed(accelerator, None, what=what)  # waits for the main process's turn, like the barrier would
    yield
