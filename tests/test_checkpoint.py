"""Tests for ldm.checkpoint: exact resume, no pickle, rotation, atomicity under SIGKILL and write errors, validation."""

from __future__ import annotations

import copy
import errno
import json
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from pathlib import Path
from typing import Any

# No network in tests: diffusers / huggingface_hub must never try the hub.
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from safetensors import safe_open

from conftest import free_port
import ldm.checkpoint as ck
import ldm.checkpoint.save as ck_save
import ldm.checkpoint.validate as ck_validate
from ldm.checkpoint import latest_checkpoint, load_checkpoint, resolve_resume, save_checkpoint
from ldm.checkpoint.codec import Encoder, decode
from ldm.errors import UserError

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ helpers


@pytest.fixture
def accelerator(fresh_accelerate) -> Accelerator:
    # accelerate's state is a process-wide singleton: `fresh_accelerate` leaves a clean one after the test.
    return Accelerator(cpu=True)


def tiny_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def trained_net(accelerator: Accelerator, seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A tiny model and AdamW after one step, so the optimizer has state to save."""
    net = tiny_net(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    net(torch.randn(3, 4)).sum().backward()
    opt.step()
    return net, opt


def save_net(accelerator: Accelerator, root: Path, step: int, net: torch.nn.Module, **kwargs: Any) -> Path:
    return save_checkpoint(accelerator, root, step, models={"net": net}, state={"step": step}, **kwargs)


def assert_tree_equal(a: Any, b: Any, where: str = "") -> None:
    """Bit-exact equality of nested state, tensors compared with dtype and shape."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{where}: {a.dtype} {a.shape} vs {b.dtype} {b.shape}"
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert type(a) is type(b) and list(a.keys()) == list(b.keys()), f"{where}: {list(a)} vs {list(b)}"
        for k in a:
            assert_tree_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{where}/{i}")
    elif isinstance(a, float) and np.isnan(a):
        assert isinstance(b, float) and np.isnan(b), where
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} vs {b!r}"


def entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def draws() -> tuple[list[float], list[float], float]:
    """Random numbers from every generator the checkpoint restores."""
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()


# ------------------------------------------------------------------------------------------------ 1. exact resume


def build_vae_training(accelerator: Accelerator, seed: int):
    from diffusers import AutoencoderKL
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=16,
    )
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.01)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=20)
    vae, opt, sched = accelerator.prepare(vae, opt, sched)
    ema = EMAModel(accelerator.unwrap_model(vae).parameters(), decay=0.9, use_ema_warmup=True, power=0.75)
    return vae, opt, sched, ema


def train_vae(accelerator: Accelerator, vae, opt, sched, ema, steps: int) -> None:
    for _ in range(steps):
        # All three generators feed the loss, so an RNG not restored exactly changes the weights.
        x = torch.randn(2, 3, 16, 16)
        scale = 1.0 + float(np.random.rand()) + random.random()
        z = vae.encode(x).latent_dist.sample()
        loss = ((vae.decode(z).sample - x) ** 2).mean() * scale
        accelerator.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad()
        ema.step(accelerator.unwrap_model(vae).parameters())


def snapshot(accelerator: Accelerator, vae, opt, sched, ema) -> dict[str, Any]:
    return {
        "weights": {k: v.clone() for k, v in accelerator.unwrap_model(vae).state_dict().items()},
        "optimizer": copy.deepcopy(opt.state_dict()),
        "ema": [p.clone() for p in ema.shadow_params],
        "ema_step": ema.optimization_step,
        "lr": sched.get_last_lr(),
        "scheduler": copy.deepcopy(sched.state_dict()),
    }


