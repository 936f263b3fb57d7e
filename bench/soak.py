"""Soak test: a tiny training run SIGKILLed again and again at random moments, resumed each time with
`--resume latest`, and compared bit for bit with an uninterrupted run of the same settings.

    python bench/soak.py [--stage vae|ldm] [--steps 3000] [--checkpoint-every 100] [--kills 8] [--seed 0]
                         [--workdir DIR] [key=value ...]

Kill moments are seeded: K target steps drawn uniformly from the run, each hit when the progress bar reports it
(TQDM_MININTERVAL=0 makes it print every step), plus a random delay of up to ~1.5 steps, so kills land anywhere in a
step, now and then inside a checkpoint write or a validation. For each kill the table gives the steps done, the
checkpoint left behind, the steps lost (done but after that checkpoint, so redone; the goal is never more than one
checkpoint interval) and whether a half-written checkpoint (`.tmp-step-*`) was left. At the end the final checkpoints
of both runs are compared tensor by tensor (models/, optimizers/, ema/, rng_*, and the schedulers' and state JSON),
as are the exported models. Extra `key=value` arguments go to both runs. Prints a Markdown report; exit status 1
if the weights differ or a kill lost more than one checkpoint interval.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# a progress line off a terminal (ldm.progress: "vae: 8/12 (67%), ...") or, on one, tqdm's bar
PROGRESS = re.compile(r"(?:vae|unet): +(?:\d+%\|[^|]*\| *)?(\d+)/(\d+)")
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    "LDM_PROGRESS_INTERVAL": "0",  # a progress line at every step, which the soak follows
    "PYTHONUNBUFFERED": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


class Run:
    """A training process whose merged output is followed live; `step` is the last step its progress bar showed."""

    def __init__(self, cmd: list[str], log: Path):
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
        self.step = -1
        self.first_step_at: float | None = None  # when the first step of this process was reported
        self.first_step = self.last_step_at = 0
        self.text: list[str] = []
        self._reader = threading.Thread(target=self._read, args=(log,), daemon=True)
        self._reader.start()

    def _read(self, log: Path) -> None:
        buffer = b""
        with open(log, "ab") as f:
            while chunk := os.read(self.proc.stdout.fileno(), 65536):
                f.write(chunk)
                buffer += chunk
                *lines, buffer = re.split(rb"[\r\n]", buffer)
                for line in lines:
                    self._line(line.decode("utf-8", "replace"))
        self._line(buffer.decode("utf-8", "replace"))

    def _line(self, line: str) -> None:
        if not line.strip():
            return
        match = PROGRESS.search(line)
        if match:
            step, now = int(match.group(1)), time.monotonic()
            if step > self.step >= 0:
                if self.first_step_at is None:
                    self.first_step_at, self.first_step = now, step
                self.last_step_at = now
            self.step = max(self.step, step)
        else:
            self.text.append(line)

    def wait_for_step(self, step: int, timeout: float) -> bool:
        """True when `step` was reached; False if the process ended first."""
        deadline = time.monotonic() + timeout
        while self.step < step:
            if self.proc.poll() is not None:
                return False
            if time.monotonic() > deadline:
                self.kill()
                raise SystemExit(f"timed out waiting for step {step}; see the logs")
            time.sleep(0.002)
        return True

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._reader.join(timeout=30)

    def finish(self) -> int:
        rc = self.proc.wait()
        self._reader.join(timeout=30)
        return rc


# ------------------------------------------------------------------------------------------------ setups


def vae_setup(work: Path, args: argparse.Namespace) -> tuple[Path, list[str], str]:
    from ldm.demo.shapes import write_dataset

    data = work / "shapes"
    if not (data / "metadata.jsonl").is_file():
        write_dataset(data, num_images=256, seed=1, size=32, overwrite=True)
    overrides = [
        f"data.path={data}", "train.report_to=none", f"train.max_steps={args.steps}",
        f"train.checkpoint_every={args.checkpoint_every}", "loss.perceptual_weight=0",
        f"loss.disc_start={args.steps // 2}", "train.batch_size=2", "train.grad_accum=2", "train.ema_decay=0.999",
        "loss.learn_logvar=true", "data.random_flip=true", "data.num_val=16", f"train.val_every={args.val_every}",
        "optim.warmup_steps=10", "train.log_every=50",
    ]
    return ROOT / "train/train_vae.py", ["--config", str(ROOT / "configs/vae/tiny.yaml"), *overrides], "vae"


def ldm_setup(work: Path, args: argparse.Namespace) -> tuple[Path, list[str], str]:
    from ldm.unet.tiny import write_tiny_stage2_inputs

    parts = work / "parts"
    if not (parts / "shapes/metadata.jsonl").is_file():
        write_tiny_stage2_inputs(parts, num_images=256)
    overrides = [
        f"data.path={parts / 'shapes'}", f"cache.vae={parts / 'vae'}", f"text_encoder.path={parts / 'text'}",
        "train.report_to=none", "sample.every=0", f"train.max_steps={args.steps}",
        f"train.checkpoint_every={args.checkpoint_every}", "train.batch_size=8", "train.grad_accum=2",
        "train.caption_dropout=0.2", "data.random_flip=true", "noise.offset_noise=0.05", "cache.shard_size=32",
        "optim.warmup_steps=10", "train.log_every=50",
    ]
    return ROOT / "train/train_ldm.py", ["--config", str(ROOT / "configs/ldm/tiny.yaml"), *overrides], "model/unet"


# ------------------------------------------------------------------------------------------------ comparison


def contents(directory: Path) -> dict[str, object]:
    from safetensors import safe_open

    found: dict[str, object] = {}
    for f in sorted(directory.rglob("*.safetensors")):
        rel = f.relative_to(directory).as_posix()
        with safe_open(str(f), framework="pt") as sf:
            found[f"{rel}:__metadata__"] = sf.metadata()
            found.update({f"{rel}:{k}": sf.get_tensor(k) for k in sf.keys()})
    for f in sorted(directory.rglob("*.json")):
        if f.name != "manifest.json":  # holds a creation time
            found[f.relative_to(directory).as_posix()] = json.loads(f.read_text())
    return found


def differences(a: dict[str, object], b: dict[str, object]) -> list[str]:
    import torch

    if a.keys() != b.keys():
        return sorted(a.keys() ^ b.keys())
    return [k for k in a if not (torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k])]


def latest_step(ckpts: Path) -> int:
    from ldm.checkpoint import latest_checkpoint

    found = latest_checkpoint(ckpts)
    return int(found.name.split("-")[1]) if found else 0


# ------------------------------------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=["vae", "ldm"], default="vae")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--val-every", type=int, default=500, help="stage 1 only")
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a fresh temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    if not 0 < args.kills < args.steps:
        parser.error("need 0 < --kills < --steps")

    work = args.workdir or Path(tempfile.mkdtemp(prefix=f"soak-{args.stage}-"))
    work.mkdir(parents=True, exist_ok=True)
    for name in ("reference", "killed"):
        shutil.rmtree(work / name, ignore_errors=True)
    script, base, export = (vae_setup if args.stage == "vae" else ldm_setup)(work, args)
    base = base + list(args.overrides)

    def cmd(out: str, resume: bool) -> list[str]:
        return [sys.executable, str(script), *base, f"train.output_dir={work / out}",
                *(["--resume", "latest"] if resume else [])]

    # ---- the uninterrupted reference
    print(f"[soak] work dir {work}; reference run of {args.steps} steps ...", file=sys.stderr, flush=True)
    start = time.monotonic()
    reference = Run(cmd("reference", False), work / "reference.log")
    if reference.finish() != 0:
        raise SystemExit(f"the reference run failed; see {work / 'reference.log'}")
    reference_wall = time.monotonic() - start
    # seconds per step while training (checkpoints and validations included), for the kill delays
    step_time = (reference.last_step_at - reference.first_step_at) / max(args.steps - reference.first_step, 1)

    # ---- the same run, killed at random moments and resumed
    rng = random.Random(args.seed)
    targets = sorted(rng.sample(range(1, args.steps), args.kills))
    ckpts = work / "killed/checkpoints"
    rows = []
    start = time.monotonic()
    launches = 0
    for i, target in enumerate(targets, 1):
        resumed = latest_step(ckpts)
        if target <= resumed:  # the previous kill's checkpoint is already past this moment: move it on
            target = min(resumed + 1 + rng.randrange(args.checkpoint_every), args.steps - 1)
        print(f"[soak] kill {i}/{len(targets)} planned after step {target} (resuming from {resumed})",
              file=sys.stderr, flush=True)
        run = Run(cmd("killed", resume=launches > 0), work / "killed.log")
        launches += 1
        if not run.wait_for_step(target, timeout=3600):
            raise SystemExit(f"the run ended (rc {run.proc.returncode}) before step {target}; see killed.log")
        time.sleep(rng.uniform(0, 1.5 * step_time))
        done = run.step
        run.kill()
        done = max(done, run.step)
        left = latest_step(ckpts)
        tmp = sorted(p.name for p in ckpts.iterdir() if p.name.startswith(".tmp-")) if ckpts.is_dir() else []
        restart = (run.first_step_at - run.started) if run.first_step_at else float("nan")
        rows.append({"kill": i, "resumed_from": resumed, "done": done, "checkpoint": left, "lost": done - left,
                     "tmp": ", ".join(tmp) or "-", "restart_s": restart,
                     "segment_s": time.monotonic() - run.started})
    run = Run(cmd("killed", resume=True), work / "killed.log")
    rc = run.finish()
    killed_wall = time.monotonic() - start
    if rc != 0:
        raise SystemExit(f"the final resumed run failed (rc {rc}); see {work / 'killed.log'}")

    final = f"step-{args.steps:08d}"
    diff = differences(contents(work / "reference/checkpoints" / final), contents(ckpts / final))
    diff_export = differences(contents(work / "reference" / export), contents(work / "killed" / export))
    exact = not diff and not diff_export
    worst = max(r["lost"] for r in rows)

    # ---- report
    lines = [
        (f"Soak, stage {'1 (VAE)' if args.stage == 'vae' else '2 (U-Net)'}: {args.steps} steps, checkpoint every "
         f"{args.checkpoint_every}, {len(rows)} SIGKILLs (seed {args.seed})"),
        "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        (f"- machine: {platform.node()}, {platform.platform()}, {os.cpu_count()} CPUs "
         f"(shared), python {platform.python_version()}, OMP_NUM_THREADS={ENV['OMP_NUM_THREADS']}"),
        f"- command: `python bench/soak.py {' '.join(sys.argv[1:])}`",
        "",
        ("| kill | resumed from | steps done at kill | checkpoint left | steps lost | half-written checkpoint left "
         "| restart to first step (s) | segment wall (s) |"),
        "|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['kill']} | {r['resumed_from']} | {r['done']} | {r['checkpoint']} | {r['lost']} | "
                     f"{r['tmp']} | {r['restart_s']:.1f} | {r['segment_s']:.1f} |")
    lines += [
        "",
        "| | |",
        "|---|---|",
        f"| kills | {len(rows)} |",
        (f"| steps lost per kill | max {worst}, mean {sum(r['lost'] for r in rows) / len(rows):.1f}, total "
         f"{sum(r['lost'] for r in rows)} (limit: one checkpoint interval = {args.checkpoint_every}) |"),
        f"| wall time, uninterrupted reference | {reference_wall:.0f} s ({1 / step_time:.1f} steps/s once started) |",
        f"| wall time, killed and resumed ({launches + 1} launches) | {killed_wall:.0f} s |",
        f"| final checkpoint ({final}) bit-exact | {'yes' if not diff else 'NO: ' + ', '.join(diff[:5])} |",
        f"| exported weights ({export}/) bit-exact | {'yes' if not diff_export else 'NO: ' + ', '.join(diff_export[:5])} |",
    ]
    print("\n".join(lines))
    if not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if exact and worst <= args.checkpoint_every else 1


if __name__ == "__main__":
    sys.exit(main())
