"""Watching sample-quality numbers for a run that gets worse (`sample.worse_patience`, `sample.stop_when_worse`).

Per metric (FID, KID's mean, CMMD: lower is better; CLIP score: higher is better), an evaluation is *worse* when its
value is strictly worse than the best value of all evaluations before it; a new best, or a tie with the best, ends
the streak. Once a metric's streak of consecutive worse evaluations reaches `patience`, every further evaluation that
extends it gives one warning line naming the metric, its best (value and step) and the streak's values and steps;
`stop` then says the run should stop (when asked to).

A resumed run rebuilds the streaks from `val_loss.jsonl` (`replay`): the file holds every evaluation up to the
resumed step and none after it (`ldm.training.validation.ValidationLog`), so nothing needs to live in the checkpoint,
and a run resumed from step S counts exactly as the uninterrupted run did at S.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ldm.quality.metrics import HEADLINE, HIGHER_IS_BETTER


def headline(numbers: Mapping[str, Any]) -> dict[str, float]:
    """`measure`'s numbers -> one float per metric: {"fid": ., "kid": KID's mean, "clip_score": ., "cmmd": .}."""
    out = {}
    for name in HEADLINE.values():
        if name in numbers:
            value = numbers[name]
            out[name] = float(value["mean"] if isinstance(value, Mapping) else value)
    return out


class Worsening:
    """The streaks of worse evaluations, per metric; `update` after each evaluation."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best: dict[str, tuple[float, int]] = {}  # metric -> (value, step)
        self.streak: dict[str, list[tuple[int, float]]] = {}  # metric -> [(step, value)] worse than the best, in order

    def update(self, step: int, numbers: Mapping[str, Any]) -> list[str]:
        """Count one evaluation's numbers (`measure`'s); the warning lines of the metrics whose streak is now at
        least `patience` long."""
        warnings = []
        for name, value in headline(numbers).items():
            best = self.best.get(name)
            higher = name in HIGHER_IS_BETTER
            if best is None or not (value < best[0] if higher else value > best[0]):  # a new best, or a tie
                if best is None or value != best[0]:
                    self.best[name] = (value, step)
                self.streak[name] = []
                continue
            self.streak[name].append((step, value))
            if len(self.streak[name]) >= self.patience:
                values = ", ".join(f"{v:.4g} (step {s})" for s, v in self.streak[name])
                warnings.append(f"sample quality is getting worse: {name} has been worse than its best "
                                f"{best[0]:.4g} (step {best[1]}, {'higher' if higher else 'lower'} is better) for "
                                f"{len(self.streak[name])} evaluations in a row: {values}")
        return warnings

    @property
    def stop(self) -> bool:
        """True when some metric's streak has reached `patience`."""
        return any(len(streak) >= self.patience for streak in self.streak.values())

    def replay(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Count the evaluations of `val_loss.jsonl` rows (steps increasing; rows without "metrics" are skipped),
        silently."""
        for row in rows:
            if "metrics" in row:
                self.update(int(row["step"]), row["metrics"])
