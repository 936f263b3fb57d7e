"""Validation on fixed held-out samples, the one mechanism of both training stages.

A validation number is only useful if it changes when, and only when, the weights change. So every random draw of
an evaluation (a posterior sample, a timestep, the noise) is a function of the held-out item alone: the item with
dataset index `i` draws from its own generator, `sample_generator(i)`, in an order its stage documents
(`ldm/unet/val_loss.py`, `ldm/vae/validation.py`). Two evaluations of the same weights give the same numbers, on any
number of processes:

- `process_batches`: the batches are cut once from the held-out items, the same for every world size (each item is
  computed once, in the same batch), and dealt round-robin. Every process makes the same number of forward passes,
  since under FSDP each one gathers weights from all processes: a process short of a batch repeats one and drops its
  results (pad and drop).
- `Sums`: the per-item values, summed in float64 by metric and band and counted; one `accelerator.reduce` at the end.
- `ValidationLog`: the numbers' destinations, `val_loss.jsonl` beside the checkpoints, the trackers and the log.

`val_loss.jsonl` holds one JSON object per line, one line per validation, steps strictly increasing:

    {"step": 200,
     "raw": {"loss": 0.152, "count": 256, "bands": {"0-250": {"loss": 0.31, "count": 64}, "250-500": ...}},
     "ema": {"loss": 0.149, ...}}

"raw" holds the training weights' numbers, "ema" (only with EMA on) the EMA weights'; "metrics" (stage 2 with
`sample.metrics`, every `sample.every` steps) the sample quality of the EMA weights, `ldm.quality.measure.measure`'s
numbers ({"fid": 41.2, "kid": {"mean": ..., "std": ...}, "clip_score": ..., "cmmd": ..., "cmmd_unbiased": ...}) with
"images" and "reference", the two sets' sizes. A row holds what was measured at its step. The losses are the stage's:
stage 2's "loss" is the training objective (min-SNR-weighted under `noise.min_snr_gamma`, with the plain "mse"
beside it then), overall and per band of training timesteps; stage 1's are "rec_loss", "lpips_loss", "kl_loss" (the
training loss terms) and "psnr", "ssim", ... . "count" is how many values were averaged (stage 2: held-out items x
bands). The main process appends each row durably (`ldm.files.append_synced`). A run that starts (or resumes) at
step S first drops the rows of steps after S, and a line torn by a kill: it computes those steps again, so after a
kill and a resume the file holds every validated step once.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from ldm.files import append_synced, atomic_write_bytes
from ldm.parallel.collective import run_on_all
from ldm.training.worsening import headline

log = logging.getLogger(__name__)

VAL_LOG_NAME = "val_loss.jsonl"
# Item seeds sit far above the small seeds training uses (train.seed + rank), so no item replays a training stream.
_SEED_BASE = 1 << 40

Results = dict[str, dict[str, Any]]  # {"raw": metrics, ["ema": metrics]} as `Sums.reduce` returns them, ["metrics"]


def sample_generator(index: int) -> torch.Generator:
    """The CPU generator of held-out item `index`'s draws (its index in the full dataset): the same in every
    evaluation, on every process, whatever the number of processes."""
    return torch.Generator().manual_seed(_SEED_BASE + int(index))


def timestep_bands(num_train_timesteps: int, num_bands: int) -> list[tuple[int, int]]:
    """`num_bands` consecutive ranges [lo, hi) covering the training timesteps 0..T-1, as equal as integers allow:
    (1000, 4) -> (0, 250), (250, 500), (500, 750), (750, 1000); (10, 3) -> (0, 3), (3, 6), (6, 10)."""
    if not 1 <= num_bands <= num_train_timesteps:
        raise ValueError(f"need 1 <= num_bands <= num_train_timesteps, got {num_bands} bands of {num_train_timesteps}")
    edges = [k * num_train_timesteps // num_bands for k in range(num_bands + 1)]
    return list(zip(edges[:-1], edges[1:]))


def band_label(band: tuple[int, int]) -> str:
    """(250, 500) -> "250-500": timesteps 250 to 499."""
    return f"{band[0]}-{band[1]}"


def process_batches(
    count: int, batch_size: int, rank: int, world_size: int, groups: Sequence[int] | None = None
) -> list[tuple[list[int], bool]]:
    """Process `rank`'s validation batches of items 0..count-1, each with whether to keep its results.

    The batches are cut once, in item order (with `groups`, e.g. each item's aspect-ratio bucket, only items of one
    group share a batch), and batch j goes to process j % world_size: each item is computed in the same batch
    whatever the number of processes. Every process gets ceil(batches / world_size) of them; one with fewer repeats
    batch 0 with keep=False (its results are dropped).
    """
    order = list(range(count)) if groups is None else sorted(range(count), key=lambda i: groups[i])  # stable
    key = (lambda i: 0) if groups is None else (lambda i: groups[i])
    batches: list[list[int]] = []
    for _, members in itertools.groupby(order, key=key):
        members = list(members)
        batches += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
    mine = [(batch, True) for batch in batches[rank::world_size]]
    rounds = -(-len(batches) // world_size)
    return mine + [(batches[0], False) for _ in range(rounds - len(mine))]


class Sums:
    """Per-item values summed (float64) and counted by metric and band; `reduce` adds them up across processes."""

    def __init__(self, metrics: Sequence[str], bands: Sequence[str] = (), device: torch.device | str = "cpu"):
        self.metrics, self.bands = list(metrics), list(bands)
        # (bands or 1, metrics, 2): [sum, count]
        self.table = torch.zeros(max(len(self.bands), 1), len(self.metrics), 2, dtype=torch.float64, device=device)

    def add(self, values: Mapping[str, torch.Tensor], band: int = 0) -> None:
        """`values[metric]`: per-item values, e.g. (B,); every element counts once (latent statistics pass all)."""
        for j, metric in enumerate(self.metrics):
            value = values[metric].detach().to(self.table.device, torch.float64)
            self.table[band, j, 0] += value.sum()
            self.table[band, j, 1] += value.numel()

    def reduce(self, accelerator: Accelerator) -> dict[str, Any]:
        """{metric: mean, "count": n} over every process's values (a collective), with the bands: "bands": {label:
        {metric: mean, "count": n}}. "count" is the first metric's; a metric without values is None."""
        table = accelerator.reduce(self.table, reduction="sum").cpu()
        result = _means(table.sum(0), self.metrics)
        if self.bands:
            result["bands"] = {label: _means(table[k], self.metrics) for k, label in enumerate(self.bands)}
        return result


