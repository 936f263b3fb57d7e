"""Running a peer's training script unmodified beside ours: the timing child, the script download, the step statistics.

Shared by the peer benches (bench_vs_diffusers_train.py for stage 2, bench_vs_diffusers_vae.py for stage 1). A
bench re-runs itself as `bench.py --_child OUT THREADS OPTIONS_JSON SCRIPT ARGV...`; `child_main` then runs
`SCRIPT ARGV` as __main__ in that process with torch's global optimizer step hook
(`register_optimizer_step_post_hook`) recording the time after every optimizer step, and writes OUT (JSON) at exit:

    {"start": t0, "steps": [t1, ...], "rss_kib": VmHWM at the last step, "cuda_bytes": max allocated,
     "snapshots": [{"step": n, "time": t, "file": "step-000040.pt"}, ...]}

Times are `time.perf_counter()` seconds, less the time spent writing snapshots. With OPTIONS
`{"snapshot_every": E, "snapshot_numel": N, "snapshot_dir": D}` the parameters of the optimizer whose parameters
hold N elements in all (the model under test, not the discriminator's) are saved to D as a list of tensors in the
optimizer's order before its first step (step 0) and after every E-th of its steps, so a bench can evaluate each
trainer at matched steps and matched times without relying on either trainer's checkpoint format.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def child_main(argv: list[str]) -> None:
    """`OUT THREADS OPTIONS_JSON SCRIPT ARGV...` (what a bench's `--_child` passes on)."""
    out, threads, options, script, *rest = argv
    child(out, int(threads), script, rest, json.loads(options))


def child(out: str, threads: int, script: str, argv: list[str], options: dict | None = None) -> None:
    """Run `script argv` as __main__ in this process, timing each optimizer step; results go to `out` at exit."""
    import atexit
    import runpy

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    options = options or {}
    every, numel = int(options.get("snapshot_every", 0)), int(options.get("snapshot_numel", 0))
    folder = Path(options["snapshot_dir"]) if every else None
    torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    start, steps, peak = time.perf_counter(), [], {"rss_kib": 0, "cuda_bytes": 0}
    paused = [0.0]  # seconds spent writing snapshots, taken out of every later time
    snapshots: list[dict] = []
    tracked_steps = [0]

    def now() -> float:
        return time.perf_counter() - paused[0]

    def tracked(optimizer) -> bool:
        return every > 0 and sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == numel

    def snapshot(optimizer, step: int) -> None:
        t0 = time.perf_counter()
        stamp = now()
        name = f"step-{step:06d}.pt"
        torch.save([p.detach().cpu().clone() for g in optimizer.param_groups for p in g["params"]], folder / name)
        snapshots.append({"step": step, "time": stamp, "file": name})
        paused[0] += time.perf_counter() - t0

    def before_step(optimizer, args, kwargs) -> None:
        if tracked(optimizer) and tracked_steps[0] == 0 and not snapshots:
            snapshot(optimizer, 0)  # the initial weights, to check both trainers start from the same ones

    def on_step(optimizer, args, kwargs) -> None:
        if cuda:
            torch.cuda.synchronize()
            peak["cuda_bytes"] = torch.cuda.max_memory_allocated()
        steps.append(now())
        peak["rss_kib"] = peak_rss_kib()
        if tracked(optimizer):
            tracked_steps[0] += 1
            if tracked_steps[0] % every == 0:
                snapshot(optimizer, tracked_steps[0])

    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        register_optimizer_step_pre_hook(before_step)
    register_optimizer_step_post_hook(on_step)
    atexit.register(lambda: Path(out).write_text(json.dumps(
        {"start": start, "steps": steps, "snapshots": snapshots, "tracked_steps": tracked_steps[0], **peak})))
    sys.argv = [script, *argv]
    sys.path.insert(0, str(Path(script).parent))
    runpy.run_path(script, run_name="__main__")


def peak_rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def peer_script(path: str | None, url: str, target: Path, by_hand: str) -> Path:
    """`path` if given, else `url` downloaded to `target`; offline, exit with `by_hand` (how to get it by hand)."""
    if path:
        script = Path(path).expanduser()
        if not script.is_file():
            sys.exit(f"error: --diffusers-script {path} does not exist")
        return script
    try:
        with urllib.request.urlopen(url, timeout=15) as response:
            target.write_bytes(response.read())
    except (urllib.error.URLError, OSError) as error:
        sys.exit(f"error: cannot download diffusers' example trainer from {url} ({error}; offline?): {by_hand}")
    return target


def run_child(bench: Path, name: str, argv: list[str], threads: int, device: str, out: Path,
              options: dict | None = None) -> dict:
    """Run `python bench --_child ...` for the trainer `name`; its JSON plus `wall_s` and `machine_load`.

    Exits with the log's tail when the trainer fails. `machine_load` is the CPU-seconds used by everything on the
    machine during the run per second of wall time (2 = 2 cores busy): how disturbed the timing was.
    """
    sys.path.insert(0, str(bench.parent))
    from bench_ldm_cache import machine_busy_s  # noqa: PLC0415  (bench/ is on sys.path)

    root = bench.resolve().parents[1]
    result = out / f"{name}.json"
    result.unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=f"{root}{os.pathsep}"
               + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, str(bench.resolve()), "--_child", str(result), str(threads), json.dumps(options or {}),
           *argv]
    busy0, t0 = machine_busy_s(), time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    busy = machine_busy_s() - busy0
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not result.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        sys.exit(f"error: the {name} trainer failed (exit {proc.returncode}); log {out / f'{name}.log'}:\n{tail}")
    data = json.loads(result.read_text())
    data.update(wall_s=wall, machine_load=busy / wall if wall > 0 else 0.0)
    return data


def step_times(steps: list[float], warmup: int, count: int) -> list[float]:
    """The durations (s) of `count` optimizer steps after the first `warmup` (each the gap to the previous step)."""
    return [b - a for a, b in zip(steps[warmup:], steps[warmup + 1:])][:count]


def speed(data: dict, warmup: int, count: int, batch_size: int, device: str) -> dict[str, float]:
    """samples/s over the median step, the fastest step, start-up and peak memory of one child's JSON."""
    deltas = step_times(data["steps"], warmup, count)
    step_s = statistics.median(deltas)
    return {
        "samples_per_s": batch_size / step_s, "step_ms": 1000 * step_s, "min_step_ms": 1000 * min(deltas),
        "startup_s": data["steps"][0] - data["start"], "wall_s": data["wall_s"],
        "peak_mib": (data["cuda_bytes"] if device != "cpu" else data["rss_kib"] * 1024) / 2**20,
        "machine_load": data["machine_load"],
    }


def print_speed_table(med: dict[str, dict[str, float]], arms: tuple[str, ...]) -> None:
    """The throughput table both peer benches print: one row per trainer from `speed`'s numbers."""
    print("| trainer | samples/s (median step) | median step ms | fastest step ms | peak memory MiB | "
          "start -> first step s | machine load |")
    print("|---|---|---|---|---|---|---|")
    for arm in arms:
        m = med[arm]
        print(f"| {arm} | {m['samples_per_s']:.1f} | {m['step_ms']:.0f} | {m['min_step_ms']:.0f} | "
              f"{m['peak_mib']:.0f} | {m['startup_s']:.1f} | {m['machine_load']:.2f} |")