@pytest.mark.slow  # trains a tiny VAE; the checks below are fast
def test_round_trip_is_bit_exact(accelerator: Accelerator, tmp_path: Path) -> None:
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    vae, opt, sched, ema = build_vae_training(accelerator, seed=0)
    train_vae(accelerator, vae, opt, sched, ema, 3)
    at_save = snapshot(accelerator, vae, opt, sched, ema)
    state = {"step": 3, "epoch": 0, "data": {"batch_in_epoch": 3, "order": (2, 0, 1)}}
    components = {"models": {"vae": vae}, "optimizers": {"opt": opt}, "schedulers": {"lr": sched}, "emas": {"ema": ema}}
    path = save_checkpoint(accelerator, tmp_path, 3, **components, state=state)
    assert path == tmp_path / "step-00000003"
    train_vae(accelerator, vae, opt, sched, ema, 3)
    expected = snapshot(accelerator, vae, opt, sched, ema)
    expected_draws = draws()

    # A fresh run with different weights and RNG, then resumed.
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    vae2, opt2, sched2, ema2 = build_vae_training(accelerator, seed=42)
    assert not torch.equal(next(iter(vae2.parameters())), next(iter(vae.parameters())))
    loaded = load_checkpoint(
        accelerator, path, models={"vae": vae2}, optimizers={"opt": opt2}, schedulers={"lr": sched2}, emas={"ema": ema2}
    )

    assert loaded == state and isinstance(loaded["data"]["order"], tuple)
    assert_tree_equal(snapshot(accelerator, vae2, opt2, sched2, ema2), at_save)
    train_vae(accelerator, vae2, opt2, sched2, ema2, 3)
    assert_tree_equal(snapshot(accelerator, vae2, opt2, sched2, ema2), expected)
    assert draws() == expected_draws


# ------------------------------------------------------------------------------------------------ 2. no pickle


def test_no_pickle_on_disk_or_in_code(
    accelerator: Accelerator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("pickle used")

    for name in ("load", "save"):
        monkeypatch.setattr(torch, name, forbidden)
    for name in ("load", "loads", "dump", "dumps"):
        monkeypatch.setattr(pickle, name, forbidden)
    net, opt = trained_net(accelerator)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 4, 4])  # milestones is a Counter with int keys
    path = save_checkpoint(
        accelerator, tmp_path, 1, models={"net": net}, optimizers={"opt": opt}, schedulers={"lr": sched}
    )
    net2, opt2 = trained_net(accelerator, seed=5)
    sched2 = torch.optim.lr_scheduler.MultiStepLR(opt2, milestones=[1])
    load_checkpoint(accelerator, path, models={"net": net2}, optimizers={"opt": opt2}, schedulers={"lr": sched2})
    assert sched2.milestones == Counter({2: 1, 4: 2}) and isinstance(sched2.milestones, Counter)

    files = [p for p in path.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} == {".safetensors", ".json"}
    for p in files:
        head = p.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", f"{p} looks like a pickle / torch zip"
        if p.suffix == ".json":
            json.loads(p.read_text())
        else:
            with safe_open(str(p), framework="pt") as f:
                list(f.keys())
    listed = json.loads((path / "manifest.json").read_text())["files"]
    assert sorted(listed) == sorted(p.relative_to(path).as_posix() for p in files if p.name != "manifest.json")
    for source in Path(ck.__file__).parent.glob("*.py"):
        assert "torch.load" not in source.read_text() and "import pickle" not in source.read_text(), source


# ------------------------------------------------------------------------------------------------ 3. rotation