def _means(table: torch.Tensor, metrics: list[str]) -> dict[str, Any]:
    """(metrics, [sum, count]) -> {metric: mean, "count": the first metric's count}."""
    means: dict[str, Any] = {m: float(table[j, 0] / table[j, 1]) if table[j, 1] > 0 else None
                             for j, m in enumerate(metrics)}
    means["count"] = int(table[0, 1])
    return means


class ValidationLog:
    """Where a run's validation numbers go: `val_loss.jsonl` in `directory` (the checkpoints' root), the trackers and
    the log. Made on every process once the run knows its start step (0, or the resumed checkpoint's): the main
    process then drops the file's rows after that step, and any torn line (a collective)."""

    def __init__(self, directory: str | Path, accelerator: Accelerator, start_step: int):
        self.path = Path(directory) / VAL_LOG_NAME
        self.accelerator = accelerator
        self.last_step = -1  # the newest row's step (main process)
        self.rows: list[dict[str, Any]] = []  # the rows kept (main process): earlier evaluations, for `Worsening`

        def trim() -> None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.rows = trim_rows(self.path, start_step)
            self.last_step = self.rows[-1]["step"] if self.rows else -1

        self._on_all(trim if accelerator.is_main_process else None)

    def write(self, step: int, results: Results) -> None:
        """One step's `results` ({["raw": metrics, "ema": metrics], ["metrics": sample quality]}): a row of the file,
        the trackers and one log line per set of weights. Trackers get "val/<metric>" (and "val/<metric>_t<band>") for
        the weights the run exports (EMA when on), "val_raw/..." for the training weights beside them, and
        "metrics/<name>" for the sample quality (KID: its mean). Call on every process."""
        exported = "ema" if "ema" in results else "raw"
        tracked: dict[str, float] = {}
        for weights, metrics in results.items():
            if weights == "metrics":
                values = headline(metrics)
                tracked.update({f"metrics/{k}": v for k, v in values.items()})
                log.info("step %d sample quality of %d images: %s", step, metrics["images"],
                         ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
                continue
            values = flat_metrics(metrics)
            tracked.update({f"{'val' if weights == exported else 'val_raw'}/{k}": v for k, v in values.items()})
            log.info("step %d validation, %s weights: %s", step, weights,
                     ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
        self.accelerator.log(tracked, step=step)

        def append() -> None:
            if step <= self.last_step:  # e.g. a final validation of a step validated before the resume
                log.warning("%s already holds step %d: not written again", self.path, step)
                return
            append_synced(self.path, (json.dumps({"step": step, **results}, allow_nan=False) + "\n").encode("utf-8"))
            self.last_step = step

        self._on_all(append if self.accelerator.is_main_process else None)

    def _on_all(self, work: Any) -> None:
        # a failure (a full disk) stops every process with one line, instead of leaving the others in a collective
        run_on_all(self.accelerator, work, what="validation log",
                   describe_os_error=lambda reason: f"could not write {self.path}: {reason}: free disk space or fix "
                                                    "its permissions")


def trim_rows(path: Path, start_step: int) -> list[dict[str, Any]]:
    """Keep the rows of `path` up to `start_step` (steps increasing), dropping later ones and torn or unreadable lines,
    rewritten atomically if anything changes; the rows kept, parsed."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    kept: list[bytes] = []
    rows: list[dict[str, Any]] = []
    last, later, torn = -1, 0, 0
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (ValueError, KeyError, TypeError):
            torn += 1
            continue
        if last < step <= start_step:
            kept.append(line)
            rows.append(row)
            last = step
        else:
            later += 1
    text = b"".join(line + b"\n" for line in kept)
    if text != data:
        atomic_write_bytes(path, text)
        log.warning("%s: kept %d rows up to step %d, dropped %d later ones (computed again by this run) and %d torn "
                    "lines", path, len(kept), start_step, later, torn)
    return rows


def flat_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """{"loss": 0.1, "bands": {"0-250": {"loss": 0.3}}} -> {"loss": 0.1, "loss_t0-250": 0.3}, counts left out."""
    flat = {k: v for k, v in metrics.items() if k not in ("count", "bands") and v is not None}
    for label, band in metrics.get("bands", {}).items():
        flat.update({f"{k}_t{label}": v for k, v in band.items() if k != "count" and v is not None})
    return flat
