"""Fault injection with real processes and real signals: the promises of RELIABILITY.md.

Every test here starts the training scripts as a user would (`python train/train_*.py`, or `accelerate launch` for
two processes) and hurts them from the outside: SIGKILL at chosen moments (during a step, while a checkpoint is being
written, while the latent cache is being encoded), a file-size limit put on the running process (the kernel then
fails its writes with EFBIG, like a full disk, even for root), a learning rate that blows the weights up, broken
image files, a missing caption column, a killed or failing rank of a 2-process run. Resumed runs are compared tensor
by tensor with an uninterrupted run of the same settings: on the CPU they must be bit-for-bit equal.

Moments are found from the processes' own output, not from guessed sleeps: with TQDM_MININTERVAL=0 the progress bar
prints every optimizer step ("vae:  37%|...| 6/16"), and checkpoint / cache files are polled on disk.
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from conftest import free_port
from ldm.checkpoint import latest_checkpoint, load_checkpoint, resolve_resume
from ldm.demo.shapes import write_dataset

ROOT = Path(__file__).resolve().parents[1]
VAE_SCRIPT = ROOT / "train/train_vae.py"
LDM_SCRIPT = ROOT / "train/train_ldm.py"

ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "LDM_PROGRESS_INTERVAL": "0",  # output is a pipe: a progress line at every step, which the tests follow
    "PYTHONUNBUFFERED": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}
# a progress line off a terminal (ldm.progress: "vae: 8/12 (67%), ...") or, on one, tqdm's bar
PROGRESS = re.compile(r"(?:vae|unet): +(?:\d+%\|[^|]*\| *)?(\d+)/(\d+)")
RNG = random.Random(20240601)  # the "random-ish" kill moments, reproducible


# ------------------------------------------------------------------------------------------------ process helpers


class Run:
    """A training process whose output (stdout and stderr merged) is read as it comes, split on \\r and \\n so that
    every progress-bar update is a line of its own; `step` is the last optimizer step the bar reported."""

    def __init__(self, cmd: list[str], log: Path):
        self.cmd, self.log = cmd, log
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
        self.lines: list[str] = []
        self.step = -1  # the last optimizer step the progress bar reported (steps done)
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        _ALL_RUNS.append(self)

    def _read(self) -> None:
        buffer = b""
        with open(self.log, "ab") as log:
            while chunk := os.read(self.proc.stdout.fileno(), 65536):
                log.write(chunk)
                buffer += chunk
                *complete, buffer = re.split(rb"[\r\n]", buffer)
                self._add([c.decode("utf-8", "replace") for c in complete])
        self._add([buffer.decode("utf-8", "replace")])

    def _add(self, lines: list[str]) -> None:
        with self._lock:
            for line in lines:
                if not line.strip():
                    continue
                self.lines.append(line)
                match = PROGRESS.search(line)
                if match:
                    self.step = max(self.step, int(match.group(1)))

    @property
    def text(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait_until(self, condition, timeout: float, what: str, poll: float = 0.005) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if not self.running():
                raise AssertionError(f"process ended (rc {self.proc.returncode}) before {what}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.tail()}")
            time.sleep(poll)

    def kill(self) -> None:
        if self.running():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._reader.join(timeout=30)

    def finish(self, timeout: float = 300) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.cmd[1]} did not finish in {timeout} s:\n{self.tail()}")
        self._reader.join(timeout=30)
        return rc

    def tail(self) -> str:
        """The output without progress-bar lines, last 6000 characters (for failure messages)."""
        def bar_only(line: str) -> bool:
            return bool(PROGRESS.match(line)) and "[rank" not in line and "error:" not in line

        return "\n".join(line for line in self.text.splitlines() if not bar_only(line))[-6000:]


_ALL_RUNS: list[Run] = []


@pytest.fixture(autouse=True)
def _no_orphans():
    """Whatever a test does, it leaves none of its processes behind."""
    yield
    while _ALL_RUNS:
        run = _ALL_RUNS.pop()
        if run.running():
            for child in _descendants(run.proc.pid):
                child.kill()
            run.kill()


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def vae_cmd(out: Path, data: Path, *overrides: str, resume: bool = False) -> list[str]:
    return [sys.executable, str(VAE_SCRIPT), "--config", str(ROOT / "configs/vae/tiny.yaml"),
            f"train.output_dir={out}", f"data.path={data}", "train.report_to=none", *overrides,
            *(["--resume", "latest"] if resume else [])]


def ldm_cmd(out: Path, parts: dict[str, Path], *overrides: str, resume: bool = False) -> list[str]:
    return [sys.executable, str(LDM_SCRIPT), "--config", str(ROOT / "configs/ldm/tiny.yaml"),
            f"train.output_dir={out}", f"data.path={parts['data']}", f"cache.vae={parts['vae']}",
            f"text_encoder.path={parts['text']}", "train.report_to=none", "sample.every=0", *overrides,
            *(["--resume", "latest"] if resume else [])]


def step_of(path: Path | None) -> int | None:
    return None if path is None else int(path.name.split("-")[1])


def scratch(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".")) if root.is_dir() else []


def kill_after_step(run: Run, step: int, ckpt_root: Path, timeout: float = 240) -> dict[str, int]:
    """SIGKILL once the progress bar reports `step` done (so step + 1 is being computed), after a short random
    delay; returns the steps done, the checkpoint left and how many steps will be redone."""
    run.wait_until(lambda: run.step >= step, timeout, f"step {step}")
    time.sleep(RNG.uniform(0.0, 0.05))
    run.kill()
    last = step_of(latest_checkpoint(ckpt_root)) or 0
    return {"done": run.step, "checkpoint": last, "lost": run.step - last}


def kill_during_checkpoint_write(run: Run, ckpt_root: Path, timeout: float = 240) -> tuple[str, list[str]]:
    """SIGKILL as soon as the temporary directory of the next checkpoint (`.tmp-step-*`) appears; return its name
    and the scratch entries left behind (non-empty: the kill really landed inside the write)."""
    before = set(scratch(ckpt_root))
    seen: list[str] = []

    def started() -> bool:
        seen[:] = [n for n in scratch(ckpt_root) if n.startswith(".tmp-step-") and n not in before]
        return bool(seen)

    run.wait_until(started, timeout, "a checkpoint write", poll=0.0005)
    run.kill()
    return seen[0], scratch(ckpt_root)


def safetensors_contents(path: Path, prefix: str = "") -> dict[str, object]:
    with safe_open(str(path), framework="pt") as sf:
        found: dict[str, object] = {f"{prefix}__metadata__": sf.metadata()}
        found.update({f"{prefix}{key}": sf.get_tensor(key) for key in sf.keys()})
    return found


def checkpoint_contents(step_dir: Path) -> dict[str, object]:
    """Every tensor and metadata entry of every safetensors file (models/, optimizers/, ema/, rng_*), the schedulers'
    and the state's JSON: everything a resumed run would read."""
    found: dict[str, object] = {}
    for f in sorted(step_dir.rglob("*.safetensors")):
        found.update(safetensors_contents(f, prefix=f"{f.relative_to(step_dir).as_posix()}:"))
    for f in sorted(step_dir.rglob("*.json")):
        if f.name != "manifest.json":  # holds a creation time
            found[f.relative_to(step_dir).as_posix()] = json.loads(f.read_text())
    return found