def test_keep_last_rotation(accelerator: Accelerator, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    net = tiny_net()
    for step in (1, 2, 3, 4):
        save_net(accelerator, tmp_path, step, net, keep_last=2)
    assert entries(tmp_path) == ["step-00000003", "step-00000004"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000004"

    # Re-saving an existing step (after a resume) replaces it in place.
    with torch.no_grad():
        net[0].bias.fill_(7.0)
    save_net(accelerator, tmp_path, 4, net, keep_last=2)
    assert entries(tmp_path) == ["step-00000003", "step-00000004"]
    fresh = tiny_net(1)
    load_checkpoint(accelerator, tmp_path / "step-00000004", models={"net": fresh})
    assert torch.equal(fresh[0].bias, torch.full((8,), 7.0))

    # Saving an older step than existing ones (resumed from an earlier checkpoint) never deletes the new one.
    save_net(accelerator, tmp_path, 2, net, keep_last=2)
    assert entries(tmp_path) == ["step-00000002", "step-00000004"]
    assert "--resume latest will pick step-00000004" in caplog.text

    save_net(accelerator, tmp_path, 5, net, keep_last=None)
    save_net(accelerator, tmp_path, 6, net, keep_last=None)
    assert entries(tmp_path) == ["step-00000002", "step-00000004", "step-00000005", "step-00000006"]


def test_tied_weights_and_world_size_change(
    accelerator: Accelerator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    net[1].weight = net[0].weight  # shared storage, which safetensors refuses unless copied
    path = save_net(accelerator, tmp_path, 1, net)
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    fresh[1].weight = fresh[0].weight

    # Pretend the run was saved by 2 processes: this 1-process resume falls back to rank 0's RNG with a warning.
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["world_size"] = 2
    (path / "manifest.json").write_text(json.dumps(manifest))
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    save_net(accelerator, tmp_path, 2, net)
    torch.rand(5)
    load_checkpoint(accelerator, tmp_path / "step-00000002", models={"net": fresh})
    assert torch.equal(torch.rand(3), expected)
    load_checkpoint(accelerator, path, models={"net": fresh})
    assert "saved by 2 processes, now 1" in caplog.text
    assert torch.equal(fresh[0].weight, net[0].weight) and fresh[1].weight is fresh[0].weight


# ------------------------------------------------------------------------------------------------ 4. SIGKILL mid-save

KILL_SCRIPT = textwrap.dedent(
    """
    import shutil, sys, time
    import torch
    from accelerate import Accelerator
    import ldm.checkpoint as ck
    import ldm.checkpoint.save as ck_save

    root, mode = sys.argv[1], sys.argv[2]

    def hang(*args, **kwargs):
        print("hanging", flush=True)
        time.sleep(600)

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    net(torch.randn(3, 4)).sum().backward()
    opt.step()
    ck.save_checkpoint(accelerator, root, 1, models={"net": net}, optimizers={"opt": opt}, state={"step": 1})
    print("saved 1", flush=True)

    if mode == "mid-write":  # die with a half-written file in the temp dir
        def partial_write(path, tensors, metadata=None):
            with open(path, "wb") as f:
                f.write(b"half a file")
            hang()
        ck_save.save_tensors = partial_write
    elif mode == "before-rename":  # die with a complete, sealed temp dir that was never renamed
        ck_save.replace_directory = hang
    elif mode == "mid-rotation":  # die while deleting the checkpoint that rotation dropped
        real_rmtree = shutil.rmtree
        shutil.rmtree = lambda path, *a, **k: hang() if ".trash-" in str(path) else real_rmtree(path, *a, **k)

    with torch.no_grad():
        net[0].weight.add_(1.0)
    ck.save_checkpoint(
        accelerator, root, 2, models={"net": net}, optimizers={"opt": opt}, state={"step": 2}, keep_last=1
    )
    print("saved 2", flush=True)
    """
)


def run_until_killed(script: Path, root: Path, mode: str) -> None:
    """Run the script and SIGKILL it as soon as it reports that it hangs inside the save."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(root), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    watchdog = threading.Timer(120, proc.kill)  # a script that never reaches the hang must not block the suite
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:  # blocking reads; EOF if the script exits or is killed
            if line.startswith("[20"):  # a library's log line (DeepSpeed logs to stdout when installed)
                continue
            lines.append(line.strip())
            if lines[-1] == "hanging":
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        watchdog.cancel()
        proc.kill()
        _, stderr = proc.communicate(timeout=30)
    assert lines == ["saved 1", "hanging"], f"{lines}\n{stderr}"
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["mid-write", "before-rename", "mid-rotation"])
def test_sigkill_during_save_keeps_last_good(accelerator: Accelerator, tmp_path: Path, mode: str) -> None:
    script = tmp_path / "kill_me.py"
    script.write_text(KILL_SCRIPT)
    root = tmp_path / "ckpt"
    run_until_killed(script, root, mode)

    if mode == "mid-rotation":
        # The new checkpoint was complete; the old one was out of the step-* namespace before deletion started.
        assert latest_checkpoint(root) == root / "step-00000002"
        trash, kept = entries(root)
        assert re.fullmatch(r"\.trash-step-00000001-\d+", trash) and kept == "step-00000002"
        expected_step = 2
    else:
        assert latest_checkpoint(root) == root / "step-00000001"
        assert entries(root) == [".tmp-step-00000002", "step-00000001"]
        expected_step = 1

    # The surviving checkpoint loads and holds the subprocess's weights (same seed and step here).
    reference, reference_opt = trained_net(accelerator)
    if expected_step == 2:
        with torch.no_grad():
            reference[0].weight.add_(1.0)
    net, opt = trained_net(accelerator, seed=3)
    state = load_checkpoint(accelerator, latest_checkpoint(root), models={"net": net}, optimizers={"opt": opt})
    assert state == {"step": expected_step}
    assert_tree_equal(net.state_dict(), reference.state_dict())
    assert_tree_equal(opt.state_dict(), reference_opt.state_dict())

    # The next save cleans the leftovers.
    save_net(accelerator, root, 3, net, keep_last=None)
    assert not [name for name in entries(root) if name.startswith(".")]


# ------------------------------------------------------------------------------------------------ 5. write errors


def assert_write_failed(error: pytest.ExceptionInfo[UserError], root: Path, reason: str) -> None:
    previous = root / "step-00000001"
    expected = f"could not write checkpoint to {root}: {reason}; the previous checkpoint {previous} is intact"
    assert str(error.value) == expected
    assert entries(root) == ["step-00000001"]  # no temp dir left, previous untouched


def test_disk_full_leaves_previous_intact(
    accelerator: Accelerator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    net, opt = trained_net(accelerator)
    save_checkpoint(accelerator, tmp_path, 1, models={"net": net}, optimizers={"opt": opt}, state={"step": 1})
    before = {p: p.read_bytes() for p in (tmp_path / "step-00000001").rglob("*") if p.is_file()}

    real_save = ck_save.save_tensors
    calls = []

    def fill_disk(path: Path, tensors: Any, metadata: Any = None) -> None:
        calls.append(path.name)
        if path.parent.name == "optimizers":  # a few files in: rng and model already written
            with open(path, "wb") as f:
                f.write(b"\0" * 10)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(path, tensors, metadata)

    monkeypatch.setattr(ck_save, "save_tensors", fill_disk)
    with pytest.raises(UserError) as error:
        save_checkpoint(accelerator, tmp_path, 2, models={"net": net}, optimizers={"opt": opt}, state={"step": 2})
    assert calls == ["rng_0.safetensors", "net.safetensors", "opt.safetensors"]
    assert_write_failed(error, tmp_path, "No space left on device")
    assert before == {p: p.read_bytes() for p in (tmp_path / "step-00000001").rglob("*") if p.is_file()}
    assert load_checkpoint(accelerator, tmp_path / "step-00000001", models={"net": net}) == {"step": 1}


def test_error_while_publishing_leaves_previous_intact(
    accelerator: Accelerator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    net = tiny_net()
    save_net(accelerator, tmp_path, 1, net)

    def rename_fails(tmp: Path, final: Path) -> None:
        raise OSError(errno.EIO, "Input/output error", str(final))

    monkeypatch.setattr(ck_save, "replace_directory", rename_fails)
    with pytest.raises(UserError) as error:
        save_net(accelerator, tmp_path, 2, net)
    assert_write_failed(error, tmp_path, f"Input/output error ({tmp_path / 'step-00000002'})")


def test_error_while_rotating_says_the_new_checkpoint_was_saved(
    accelerator: Accelerator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    net = tiny_net()
    save_net(accelerator, tmp_path, 1, net)

    def rotate_fails(root: Path, keep_last: int, *, keep: Path) -> None:
        raise OSError(errno.EACCES, "Permission denied", str(root / "step-00000001"))

    monkeypatch.setattr(ck_save, "_rotate", rotate_fails)
    with pytest.raises(UserError) as error:
        save_checkpoint(accelerator, tmp_path, 2, models={"net": net}, keep_last=1)
    assert str(error.value) == (f"saved checkpoint {tmp_path / 'step-00000002'}, but could not delete older ones: "
                                f"Permission denied ({tmp_path / 'step-00000001'})")
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000002"


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE (POSIX)")
def test_real_write_error_from_safetensors(accelerator: Accelerator, tmp_path: Path) -> None:
    """A kernel-level write failure inside safetensors' own writer (file size limit, works even as root)."""
    import resource

    net = tiny_net()
    save_net(accelerator, tmp_path, 1, net)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
        with pytest.raises(UserError) as error:
            save_net(accelerator, tmp_path, 2, net)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert re.search(r"File too large", str(error.value))
    assert str(error.value).startswith(f"could not write checkpoint to {tmp_path}: ")
    assert entries(tmp_path) == ["step-00000001"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_root(accelerator: Accelerator, tmp_path: Path) -> None:
    net = tiny_net()
    save_net(accelerator, tmp_path, 1, net)
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(UserError) as error:
            save_net(accelerator, tmp_path, 2, net)
    finally:
        tmp_path.chmod(0o755)
    assert "Permission denied" in str(error.value)
    assert entries(tmp_path) == ["step-00000001"]


def test_unsaveable_state_is_a_user_error(accelerator: Accelerator, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"cannot save checkpoint state: value at 'loader' has type object"):
        save_checkpoint(accelerator, tmp_path, 1, models={"net": tiny_net()}, state={"loader": object()})
    assert entries(tmp_path) == []
    with pytest.raises(UserError, match="keep_last"):
        save_net(accelerator, tmp_path, 1, tiny_net(), keep_last=0)
    with pytest.raises(UserError, match="component name"):
        save_checkpoint(accelerator, tmp_path, 1, models={"../net": tiny_net()})


def test_unsupported_sharded_setups_are_refused(tmp_path: Path) -> None:
    from accelerate.utils import DistributedType

    class FakeFsdp1Accelerator:  # refusing must happen before any collective or file access
        distributed_type = DistributedType.FSDP
        is_fsdp2 = False

    class FakeMegatronAccelerator:
        distributed_type = DistributedType.MEGATRON_LM

    with pytest.raises(UserError, match=r"FSDP version 1 is not supported"):
        save_checkpoint(FakeFsdp1Accelerator(), tmp_path, 1, models={"net": tiny_net()})
    with pytest.raises(UserError, match=r"FSDP version 1 is not supported"):
        load_checkpoint(FakeFsdp1Accelerator(), tmp_path / "step-00000001", models={"net": tiny_net()})
    with pytest.raises(UserError, match=r"MEGATRON_LM is not supported"):
        save_checkpoint(FakeMegatronAccelerator(), tmp_path, 1, models={"net": tiny_net()})
    assert entries(tmp_path) == []


# ------------------------------------------------------------------------------------------------ 6. corruption, resume


def test_truncated_file_is_named(accelerator: Accelerator, tmp_path: Path) -> None:
    net = tiny_net()
    save_net(accelerator, tmp_path, 1, net)
    path = save_net(accelerator, tmp_path, 2, net)
    model_file = path / "models" / "net.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:-16])

    with pytest.raises(UserError) as error:
        load_checkpoint(accelerator, path, models={"net": tiny_net(1)})
    message = str(error.value)
    assert "models/net.safetensors" in message and "truncated" in message
    assert f"--resume {tmp_path / 'step-00000001'}" in message
    with pytest.raises(UserError, match="models/net.safetensors"):
        resolve_resume(str(path), tmp_path)


def test_bad_header_and_changed_bytes_are_named(
    accelerator: Accelerator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save_net(accelerator, tmp_path, 1, tiny_net())
    rng_file = path / "rng_0.safetensors"
    original = rng_file.read_bytes()
    rng_file.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))  # same size, different content
    with pytest.raises(UserError, match=r"rng_0\.safetensors does not match its sha256.*--resume none"):
        load_checkpoint(accelerator, path, models={"net": tiny_net()})
    rng_file.write_bytes(original)

    # A header that does not parse, in a file too big to be hash-checked.
    monkeypatch.setattr(ck_validate, "HASH_VERIFY_MAX_BYTES", 0)
    model_file = path / "models" / "net.safetensors"
    model_file.write_bytes(b"\xff" * model_file.stat().st_size)
    with pytest.raises(UserError, match=r"models/net\.safetensors is not a valid safetensors file"):
        load_checkpoint(accelerator, path, models={"net": tiny_net()})


def test_missing_manifest_is_incomplete(accelerator: Accelerator, tmp_path: Path) -> None:
    path = save_net(accelerator, tmp_path, 1, tiny_net())
    (path / "manifest.json").unlink()
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(UserError, match=r"^incomplete checkpoint .*step-00000001: no manifest\.json"):
        load_checkpoint(accelerator, path, models={"net": tiny_net()})
    with pytest.raises(UserError, match="incomplete checkpoint"):
        resolve_resume(str(path), tmp_path)


def test_resolve_resume(accelerator: Accelerator, tmp_path: Path) -> None:
    root = tmp_path / "run"
    for value in (None, "", "none", "None", "  NONE "):
        assert resolve_resume(value, root) is None
    assert resolve_resume("latest", root) is None  # root does not exist yet
    root.mkdir()
    (root / ".tmp-step-00000009").mkdir()  # a stale temporary is never a candidate
    (root / "step-00000008").mkdir()  # nor is a step dir without manifest
    assert resolve_resume("latest", root) is None

    with pytest.raises(UserError, match=r"^--resume /nonexistent/step-00000001: no such checkpoint"):
        resolve_resume("/nonexistent/step-00000001", root)
    save_net(accelerator, root, 1, tiny_net())
    save_net(accelerator, root, 2, tiny_net())
    assert resolve_resume("latest", root) == root / "step-00000002"
    assert resolve_resume(str(root / "step-00000001"), root) == root / "step-00000001"
    with pytest.raises(UserError, match=r"is a folder of checkpoints.*--resume .*step-00000002"):
        resolve_resume(str(root), root)
    assert ck.checkpoint_step(root / "step-00000002") == 2


# ------------------------------------------------------------------------------------------------ 7. mismatches


def test_model_key_mismatch_names_the_model(accelerator: Accelerator, tmp_path: Path) -> None:
    path = save_net(accelerator, tmp_path, 1, tiny_net())

    bigger = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2), torch.nn.Linear(2, 2))
    before = {k: v.clone() for k, v in bigger.state_dict().items()}
    with pytest.raises(UserError, match=r"does not fit model 'net': missing keys 3\.bias, 3\.weight;"):
        load_checkpoint(accelerator, path, models={"net": bigger})
    assert_tree_equal(dict(bigger.state_dict()), before)  # untouched

    with pytest.raises(UserError, match=r"does not fit model 'net': unexpected keys 2\.bias, 2\.weight"):
        load_checkpoint(accelerator, path, models={"net": torch.nn.Sequential(torch.nn.Linear(4, 8))})
    wider = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    with pytest.raises(UserError, match=r"model 'net': 3 shape mismatches, e\.g\. 0\.bias \[8\] vs model \[16\]"):
        load_checkpoint(accelerator, path, models={"net": wider})
    with pytest.raises(UserError, match=r"has no model 'unet' \(it has: net\)"):
        load_checkpoint(accelerator, path, models={"unet": tiny_net()})


def test_optimizer_and_scheduler_mismatch(accelerator: Accelerator, tmp_path: Path) -> None:
    net, opt = trained_net(accelerator)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    path = save_checkpoint(
        accelerator, tmp_path, 1, models={"net": net}, optimizers={"opt": opt}, schedulers={"lr": sched}
    )
    with pytest.raises(UserError, match=r"holds a AdamW for optimizer 'opt', but the training script built a SGD"):
        load_checkpoint(accelerator, path, optimizers={"opt": torch.optim.SGD(tiny_net().parameters(), lr=0.1)})
    other = torch.optim.AdamW(torch.nn.Linear(4, 4).parameters())
    with pytest.raises(UserError, match=r"does not fit optimizer 'opt'"):
        load_checkpoint(accelerator, path, optimizers={"opt": other})
    with pytest.raises(UserError, match=r"holds a StepLR for scheduler 'lr'"):
        load_checkpoint(accelerator, path, schedulers={"lr": torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)})


