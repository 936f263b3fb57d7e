"""Small pieces both training loops share: the run's start, EMA swaps, non-finite-step counting, skipped-image tallies."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from torch.distributed.tensor import DTensor

from ldm.config import save_config, to_dict
from ldm.errors import UserError
from ldm.parallel.collective import gather_json
from ldm.parallel.setup import require_supported_setup
from ldm.training.logs import setup_logging
from ldm.training.tracking import flat_config

log = logging.getLogger(__name__)


def start_run(config: Any, train: Any, *, sharding: bool = False) -> Accelerator:
    """The Accelerator for a training script, logging, and (main process) the resolved config and the trackers.

    `sharding`: whether the script runs under FSDP2 and DeepSpeed ZeRO-1/2 (otherwise both stop it at once).
    `train` is the config's `train` section: output_dir, cpu, mixed_precision, report_to. TensorBoard logs go to
    `output_dir/logs`, the config to `output_dir/config.yaml`.
    """
    out = Path(train.output_dir)
    accelerator = Accelerator(
        cpu=train.cpu,
        mixed_precision=train.mixed_precision,
        log_with=None if train.report_to == "none" else train.report_to,
        project_dir=str(out),
    )
    setup_logging(accelerator.is_main_process, accelerator.process_index)
    require_supported_setup(accelerator, sharding=sharding)
    if accelerator.is_main_process:
        save_config(config, out / "config.yaml")
        accelerator.init_trackers("logs", config=flat_config(to_dict(config)))
    return accelerator


@contextlib.contextmanager
def ema_weights(ema: EMAModel | None, parameters: Iterable[torch.nn.Parameter]) -> Iterator[None]:
    """Temporarily swap the EMA weights into `parameters` (a no-op without EMA)."""
    if ema is None:
        yield
        return
    parameters = list(parameters)
    # The training weights wait on the CPU (like EMAModel.store); an FSDP shard stays where it is, as a DTensor.
    saved = [p.detach().clone() if isinstance(p, DTensor) else p.detach().cpu().clone() for p in parameters]
    ema.copy_to(parameters)
    try:
        yield
    finally:
        with torch.no_grad():
            for param, kept in zip(parameters, saved):
                param.copy_(kept)


class NonFiniteSteps:
    """Counts optimizer steps skipped for a non-finite loss or gradient; `train.max_nonfinite_steps` in a row stop."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row, self.total = limit, 0, 0

    def skip(self, step: int, optimizers: Iterable[torch.optim.Optimizer]) -> bool:
        """Drop this step's gradients; True when the limit is reached (the caller saves, then raises `error`)."""
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.in_a_row += 1
        self.total += 1
        log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", step, self.in_a_row)
        return self.in_a_row >= self.limit

    def ok(self) -> None:
        self.in_a_row = 0

    def error(self, step: int, saved: Path, earlier: Path | None) -> UserError:
        """`saved`: the checkpoint of the state at the stop; `earlier`: the newest one before it, if any."""
        advice = (f"--resume {earlier}" if earlier is not None else "start again without --resume")
        return UserError(
            f"{self.in_a_row} non-finite steps in a row at step {step}: training stopped, this state is saved in "
            f"{saved}; if the weights diverged, lower optim.lr (or use train.mixed_precision=no) and {advice}"
        )


def apply_optimizer_settings(
    optimizer: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LambdaLR, lr: float, **settings: Any
) -> list[str]:
    """After a resume, make the config's lr (and betas, weight_decay, eps, ...) win over the checkpoint's.

    A checkpoint restores the optimizer's param groups and the schedule's base learning rates; a user who resumes
    with a new `optim.lr` means the new one. Returns the names of the settings that changed, for the log: with a
    change, the resumed run is no longer the uninterrupted one.
    """
    changed = []
    for key, value in settings.items():
        for group in optimizer.param_groups:
            old = group.get(key)
            if old is not None and (tuple(old) if isinstance(old, (list, tuple)) else old) != value:
                group[key] = value
                if key not in changed:
                    changed.append(key)
    if any(base != lr for base in schedule.base_lrs):
        # LambdaLR: lr = base_lr * lambda(step); diffusers' schedules (constant, cosine, linear) are all LambdaLRs
        schedule.base_lrs = [lr] * len(schedule.base_lrs)
        for group, factor in zip(optimizer.param_groups, schedule.lr_lambdas):
            group["initial_lr"] = lr
            group["lr"] = lr * factor(schedule.last_epoch)
        schedule._last_lr = [group["lr"] for group in optimizer.param_groups]
        changed.insert(0, "lr")
    return changed


class SkippedImages:
    """Names of undecodable images: each named once in the log, all counted across processes at the end."""

    def __init__(self, names: Iterable[str] = ()):
        self.names: set[str] = set(names)

    def note(self, names: Iterable[str]) -> None:
        names = set(names)
        for name in sorted(names - self.names):
            log.warning("skipped unreadable image %s", name)
        self.names |= names

    def gather(self, accelerator: Accelerator) -> list[str]:
        """The union over all processes (a collective)."""
        return sorted(set().union(*gather_json(accelerator, sorted(self.names))))

    @staticmethod
    def summary(names: list[str], shown: int = 20) -> str:
        listed = f": {', '.join(names[:shown])}{' ...' if len(names) > shown else ''}" if names else ""
        return f"{len(names)} unreadable images skipped in total{listed}"