def differences(a: dict[str, object], b: dict[str, object]) -> list[str]:
    if a.keys() != b.keys():
        return sorted(a.keys() ^ b.keys())
    return [k for k, x in a.items() if not (torch.equal(x, b[k]) if isinstance(x, torch.Tensor) else x == b[k])]


# ------------------------------------------------------------------------------------------------ data


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "shapes", num_images=64, seed=1, size=32)


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    """Stage 2's inputs: a random tiny VAE, a tiny CLIP text encoder, 160 captioned shapes (20 cache shards of 8)."""
    from ldm.unet.tiny import write_tiny_stage2_inputs

    return write_tiny_stage2_inputs(tmp_path_factory.mktemp("parts"), num_images=160)


# ------------------------------------------------------------------------------------------------ 1. stage 1 kills

# LPIPS (random AlexNet backbone, offline), KL, the GAN from step 5, learned log-variance, EMA, 2 accumulated
# micro-batches, random flips: every piece of state a resume must restore.
VAE_HARD = ["train.max_steps=16", "train.checkpoint_every=4", "loss.disc_start=5", "train.grad_accum=2",
            "train.ema_decay=0.9", "loss.learn_logvar=true", "train.batch_size=4", "data.random_flip=true",
            "data.num_val=8", "train.val_every=1000", "train.log_every=1", "optim.warmup_steps=2"]


