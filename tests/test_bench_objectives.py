"""bench/objectives.py without training: the arms' train_ldm.py arguments, the records that let a table be finished in
several sittings (reused only under the same settings and overrides), and the table's seed-noise marks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import objectives as bench


def parse(tmp_path: Path, *extra: str):
    """bench.main's parsed arguments (it stops at the first arm)."""
    captured = {}

    def stop(a):
        captured["a"] = a
        raise SystemExit(0)

    original = bench.recorded
    bench.recorded = lambda arm, a: stop(a)
    try:
        with pytest.raises(SystemExit):
            bench.main(["--root", str(tmp_path / "root"), "--record", str(tmp_path / "rec"), *extra])
    finally:
        bench.recorded = original
    return captured["a"]


def result(arm: str, mse: float, acc75: float, acc1: float, n: int = 252) -> dict:
    """evaluate()'s result; each attribute's accuracy is the all-five one plus 0.1 times its index (mean: + 0.2)."""
    def acc(all_five: float) -> dict:
        return {"images": n, "all": all_five, **{a: all_five + 0.1 * i for i, a in enumerate(bench.ATTRIBUTES)}}
    return {"arm": arm, "target": bench.ARMS[arm][1], "val": {"step": 1500, "mse": mse, "loss": mse, "bands": {}},
            "adherence": {"7.5": acc(acc75), "1.0": acc(acc1)}}


def test_every_arm_trains_the_demo_config_from_the_same_start_with_its_own_overrides(tmp_path):
    a = parse(tmp_path, "--steps", "40", "--batch-size", "8")
    base = bench.train_args("baseline", a)
    assert f"train.output_dir={tmp_path / 'root' / 'baseline'}" in base
    assert {"train.max_steps=40", "train.batch_size=8", "noise.offset_noise=0.0", "optim.warmup_steps=5"} <= set(base)
    assert not any(x.startswith("train.seed=") for x in base)  # train.seed 0 from the config: the same init
    for arm, (overrides, _) in bench.ARMS.items():
        argv = bench.train_args(arm, a)
        assert argv[: len(base)] == [x.replace("/baseline", f"/{arm}") for x in base] and argv[len(base):] == overrides
    assert bench.ARMS["baseline-seed1"][0] == ["train.seed=1"]


def test_a_record_is_reused_only_under_the_same_settings_and_overrides(tmp_path, capsys):
    a = parse(tmp_path, "--steps", "40")
    bench.record("huber", result("huber", 0.1, 0.5, 0.3), a)
    saved = json.loads((tmp_path / "rec/huber.json").read_text())
    assert saved["settings"]["steps"] == 40 and saved["overrides"] == bench.ARMS["huber"][0]
    assert bench.recorded("huber", a)["val"]["mse"] == 0.1
    assert bench.recorded("flow", a) is None  # nothing recorded
    assert bench.recorded("huber", parse(tmp_path, "--steps", "41")) is None
    assert "other settings or overrides; not used" in capsys.readouterr().out
    saved["overrides"] = ["loss.type=huber"]  # the arm's definition changed since
    (tmp_path / "rec/huber.json").write_text(json.dumps(saved))
    assert bench.recorded("huber", a) is None


def test_table_only_prints_the_recorded_arms_and_names_the_missing_ones(tmp_path, capsys):
    a = parse(tmp_path)
    bench.record("baseline", result("baseline", 0.100, 0.50, 0.30), a)
    bench.record("baseline-seed1", result("baseline-seed1", 0.102, 0.52, 0.31), a)
    bench.record("huber", result("huber", 0.110, 0.70, 0.31), a)
    bench.main(["--root", str(tmp_path / "root"), "--record", str(tmp_path / "rec"), "--table-only"])
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0][2:]: line for line in out.splitlines() if line.startswith("| ") and "---" not in line}
    # seed noise: val 0.002, cfg 7.5 0.02 (but twice the binomial error of a difference at p 0.5, n 252: 0.089)
    assert rows["arm"] == ("| arm | val MSE (target) | all five, cfg 7.5 | attribute mean, cfg 7.5 | all five, cfg 1.0 | "
                           "attribute mean, cfg 1.0 |")
    assert rows["huber"] == "| huber | 0.1100 (eps) * | 0.700 * | 0.900 * | 0.310 | 0.510 |"
    assert rows["baseline"] == "| baseline | 0.1000 (eps) | 0.500 | 0.700 | 0.300 | 0.500 |"
    assert "Seed noise (baseline seeds 0 and 1): val MSE 0.0020, all five, cfg 7.5 0.020, attribute mean" in out
    assert "Not run yet: logit-normal, debiased, ztsnr-v, immiscible, flow." in out
    assert not (tmp_path / "root").exists()  # nothing trained, nothing written


def test_an_unknown_arm_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="unknown arm\\(s\\) sd3; known: baseline"):
        bench.main(["--root", str(tmp_path), "--arms", "sd3"])