# ------------------------------------------------------------------------------------------------ encoding details


def test_structure_encoding_round_trips_exactly() -> None:
    value = {
        "t": (1, 2.5, None, True, "s"),
        "ints": {3: "three", 1: [float("inf"), float("-inf"), float("nan"), -0.0, 1e-310]},
        "counter": Counter({4: 2}),
        "tag_like": {"__tuple__": 1},
        "tensors": [torch.tensor(3.0), torch.arange(6, dtype=torch.int64).reshape(2, 3), torch.tensor([True, False]),
                    torch.randn(2, 2).to(torch.bfloat16), torch.empty(0, 3), torch.randn(4, 4).t()],
        "array": np.arange(5, dtype=np.uint8),
        "np_scalar": np.float32(0.25).item(),
        "big": 2**70,
    }
    for sink in (None, {}):
        encoded = Encoder(sink).encode(value)
        text = json.dumps(encoded, allow_nan=False)
        assert_tree_equal(decode(json.loads(text), sink), value)


def test_scheduler_with_unencodable_entries_keeps_live_values(accelerator: Accelerator, tmp_path: Path) -> None:
    class Warmup:  # a callable object: LambdaLR saves its __dict__, which here holds a function
        def __init__(self) -> None:
            self.fn = lambda step: min(1.0, (step + 1) / 8)
            self.calls = 0

        def __call__(self, step: int) -> float:
            self.calls += 1
            return self.fn(step)

    net, opt = trained_net(accelerator)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, Warmup())
    for _ in range(2):
        opt.step()
        sched.step()
    path = save_checkpoint(accelerator, tmp_path, 1, models={"net": net}, schedulers={"lr": sched})
    saved = json.loads((path / "schedulers" / "lr.json").read_text())
    assert saved["dropped"] == [["lr_lambdas", 0, "fn"]]

    net2, opt2 = trained_net(accelerator)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, Warmup())
    load_checkpoint(accelerator, path, schedulers={"lr": sched2})
    assert sched2.last_epoch == 2 and sched2.lr_lambdas[0].calls == 3 and callable(sched2.lr_lambdas[0].fn)
    for optimizer, scheduler in ((opt, sched), (opt2, sched2)):
        optimizer.step()
        scheduler.step()
    assert sched2.get_last_lr() == sched.get_last_lr() and sched.get_last_lr() != [1e-2]