@pytest.mark.slow
def test_vae_sigkill_in_a_step_and_in_a_checkpoint_write_then_resume_is_bit_exact(tmp_path, shapes):
    reference = Run(vae_cmd(tmp_path / "reference", shapes, *VAE_HARD), tmp_path / "reference.log")  # alongside
    out, ckpts = tmp_path / "killed", tmp_path / "killed/checkpoints"

    # (a) in the middle of a step of the GAN phase, between the checkpoints of steps 4 and 8
    run = Run(vae_cmd(out, shapes, *VAE_HARD), tmp_path / "run1.log")
    kill = kill_after_step(run, RNG.choice([5, 6, 7]), ckpts)
    print("kill in a step:", kill)
    assert kill["checkpoint"] == 4 and 0 < kill["lost"] < 4, kill
    assert scratch(ckpts) == []

    # (b) while the next checkpoint (step 8) is being written; tried again should the kill come just after the
    # rename (the write takes tens of ms, the kill about one)
    for attempt in range(3):
        resumed_from = latest_checkpoint(ckpts)
        run = Run(vae_cmd(out, shapes, *VAE_HARD, resume=True), tmp_path / f"run2-{attempt}.log")
        name, left = kill_during_checkpoint_write(run, ckpts)
        assert f"resumed from {resumed_from} at step {step_of(resumed_from)}" in run.text
        if left:
            break
    print(f"kill in the write of {name} (attempt {attempt + 1}), left {left}")
    assert left == [name], (name, left)
    assert latest_checkpoint(ckpts) == resumed_from  # the half-written one is never picked

    # (c) resume to the end
    run = Run(vae_cmd(out, shapes, *VAE_HARD, resume=True), tmp_path / "run3.log")
    assert run.finish() == 0, run.tail()
    assert f"resumed from {resumed_from} at step {step_of(resumed_from)}" in run.text
    assert "removing leftover" in run.text and scratch(ckpts) == []
    assert reference.finish() == 0, reference.tail()

    a = checkpoint_contents(tmp_path / "reference/checkpoints/step-00000016")
    b = checkpoint_contents(ckpts / "step-00000016")
    assert any(k.startswith("ema/") for k in a) and any(k.startswith("optimizers/discriminator") for k in a)
    assert differences(a, b) == []
    va = checkpoint_contents(tmp_path / "reference/vae")
    vb = checkpoint_contents(out / "vae")
    assert va and differences(va, vb) == []


# ------------------------------------------------------------------------------------------------ 2. stage 2 kills

LDM_HARD = ["train.max_steps=10", "train.checkpoint_every=4", "train.batch_size=8", "train.grad_accum=2",
            "train.caption_dropout=0.3", "data.random_flip=true", "noise.offset_noise=0.05",
            "noise.input_perturbation=0.1", "noise.min_snr_gamma=5", "optim.warmup_steps=2", "train.log_every=1",
            "cache.shard_size=8", "cache.batch_size=8"]
SHARDS = 20  # 160 images / 8


