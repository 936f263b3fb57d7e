"""Stage-2 training under DeepSpeed ZeRO-2, with 2 CPU processes (tests/deepspeed_on_cpu.py, the shipped
configs/accelerate/deepspeed-zero2.yaml): it trains the same weights as DDP, resumes exactly, its checkpoints (whole
fp32 tensors) resume under DDP and FSDP and the other way round, bf16 keeps fp32 master and EMA weights, and non-finite steps
are skipped and counted."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import accelerate_launch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from ldm.errors import UserError
from ldm.parallel.zero import configure_zero
from ldm.unet.tiny import write_tiny_stage2_inputs

pytest.importorskip("deepspeed")
ROOT = Path(__file__).resolve().parents[1]
SHIM = Path(__file__).with_name("deepspeed_on_cpu.py")
FSDP_SHIM = Path(__file__).with_name("fsdp_on_cpu.py")
CONFIG = ROOT / "configs/accelerate/deepspeed-zero2.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def zero_launch(*args: str, mixed_precision: str = "no") -> list[str]:
    ddp = accelerate_launch(SHIM, *args)  # for its free port
    port = ddp[ddp.index("--main_process_port") + 1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG), "--num_processes", "2",
            "--mixed_precision", mixed_precision, "--main_process_port", port, str(SHIM), *args]


def train_args(root: Path, out: Path, *extra: str) -> list[str]:
    return [str(ROOT / "train/train_ldm.py"), "--config", str(ROOT / "configs/ldm/tiny.yaml"),
            f"data.path={root / 'parts/shapes'}", f"cache.vae={root / 'parts/vae'}", f"text_encoder.path={root / 'parts/text'}",
            f"cache.dir={root / 'latents'}", "train.report_to=none", "train.cpu=true", "train.log_every=1",
            "train.max_steps=4", "train.batch_size=4", "train.grad_accum=2", "train.checkpoint_every=2",
            "train.caption_dropout=0.3", "optim.warmup_steps=1", "noise.min_snr_gamma=5", "sample.every=2",
            "sample.steps=2", "sample.prompts=[a,b,c]", f"train.output_dir={out}", *extra]


def run(cmd: list[str], log: Path, expect: int = 0) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV, check=False)
    log.write_text(result.stderr)
    assert result.returncode == expect, f"{log.name}:\n{result.stderr[-4000:]}"
    return result.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """2-process runs of 4 steps on one latent cache: ZeRO-2, DDP, ZeRO-2 resumed at step 2, DDP and FSDP resumed
    from the ZeRO-2 step-2 checkpoint, and ZeRO-2 resumed from the DDP one."""
    root = tmp_path_factory.mktemp("zero")
    write_tiny_stage2_inputs(root / "parts", num_images=64)
    step2 = "checkpoints/step-00000002"
    plans = {
        "zero": ("zero", []),
        "ddp": ("ddp", []),
        "zero-resumed": ("zero", ["--resume", str(root / "zero" / step2)]),
        "ddp-from-zero": ("ddp", ["--resume", str(root / "zero" / step2)]),
        "fsdp-from-zero": ("fsdp", ["--resume", str(root / "zero" / step2)]),
        "zero-from-ddp": ("zero", ["--resume", str(root / "ddp" / step2)]),
    }
    for name, (kind, extra) in plans.items():
        args = train_args(root, root / name, *extra)
        if kind == "zero":
            cmd = zero_launch(*args)
        else:
            cmd = accelerate_launch(FSDP_SHIM, *args) if kind == "fsdp" else accelerate_launch(Path(args[0]), *args[1:])
        run(cmd, root / f"{name}.log")
    return root


def weights(run: Path, part: str, step: int = 4) -> dict[str, torch.Tensor]:
    return load_file(run / f"checkpoints/step-{step:08d}" / part)


def relative_distance(runs: Path, name: str, part: str) -> float:
    """Distance of `name`'s step-4 tensors from the DDP run's, relative to how far DDP moved from step 2 to 4
    (as in test_fsdp.py: only the order of floating-point sums differs, which Adam amplifies where gradients ~0)."""
    ddp, other = weights(runs / "ddp", part), weights(runs / name, part)
    assert other.keys() == ddp.keys()

    def dist(a: dict, b: dict) -> float:
        return sum((a[k].double() - b[k].double()).pow(2).sum().item() for k in a) ** 0.5
    return dist(other, ddp) / dist(ddp, weights(runs / "ddp", part, step=2))


@pytest.mark.slow
def test_zero2_trains_what_ddp_trains_and_exports_the_ema(runs):
    log = (runs / "zero.log").read_text()
    assert "DeepSpeed ZeRO-2: micro-batch 4, gradient accumulation 2, clipping 1.0" in log
    assert "partitioned over 2 processes" in log and "replicas identical across 2 processes" in log
    for part in ("models/unet.safetensors", "ema/unet.safetensors"):
        assert relative_distance(runs, "zero", part) < 0.02, part  # measured 0.1%
    ema = weights(runs / "zero", "ema/unet.safetensors")
    exported = list(UNet2DConditionModel.from_pretrained(runs / "zero/model/unet").parameters())
    assert len(ema) == len(exported) and all(torch.equal(ema[f"shadow_params/{i}"], p) for i, p in enumerate(exported))


@pytest.mark.slow
def test_zero2_resume_is_exact_and_checkpoints_move_between_zero2_ddp_and_fsdp(runs):
    for part in ("models/unet.safetensors", "ema/unet.safetensors", "optimizers/unet.safetensors"):
        a, b = weights(runs / "zero", part), weights(runs / "zero-resumed", part)
        assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == [], part
    optimizer = weights(runs / "zero", "optimizers/unet.safetensors")
    assert "state/conv_in.weight/exp_avg" in optimizer  # whole moments, keyed by parameter name as under FSDP
    for name in ("ddp-from-zero", "fsdp-from-zero", "zero-from-ddp"):
        assert "resumed from" in (runs / f"{name}.log").read_text()
        for part in ("models/unet.safetensors", "ema/unet.safetensors"):
            assert relative_distance(runs, name, part) < 0.02, (name, part)


@pytest.mark.slow
def test_zero2_with_bf16_keeps_fp32_master_and_ema_weights_and_resumes_exactly(runs, tmp_path):
    bf16 = ["train.max_steps=2", "train.checkpoint_every=1", "train.mixed_precision=bf16"]
    run(zero_launch(*train_args(runs, tmp_path / "run", *bf16), mixed_precision="bf16"), tmp_path / "run.log")
    resume = ["--resume", str(tmp_path / "run/checkpoints/step-00000001")]
    log = run(zero_launch(*train_args(runs, tmp_path / "resumed", *bf16, *resume), mixed_precision="bf16"),
              tmp_path / "resumed.log")
    assert "resume is not bit-exact" not in log  # the bf16 module is cast, but the fp32 masters load exactly
    for part in ("models/unet.safetensors", "ema/unet.safetensors", "optimizers/unet.safetensors"):
        a, b = weights(tmp_path / "run", part, step=2), weights(tmp_path / "resumed", part, step=2)
        assert [k for k in a if not torch.equal(a[k], b[k])] == [], part
    saved = weights(tmp_path / "run", "models/unet.safetensors", step=2)
    exported = load_file(tmp_path / "run/model/unet/diffusion_pytorch_model.safetensors")
    for tensors in (saved, exported):
        assert {v.dtype for v in tensors.values()} == {torch.float32}
        assert all(torch.isfinite(v).all() for v in tensors.values())
        # the engine computes with bf16 copies, but what is saved is not rounded to bf16
        assert sum(int((v != v.bfloat16().float()).sum()) for v in tensors.values()) > 0.9 * sum(
            v.numel() for v in tensors.values())


@pytest.mark.slow
def test_zero2_skips_counts_and_stops_on_nonfinite_steps(runs, tmp_path):
    # lr=1e30: the first step moves every weight by ~1e30; DeepSpeed then refuses each non-finite update
    args = train_args(runs, tmp_path / "run", "optim.lr=1e30", "optim.warmup_steps=0", "train.max_steps=10",
                      "train.max_nonfinite_steps=3", "train.checkpoint_every=100", "sample.every=0")
    log = run(zero_launch(*args), tmp_path / "run.log", expect=1)
    skipped = re.findall(r"\[rank 0\] WARNING ldm.training.run: step (\d+): non-finite loss or gradient, step skipped "
                         r"\((\d+) in a row\)", log)
    assert [int(n) for _, n in skipped] == [1, 2, 3], skipped
    assert "error: 3 non-finite steps in a row at step 1: training stopped, this state is saved in " in log
    assert (tmp_path / "run/checkpoints/step-00000001/manifest.json").exists()


def fake_accelerator(zero: dict, **extra) -> SimpleNamespace:
    plugin = SimpleNamespace(deepspeed_config={"zero_optimization": zero, "gradient_accumulation_steps": 1, **extra})
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=8,
                           gradient_accumulation_steps=1)


def test_configure_zero_takes_batch_accumulation_and_clipping_from_the_training_config():
    accelerator = fake_accelerator({"stage": 2}, gradient_clipping="auto")
    configure_zero(accelerator, micro_batch=4, grad_accum=3, max_grad_norm=0.5)
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"],
            ds["gradient_clipping"]) == (4, 3, 96, 0.5)
    assert accelerator.gradient_accumulation_steps == 3


@pytest.mark.parametrize("zero, extra, message", [
    ({"stage": 3}, {}, "DeepSpeed ZeRO stage 3 is not supported: set zero_stage: 2 (or 1)"),
    ({"stage": 0}, {}, "DeepSpeed ZeRO stage 0 is not supported"),
    ({"stage": 2, "offload_optimizer": {"device": "cpu"}}, {}, "DeepSpeed offload_optimizer to cpu is not supported"),
    ({"stage": 2}, {"optimizer": {"type": "AdamW"}}, "the DeepSpeed config has an 'optimizer' section: remove it"),
])
def test_configure_zero_refuses_what_ldm_does_not_support(zero, extra, message):
    with pytest.raises(UserError, match=re.escape(message)):
        configure_zero(fake_accelerator(zero, **extra), micro_batch=4, grad_accum=1, max_grad_norm=1.0)