# ------------------------------------------------------------------------------------------------ two processes, gloo

DDP_SCRIPT = textwrap.dedent(
    """
    import errno, json, os, random, sys
    import numpy as np
    import torch
    from accelerate import Accelerator
    import ldm.checkpoint as ck
    import ldm.checkpoint.save as ck_save
    from ldm.errors import UserError

    root = sys.argv[1]
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net, opt = accelerator.prepare(net, opt)
    torch.manual_seed(100 + rank); np.random.seed(100 + rank); random.seed(100 + rank)

    def train(steps):
        for _ in range(steps):
            accelerator.backward(net(torch.randn(3, 4)).pow(2).sum())
            opt.step(); opt.zero_grad()

    def draws():
        return [torch.rand(2).tolist(), np.random.rand(2).tolist(), random.random()]

    train(2)
    path = ck.save_checkpoint(accelerator, root, 2, models={"net": net}, optimizers={"opt": opt}, state={"step": 2})
    weights = {k: v.clone() for k, v in accelerator.unwrap_model(net).state_dict().items()}
    first = draws()
    train(2)
    state = ck.load_checkpoint(accelerator, path, models={"net": net}, optimizers={"opt": opt})
    same_weights = all(torch.equal(v, weights[k]) for k, v in accelerator.unwrap_model(net).state_dict().items())
    second = draws()

    # Only rank 1 fails to write: every rank must raise, none may hang.
    if rank == 1:
        def disk_full(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        ck_save.write_rng = disk_full
    try:
        ck.save_checkpoint(accelerator, root, 3, models={"net": net}, optimizers={"opt": opt})
        error = None
    except UserError as e:
        error = str(e)
    print("RESULT " + json.dumps({"rank": rank, "first": first, "second": second, "state": state,
                                  "same_weights": same_weights, "error": error}), flush=True)
    # without this, gloo's threads can abort the interpreter at exit ("terminate called without an active exception")
    accelerator.end_training()  # destroys the process group
    # torch 2.14's gloo threads sometimes abort interpreter teardown ("terminate called without an active
    # exception") after all the work above is done; skip the teardown so the test measures the checkpoint code
    os._exit(0)
    """
)


@pytest.mark.slow
def test_two_processes_save_load_and_fail_together(tmp_path: Path) -> None:
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    root = tmp_path / "ckpt"
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
        }
        cmd = [sys.executable, str(script), str(root)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True))
    results = {}
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0, out
            result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[len("RESULT ") :])
            results[result["rank"]] = result
    finally:
        for proc in procs:
            proc.kill()

    path = root / "step-00000002"
    assert sorted(p.name for p in path.glob("rng_*")) == ["rng_0.safetensors", "rng_1.safetensors"]
    assert json.loads((path / "manifest.json").read_text())["world_size"] == 2
    for rank in (0, 1):
        r = results[rank]
        assert r["state"] == {"step": 2} and r["same_weights"]
        assert r["first"] == r["second"]  # each process got its own RNG stream back
        assert r["error"] == f"could not write checkpoint to {root}: No space left on device" + (
            "" if rank == 1 else " (on process 1)"
        ) + f"; the previous checkpoint {path} is intact"
    assert results[0]["first"] != results[1]["first"]
    assert entries(root) == ["step-00000002"]