@pytest.mark.slow
def test_ldm_sigkill_while_caching_in_a_step_and_in_a_checkpoint_write_then_resume_is_bit_exact(tmp_path, parts):
    # the reference encodes its own cache (in its output dir), so the caches are compared too
    reference = Run(ldm_cmd(tmp_path / "reference", parts, *LDM_HARD), tmp_path / "reference.log")
    out = tmp_path / "killed"
    cache, ckpts = out / "latents", out / "checkpoints"

    # (a) while the latent cache is being encoded: as soon as two shards are on disk
    run = Run(ldm_cmd(out, parts, *LDM_HARD), tmp_path / "run1.log")
    run.wait_until(lambda: len(list(cache.glob("shard-*.safetensors"))) >= 2, 240, "two cache shards", poll=0.001)
    run.kill()
    written = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.glob("shard-*.safetensors")}
    print(f"kill while caching: {len(written)} of {SHARDS} shards written")
    assert not (cache / "manifest.json").exists() and 2 <= len(written) < SHARDS, sorted(written)
    assert not ckpts.exists()

    # (b) the rerun finishes the cache, keeping the finished shards untouched, trains, and is killed in a step
    run = Run(ldm_cmd(out, parts, *LDM_HARD, resume=True), tmp_path / "run2.log")
    kill = kill_after_step(run, RNG.choice([5, 6, 7]), ckpts)
    print("kill in a step:", kill)
    assert kill["checkpoint"] == 4 and 0 < kill["lost"] < 4, kill
    for name in written:
        assert f"keeping {name} (already written and intact)" in run.text
    assert {n: (p.stat().st_ino, p.stat().st_mtime_ns) for n, p in ((n, cache / n) for n in written)} == written
    manifest = json.loads((cache / "manifest.json").read_text())
    assert len(manifest["shards"]) == SHARDS and manifest["count"] == 160

    # (c) while the next checkpoint (step 8) is being written; the cache is reused as it is
    for attempt in range(3):
        resumed_from = latest_checkpoint(ckpts)
        run = Run(ldm_cmd(out, parts, *LDM_HARD, resume=True), tmp_path / f"run3-{attempt}.log")
        name, left = kill_during_checkpoint_write(run, ckpts)
        assert f"resumed from {resumed_from} at step {step_of(resumed_from)}" in run.text
        assert "encoding latents" not in run.text
        if left:
            break
    print(f"kill in the write of {name} (attempt {attempt + 1}), left {left}")
    assert left == [name], (name, left)
    assert latest_checkpoint(ckpts) == resumed_from

    # (d) resume to the end
    run = Run(ldm_cmd(out, parts, *LDM_HARD, resume=True), tmp_path / "run4.log")
    assert run.finish() == 0, run.tail()
    assert f"resumed from {resumed_from} at step {step_of(resumed_from)}" in run.text
    assert "removing leftover" in run.text and scratch(ckpts) == []
    assert reference.finish() == 0, reference.tail()

    # the same latents, captions and metadata in every shard (not the same bytes: safetensors writes its metadata
    # map in a per-process hash order)
    ref_cache = tmp_path / "reference/latents"
    assert sorted(p.name for p in ref_cache.glob("shard-*")) == sorted(p.name for p in cache.glob("shard-*"))
    for shard in sorted(ref_cache.glob("shard-*")):
        assert differences(safetensors_contents(shard), safetensors_contents(cache / shard.name)) == [], shard.name
    a = checkpoint_contents(tmp_path / "reference/checkpoints/step-00000010")
    b = checkpoint_contents(ckpts / "step-00000010")
    assert any(k.startswith("ema/") for k in a) and any(k.startswith("optimizers/") for k in a)
    assert differences(a, b) == []
    ua = checkpoint_contents(tmp_path / "reference/model/unet")
    assert ua and differences(ua, checkpoint_contents(out / "model/unet")) == []


# ------------------------------------------------------------------------------------------------ 3. full disk


def error_lines(text: str) -> list[str]:
    """The `error: ...` lines. A progress bar on screen has no newline yet, so the message may follow it on the
    same line ("vae:  67%|...| 8/12 [...]error: could not ...")."""
    found = []
    for line in text.splitlines():
        at = line.find("error: ")
        if at == 0 or (at > 0 and PROGRESS.match(line[:at])):
            found.append(line[at:])
    return found


def one_error_line(text: str) -> str:
    errors = error_lines(text)
    assert len(errors) == 1, errors
    return errors[0]


