"""Progress off a terminal: compact lines at a bounded rate; on a terminal, tqdm's bar."""

from __future__ import annotations

import io

import pytest
from tqdm import tqdm

from ldm.progress import DEFAULT_INTERVAL_S, ProgressLines, progress_bar


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_off_a_terminal_lines_come_at_tenths_and_intervals_not_every_step():
    out, clock = io.StringIO(), FakeClock()
    bar = ProgressLines(total=2000, desc="vae", file=out, interval=30.0, clock=clock)
    for step in range(2000):
        clock.t += 0.125  # 8 it/s: 250 s in all
        bar.update(1)
        if step == 1199:
            bar.set_postfix(rec="0.0412", refresh=False)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10, lines  # a line per tenth (25 s apart, inside the interval), not 2000 redraws
    assert lines[-1].startswith("vae: 2000/2000 (100%) rec=0.0412, 8 it/s, elapsed 4:10")
    assert "ETA" not in lines[-1]
    assert lines[0] == "vae: 200/2000 (10%), 8 it/s, elapsed 0:25, ETA 3:45"
    assert all("\r" not in line for line in lines)


def test_interval_alone_bounds_the_rate_when_tenths_are_far_apart():
    out, clock = io.StringIO(), FakeClock()
    bar = ProgressLines(total=10_000, desc="unet", initial=5000, file=out, interval=30.0, clock=clock)
    for _ in range(100):  # 100 steps of 1 s: no tenth is crossed, 3 intervals pass
        clock.t += 1.0
        bar.update(1)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0] == "unet: 5030/10000 (50%), 1 it/s, elapsed 0:30, ETA 1:22:50"  # the rate counts this run only
    bar.close()
    assert out.getvalue().splitlines()[-1].startswith("unet: 5100/10000")


def test_slow_loops_read_in_seconds_per_item_and_iteration_closes():
    out, clock = io.StringIO(), FakeClock()

    def items():
        for i in range(3):
            clock.t += 40.0
            yield i

    assert list(ProgressLines(items(), total=3, desc="eval", unit="prompt", file=out, clock=clock)) == [0, 1, 2]
    lines = out.getvalue().splitlines()
    assert lines[-1] == "eval: 3/3 (100%), 40 s/prompt, elapsed 2:00"
    assert len(lines) == 3  # each item crosses a tenth; the close adds no duplicate


def test_a_loop_of_a_few_seconds_prints_only_its_final_line():
    out, clock = io.StringIO(), FakeClock()
    bar = ProgressLines(total=50, desc="denoising", unit="step", file=out, interval=60.0, clock=clock)
    for _ in range(50):
        clock.t += 0.0625  # 3.1 s in all: each tenth comes 0.3 s after the last, under interval / 10
        bar.update(1)
    bar.close()
    assert out.getvalue().splitlines() == ["denoising: 50/50 (100%), 16 step/s, elapsed 0:03"]


def test_disabled_prints_nothing_and_a_terminal_gets_tqdm():
    out = io.StringIO()
    bar = progress_bar(total=5, disable=True, file=out)
    bar.update(5)
    bar.close()
    assert out.getvalue() == ""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(progress_bar(total=5, file=Terminal()), tqdm)
    assert isinstance(progress_bar(total=5, file=io.StringIO()), ProgressLines)


def test_an_unreadable_interval_falls_back_to_the_default_with_a_warning(monkeypatch):
    monkeypatch.setenv("LDM_PROGRESS_INTERVAL", "soon")
    with pytest.warns(UserWarning, match="LDM_PROGRESS_INTERVAL='soon' is not a number of seconds"):
        bar = progress_bar(total=5, file=io.StringIO())
    assert bar.interval == DEFAULT_INTERVAL_S
    monkeypatch.setenv("LDM_PROGRESS_INTERVAL", "0")
    assert progress_bar(total=5, file=io.StringIO()).interval == 0
