"""Progress for long loops: tqdm's bar on a terminal, compact lines at a bounded rate anywhere else.

A bar redraws on every update; written to a file or a cluster job's log that is one redraw per step (a 2000-step
VAE run wrote 160 KB of them). Off a terminal, `progress_bar()` prints instead a plain line such as

    vae: 1200/2000 (60%) rec=0.0412, 9.87 it/s, elapsed 2:01, ETA 1:21

every `interval` seconds (`LDM_PROGRESS_INTERVAL`, default 60) and at each tenth of the total (unless the last line
is under interval / 10 seconds old), plus one when the loop ends: at most about 10 + duration / interval lines
whatever the number of steps, and a loop of a few seconds prints its final line only.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import IO, Any

from tqdm import tqdm

DEFAULT_INTERVAL_S = 60.0


def progress_bar(
    iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", initial: int = 0,
    disable: bool = False, unit: str = "it", leave: bool = True, file: IO[str] | None = None,
) -> ProgressCounter:
    """A progress counter with tqdm's interface (`update`, `set_postfix`, `close`, iteration, `with`)."""
    file = sys.stderr if file is None else file
    if _is_terminal(file):
        return tqdm(iterable, total=total, desc=desc, initial=initial, disable=disable, unit=unit, leave=leave,
                    file=file)
    interval = _interval_from_env()
    return ProgressLines(iterable, total=total, desc=desc, initial=initial, disable=disable, unit=unit, file=file,
                         interval=interval)


class ProgressLines:
    """tqdm's counting interface, printing one compact line per `interval` seconds or tenth of `total`."""

    def __init__(
        self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", initial: int = 0,
        disable: bool = False, unit: str = "it", file: IO[str] | None = None, interval: float = DEFAULT_INTERVAL_S,
        clock=time.monotonic,
    ):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.desc, self.unit = total, initial, desc, unit
        self.disable, self.file, self.interval, self.clock = disable, file or sys.stderr, interval, clock
        self.postfix = ""
        self._start_n, self._start = initial, clock()
        self._last_time, self._last_tenth = self._start, self._tenth(initial)
        self._printed_n: int | None = None
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now, tenth = self.clock(), self._tenth(self.n)
        since = now - self._last_time
        if since >= self.interval or (tenth > self._last_tenth and since >= self.interval / 10):
            self._print(now)
            self._last_time, self._last_tenth = now, tenth

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def close(self) -> None:
        if not self._closed and self.n not in (self._start_n, self._printed_n):
            self._print(self.clock())  # the final count, unless the last update printed it
        self._closed = True

    def line(self, now: float) -> str:
        elapsed = now - self._start
        done = self.n - self._start_n
        rate = done / elapsed if elapsed > 0 else 0.0
        count = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"
        parts = [f"{self.desc}: {count}" if self.desc else count]
        if self.postfix:
            parts[0] += f" {self.postfix}"
        parts.append(f"{rate:.3g} {self.unit}/s" if rate >= 1 or rate == 0 else f"{1 / rate:.3g} s/{self.unit}")
        parts.append(f"elapsed {_clock_time(elapsed)}")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {_clock_time((self.total - self.n) / rate)}")
        return ", ".join(parts)

    def _print(self, now: float) -> None:
        if not self.disable:
            print(self.line(now), file=self.file, flush=True)
            self._printed_n = self.n

    def _tenth(self, n: int) -> int:
        return int(10 * n / self.total) if self.total else 0

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


ProgressCounter = tqdm | ProgressLines  # what progress_bar() returns


def _interval_from_env() -> float:
    """LDM_PROGRESS_INTERVAL in seconds; an unreadable or negative value is ignored (with a warning), not fatal."""
    text = os.environ.get("LDM_PROGRESS_INTERVAL")
    try:
        value = float(text) if text is not None else DEFAULT_INTERVAL_S
    except ValueError:
        value = -1.0
    if value >= 0:
        return value
    warnings.warn(f"LDM_PROGRESS_INTERVAL={text!r} is not a number of seconds >= 0: using {DEFAULT_INTERVAL_S:g}")
    return DEFAULT_INTERVAL_S


def _is_terminal(file: IO[str]) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):
        return False


def _clock_time(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