def assert_loads_and_is_finite(step_dir: Path) -> None:
    """The checkpoint validates (sizes, sha256, headers), loads into freshly built stage-1 models, and holds only
    finite numbers."""
    from accelerate import Accelerator

    from ldm.vae.autoencoder import PosteriorAutoencoder
    from ldm.vae.discriminator import PatchDiscriminator
    from ldm.vae.losses import LogVariance
    from ldm.vae.presets import build_vae

    assert resolve_resume(str(step_dir), step_dir.parent) == step_dir
    models = {"vae": PosteriorAutoencoder(build_vae("tiny", 32)), "discriminator": PatchDiscriminator(),
              "logvar": LogVariance(0.0)}
    state = load_checkpoint(Accelerator(cpu=True), step_dir, models=models)  # callers use `fresh_accelerate`
    assert state["step"] == step_of(step_dir)
    for name, model in models.items():
        for key, value in model.state_dict().items():
            assert torch.isfinite(value).all(), f"{name}.{key}"
    for key, value in checkpoint_contents(step_dir).items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            assert torch.isfinite(value).all(), key


@pytest.mark.slow
def test_disk_full_at_a_checkpoint_exits_2_and_keeps_the_previous_one(tmp_path, shapes, fresh_accelerate):
    out, ckpts = tmp_path / "run", tmp_path / "run/checkpoints"
    run = Run(vae_cmd(out, shapes, "loss.perceptual_weight=0", "train.max_steps=12", "train.checkpoint_every=4",
                      "train.batch_size=4", "data.num_val=8", "train.val_every=1000"), tmp_path / "run.log")
    run.wait_until(lambda: latest_checkpoint(ckpts) is not None, 240, "the first checkpoint")
    first = latest_checkpoint(ckpts)
    # From now on every write past 4 KiB fails with EFBIG, as on a full disk (python ignores SIGXFSZ).
    resource.prlimit(run.proc.pid, resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
    before = {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()}
    assert run.finish() == 2, run.tail()
    error = one_error_line(run.text)
    assert error.startswith(f"error: could not write checkpoint to {ckpts}: "), error
    assert "File too large" in error and error.endswith(f"the previous checkpoint {first} is intact"), error
    assert "Traceback" not in run.text
    assert sorted(p.name for p in ckpts.iterdir()) == [first.name]  # no .tmp-, nothing else
    assert {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()} == before
    assert_loads_and_is_finite(first)


# ------------------------------------------------------------------------------------------------ 4. non-finite loss

NAN_RUN = ["loss.perceptual_weight=0", "train.max_steps=30", "train.checkpoint_every=4", "train.batch_size=4",
           "data.num_val=8", "train.val_every=1000", "train.max_nonfinite_steps=3"]


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_counted_and_stop_the_run_and_the_advice_lets_training_continue(tmp_path, shapes):
    # lr=1e30: the first Adam step moves every weight by ~1e30; the next forward pass overflows to inf/nan
    out, ckpts = tmp_path / "run", tmp_path / "run/checkpoints"
    run = Run(vae_cmd(out, shapes, *NAN_RUN, "optim.lr=1e30"), tmp_path / "run1.log")
    assert run.finish() == 2, run.tail()
    skipped = re.findall(r"step (\d+): non-finite loss or gradient, step skipped \((\d+) in a row\)", run.text)
    assert [int(n) for _, n in skipped] == [1, 2, 3], skipped
    stop = int(skipped[-1][0])
    error = one_error_line(run.text)
    assert error == (f"error: 3 non-finite steps in a row at step {stop}: training stopped, this state is saved in "
                     f"{ckpts / f'step-{stop:08d}'}; if the weights diverged, lower optim.lr (or use "
                     "train.mixed_precision=no) and start again without --resume")
    assert latest_checkpoint(ckpts) == ckpts / f"step-{stop:08d}" and scratch(ckpts) == []
    assert_loads_and_is_finite(ckpts / f"step-{stop:08d}")
    # following the advice: a lower learning rate, started again (no checkpoint before the divergence to resume)
    run = Run(vae_cmd(out, shapes, *NAN_RUN, "optim.lr=1e-3", "train.max_steps=6"), tmp_path / "run2.log")
    assert run.finish() == 0, run.tail()
    assert latest_checkpoint(ckpts) == ckpts / "step-00000006"


@pytest.mark.slow
def test_a_learning_rate_changed_on_resume_is_used_or_refused(tmp_path, shapes):
    out = tmp_path / "run"
    short = ["loss.perceptual_weight=0", "train.checkpoint_every=2", "train.batch_size=4", "data.num_val=8",
             "train.val_every=1000"]
    run = Run(vae_cmd(out, shapes, *short, "train.max_steps=2", "optim.lr=2e-3"), tmp_path / "run1.log")
    assert run.finish() == 0, run.tail()
    run = Run(vae_cmd(out, shapes, *short, "train.max_steps=4", "optim.lr=1e-4", resume=True), tmp_path / "run2.log")
    rc = run.finish()
    if rc == 2:  # refusing the change with a message naming the key is fine too
        assert "optim.lr" in one_error_line(run.text)
        return
    assert rc == 0, run.tail()
    with safe_open(str(out / "checkpoints/step-00000004/optimizers/vae.safetensors"), framework="pt") as f:
        lrs = [group["lr"] for group in json.loads(f.metadata()["structure"])["param_groups"]]
    assert lrs == [1e-4], lrs
    assert re.search(r"WARNING.*optim\.lr differs from the checkpoint's", run.text)


# ------------------------------------------------------------------------------------------------ 5. bad data


def add_bad_files(data: Path) -> dict[str, str]:
    """Broken files of every kind, listed in metadata.jsonl; returns name -> the reason the log must give."""
    good = (data / "00000.png").read_bytes()
    (data / "zero.png").write_bytes(b"")
    (data / "text.png").write_text("this is not an image\n")
    (data / "cut.png").write_bytes(good[: len(good) // 2])
    (data / "corrupt.png").write_bytes(good[:60] + b"\0" * 40 + good[100:])  # same size, broken pixel stream
    Image.new("1", (9000, 9000)).save(data / "huge.png")  # 81 Mpx: a real decompression-bomb-sized image (~10 KB)
    reasons = {"zero.png": "empty file", "text.png": "not an image", "cut.png": "truncated file",
               "corrupt.png": "cannot read", "huge.png": "too large (9000x9000 = 81000000 pixels"}
    with open(data / "metadata.jsonl", "a") as f:
        f.writelines(json.dumps({"file_name": name, "text": "broken"}) + "\n" for name in reasons)
    return reasons


@pytest.mark.slow
def test_bad_images_are_skipped_named_and_counted(tmp_path):
    data = write_dataset(tmp_path / "data", num_images=20, seed=3, size=32)
    reasons = add_bad_files(data)
    # 25 images, 1 held out: 24 for training = 6 batches of 4, so 6 steps see every one of them once
    run = Run(vae_cmd(tmp_path / "run", data, "loss.perceptual_weight=0", "train.max_steps=6", "train.batch_size=4",
                      "data.num_val=1", "train.val_every=1000", "train.checkpoint_every=3"), tmp_path / "run.log")
    assert run.finish() == 0, run.tail()
    for name, reason in reasons.items():
        assert re.search(rf"skipped unreadable image {re.escape(name)}: {re.escape(reason)}", run.text), name
    summary = [line for line in run.text.splitlines() if "unreadable images skipped in total" in line]
    assert len(summary) == 1 and "5 unreadable images skipped in total: " in summary[0], summary
    listed = re.findall(r"(?:total: |, )([a-z]+\.png): ", summary[0])
    assert listed == sorted(reasons), summary
    assert (tmp_path / "run/vae/diffusion_pytorch_model.safetensors").is_file()
    state = json.loads((tmp_path / "run/checkpoints/step-00000006/state.json").read_text())
    assert sorted(name.split(":")[0] for name in state["skipped_images"]) == sorted(reasons)


@pytest.mark.slow
def test_missing_caption_column_is_exit_2_naming_it(tmp_path, parts):
    out = tmp_path / "run"
    run = Run(ldm_cmd(out, parts, "data.caption_column=caption"), tmp_path / "run.log")
    assert run.finish() == 2, run.tail()
    error = one_error_line(run.text)
    assert error.startswith(f"error: caption column 'caption' not found in '{parts['data']}' (columns: "), error
    assert "text" in error and "data.caption_column" in error
    assert "Traceback" not in run.text
    assert not list(out.rglob("shard-*")) and not (out / "checkpoints").exists()


# ------------------------------------------------------------------------------------------------ 6. two processes


def launch_two(out: Path, data: Path, log: Path, *overrides: str) -> Run:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()),
           *vae_cmd(out, data, "train.cpu=true", "loss.perceptual_weight=0", "train.batch_size=4",
                    "data.num_val=8", "train.val_every=1000", *overrides)[1:]]
    return Run(cmd, log)


def ranks(run: Run) -> dict[int, psutil.Process]:
    """The training processes of a launch, by rank (read from their environment)."""
    found = {}
    for proc in _descendants(run.proc.pid):
        try:
            env = proc.environ()
            if "train_vae.py" in " ".join(proc.cmdline()) and "RANK" in env:
                found[int(env["RANK"])] = proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def assert_all_gone(procs: list[psutil.Process], within: float) -> None:
    _, alive = psutil.wait_procs(procs, timeout=within)
    alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(p.pid, p.cmdline()) for p in alive]


@pytest.mark.slow
def test_sigkill_of_one_rank_ends_the_whole_run_promptly(tmp_path, shapes):
    ckpts = tmp_path / "run/checkpoints"
    run = launch_two(tmp_path / "run", shapes, tmp_path / "run.log", "train.max_steps=400",
                     "train.checkpoint_every=2")
    run.wait_until(lambda: latest_checkpoint(ckpts) is not None, 240, "the first checkpoint")
    workers = ranks(run)
    assert sorted(workers) == [0, 1], workers
    everything = _descendants(run.proc.pid)
    time.sleep(RNG.uniform(0.1, 0.4))  # somewhere in a step (or a collective) of the training loop
    killed_at = time.monotonic()
    workers[1].send_signal(signal.SIGKILL)
    rc = run.finish(timeout=120)
    elapsed = time.monotonic() - killed_at
    print(f"launcher exited with {rc} {elapsed:.1f} s after rank 1 was killed")
    assert rc != 0, run.tail()
    assert elapsed < 60, f"the launcher took {elapsed:.1f} s to give up after rank 1 died"
    assert_all_gone(everything, within=10)
    last = latest_checkpoint(ckpts)  # whatever rank 1 was doing, the newest complete checkpoint is sound
    assert last is not None and resolve_resume(str(last), ckpts) == last


@pytest.mark.slow
def test_write_failure_on_one_rank_fails_every_rank_with_exit_2(tmp_path, shapes):
    ckpts = tmp_path / "run/checkpoints"
    run = launch_two(tmp_path / "run", shapes, tmp_path / "run.log", "train.max_steps=400",
                     "train.checkpoint_every=3")
    run.wait_until(lambda: latest_checkpoint(ckpts) is not None, 240, "the first checkpoint")
    first = latest_checkpoint(ckpts)
    workers = ranks(run)
    assert sorted(workers) == [0, 1], workers
    everything = _descendants(run.proc.pid)
    # only rank 1's writes fail (its RNG state file is the one thing it writes into a checkpoint)
    resource.prlimit(workers[1].pid, resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))
    failed_at = time.monotonic()
    rc = run.finish(timeout=120)
    print(f"launcher exited with {rc} {time.monotonic() - failed_at:.1f} s after rank 1's writes started failing")
    assert rc != 0, run.tail()
    assert time.monotonic() - failed_at < 60
    assert_all_gone(everything, within=10)
    errors = error_lines(run.text)
    assert len(errors) == 2, errors  # one per rank, each a single line
    assert any("(on process 1)" in e for e in errors), errors  # rank 0 learnt of rank 1's failure
    for e in errors:
        assert e.startswith(f"error: could not write checkpoint to {ckpts}: ") and "File too large" in e, e
        assert e.endswith(f"the previous checkpoint {first} is intact"), e
    # (the launcher prints its own ChildFailedError traceback; the training processes print none)
    assert not re.search(r'File ".*(train_vae\.py|/ldm/)', run.text), run.tail()
    assert latest_checkpoint(ckpts) == first and scratch(ckpts) == []
    assert resolve_resume(str(first), ckpts) == first
