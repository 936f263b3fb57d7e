"""Stage-2 training sharded over 2 CPU processes (gloo) under FSDP2 (tests/fsdp_on_cpu.py) and DeepSpeed ZeRO-2
(tests/deepspeed_on_cpu.py, the shipped configs/accelerate/deepspeed-zero2.yaml), against DDP: each trains the weights
DDP trains, validates as DDP does, resumes bit-exactly, and its checkpoints (whole fp32 tensors) resume under the other
backends; bf16 keeps fp32 master and EMA weights; ZeRO-2 skips, counts and stops on non-finite steps.

One set of runs serves every check, on the tiny SDXL model (two text towers, pooled embedding, time ids: the family
with the most conditioning to keep in step; the backends do not depend on the family): 4 steps of 2 micro-batches,
caption dropout, min-SNR weighting, 3 sample prompts on 2 processes (uneven shares) and 5 held-out images validated
in batches of 2 (rank 1 pads its last batch) at steps 2 and 4.
"""

from __future__ import annotations

import importlib.util
import json
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
from safetensors import safe_open
from safetensors.torch import load_file

from ldm.errors import UserError
from ldm.parallel.zero import configure_zero
from ldm.unet.presets import build_unet

ROOT = Path(__file__).resolve().parents[1]
FSDP_SHIM = Path(__file__).with_name("fsdp_on_cpu.py")
ZERO_SHIM = Path(__file__).with_name("deepspeed_on_cpu.py")
ZERO_CONFIG = ROOT / "configs/accelerate/deepspeed-zero2.yaml"
SCRIPT = ROOT / "train/train_ldm.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAVE_DEEPSPEED, reason="deepspeed is not installed (the test extra has it)")
STEP2 = "checkpoints/step-00000002"
# the first test also waits for the fixture's 8 two-process runs (~6 min on 2 idle cores; more on a loaded machine)
pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from ldm.demo.shapes import write_dataset

    return write_dataset(tmp_path_factory.mktemp("shapes") / "shapes", num_images=16, seed=0, size=32, overwrite=True)


def train_args(out: Path, model: Path, shapes: Path, *extra: str) -> list[str]:
    """A from-scratch SDXL run: the tiny SDXL model's towers and VAE, the sdxl-tiny U-Net, 32-px shapes."""
    return [str(SCRIPT), "--config", str(ROOT / "configs/ldm/tiny.yaml"), f"train.output_dir={out}",
            f"data.path={shapes}", f"cache.vae={model / 'vae'}", "text_encoder.kind=sdxl", f"text_encoder.path={model}",
            "model.preset=sdxl-tiny", "train.report_to=none", "train.cpu=true", "train.log_every=1",
            "train.max_steps=4", "train.batch_size=2", "train.grad_accum=2", "train.checkpoint_every=2",
            "train.caption_dropout=0.3", "optim.warmup_steps=1", "noise.min_snr_gamma=5", "sample.every=2",
            "sample.steps=2", "sample.prompts=[a,b,c]", "data.num_val=5", "train.val_every=2", *extra]


def zero_launch(*args: str, mixed_precision: str = "no") -> list[str]:
    ddp = accelerate_launch(ZERO_SHIM, *args)  # for its free port
    port = ddp[ddp.index("--main_process_port") + 1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ZERO_CONFIG), "--num_processes",
            "2", "--mixed_precision", mixed_precision, "--main_process_port", port, str(ZERO_SHIM), *args]


def launch(kind: str, args: list[str], mixed_precision: str = "no") -> list[str]:
    if kind == "zero":
        return zero_launch(*args, mixed_precision=mixed_precision)
    cmd = accelerate_launch(FSDP_SHIM, *args) if kind == "fsdp" else accelerate_launch(Path(args[0]), *args[1:])
    cmd[cmd.index("--mixed_precision") + 1] = mixed_precision
    return cmd


def run(cmd: list[str], log: Path, expect: int = 0) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV, check=False)
    log.write_text(result.stderr)
    assert result.returncode == expect, f"{log.name}:\n{result.stderr[-4000:]}"
    return result.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_sdxl_model, shapes) -> Path:
    """DDP, FSDP2 and ZeRO-2 from the start; each sharded backend resumed from its own step-2 checkpoint; DDP from
    FSDP2's, FSDP2 from ZeRO-2's and ZeRO-2 from DDP's (DDP from ZeRO-2's: the layout check below). One latent cache."""
    root = tmp_path_factory.mktemp("sharded")
    plans = {"ddp": ("ddp", None), "fsdp": ("fsdp", None), "fsdp-resumed": ("fsdp", "fsdp"),
             "ddp-from-fsdp": ("ddp", "fsdp")}
    if HAVE_DEEPSPEED:
        plans |= {"zero": ("zero", None), "zero-resumed": ("zero", "zero"), "fsdp-from-zero": ("fsdp", "zero"),
                  "zero-from-ddp": ("zero", "ddp")}
    for name, (kind, source) in plans.items():
        resume = ["--resume", str(root / source / STEP2)] if source else []
        args = train_args(root / name, tiny_sdxl_model, shapes, f"cache.dir={root / 'latents'}", *resume)
        run(launch(kind, args), root / f"{name}.log")
    return root


def weights(run: Path, part: str, step: int = 4) -> dict[str, torch.Tensor]:
    return load_file(run / f"checkpoints/step-{step:08d}" / part)


def matches_ddp(runs: Path, name: str, part: str) -> bool:
    """`name`'s step-4 tensors are the DDP run's up to float summation order: their distance is under 2% of how far
    the DDP run itself moved from step 2 to step 4 (measured: 0.1%). (Adam divides by sqrt(v), so where a gradient is
    ~0 a last-bit difference changes that element's step by up to lr: bit equality is not to be had across different
    reductions, reduce-scatter vs all-reduce.)"""
    ddp, other = weights(runs / "ddp", part), weights(runs / name, part)
    assert other.keys() == ddp.keys()
    assert sum(v.numel() for v in other.values()) == sum(v.numel() for v in ddp.values())  # whole, not a shard

    def dist(a: dict, b: dict) -> float:
        return sum((a[k].double() - b[k].double()).pow(2).sum().item() for k in a) ** 0.5
    return dist(other, ddp) < 0.02 * dist(ddp, weights(runs / "ddp", part, step=2))


def assert_exports_the_ema(run: Path) -> None:
    ema = weights(run, "ema/unet.safetensors")  # the export holds the EMA weights, gathered whole
    shadow = [ema[f"shadow_params/{i}"] for i in range(len(ema))]
    exported = list(UNet2DConditionModel.from_pretrained(run / "model/unet").parameters())
    assert len(shadow) == len(exported) and all(torch.equal(s, p) for s, p in zip(shadow, exported))


def assert_bit_exact_resume(runs: Path, name: str) -> None:
    for part in ("models/unet.safetensors", "ema/unet.safetensors", "optimizers/unet.safetensors"):
        a, b = weights(runs / name, part), weights(runs / f"{name}-resumed", part)
        assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == [], part


def val_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "checkpoints/val_loss.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------- DDP, FSDP2


@pytest.mark.slow
def test_ddp_replicas_are_identical(runs):
    assert "replicas identical across 2 processes" in (runs / "ddp.log").read_text()
    assert json.loads((runs / "ddp/checkpoints/step-00000004/state.json").read_text())["batches_consumed"] == [8, 8]


@pytest.mark.slow
def test_fsdp_shards_and_trains_what_ddp_trains(runs):
    log = (runs / "fsdp.log").read_text()
    assert "FSDP2: the U-Net, its optimizer state and EMA are sharded over 2 processes" in log
    assert "replicas identical" not in log
    assert json.loads((runs / "fsdp/checkpoints/step-00000004/state.json").read_text())["batches_consumed"] == [8, 8]
    for part in ("models/unet.safetensors", "ema/unet.safetensors"):
        assert matches_ddp(runs, "fsdp", part), part
    assert_exports_the_ema(runs / "fsdp")


@pytest.mark.slow
def test_fsdp_resume_is_exact_and_checkpoints_resume_under_ddp(runs):
    assert_bit_exact_resume(runs, "fsdp")
    assert "resumed from" in (runs / "ddp-from-fsdp.log").read_text()
    for part in ("models/unet.safetensors", "ema/unet.safetensors"):
        assert matches_ddp(runs, "ddp-from-fsdp", part), part


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fsdp", pytest.param("zero", marks=needs_deepspeed)])
def test_sharded_runs_validate_as_ddp_does(runs, name):
    """Every forward pass of a sharded U-Net gathers weights from both processes: the padded batch keeps them in step
    (a process short of a batch would hang the other). The numbers follow DDP's."""
    ddp, other = val_rows(runs / "ddp"), val_rows(runs / name)
    assert [row["step"] for row in other] == [row["step"] for row in ddp] == [2, 4]
    for mine, theirs in zip(other, ddp):
        for kind in ("raw", "ema"):
            assert mine[kind]["count"] == theirs[kind]["count"] == 20  # 5 images x 4 bands, each once
            # weights equal to DDP's up to summation order (see matches_ddp): measured within 3e-8 relative
            assert mine[kind]["loss"] == pytest.approx(theirs[kind]["loss"], rel=1e-5), (mine["step"], kind)


@pytest.mark.slow
def test_fsdp_with_bf16_mixed_precision(runs, tmp_path, tiny_sdxl_model, shapes):
    """bf16 compute under FSDP2 (accelerate's MixedPrecisionPolicy), with fp32 master weights saved and exported."""
    args = train_args(tmp_path / "run", tiny_sdxl_model, shapes, f"cache.dir={runs / 'latents'}", "train.max_steps=2",
                      "train.mixed_precision=bf16", "data.num_val=0")
    run(launch("fsdp", args, mixed_precision="bf16"), tmp_path / "run.log")
    exported = load_file(tmp_path / "run/model/unet/diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in exported.values()} == {torch.float32}
    assert all(torch.isfinite(v).all() for v in exported.values())


def test_the_shim_runs_what_the_shipped_fsdp_config_asks_for():
    import yaml
    from fsdp_on_cpu import WRAPPED_CLASSES

    shipped = yaml.safe_load((ROOT / "configs/accelerate/fsdp.yaml").read_text())
    assert shipped["distributed_type"] == "FSDP" and shipped["fsdp_config"]["fsdp_version"] == 2
    assert shipped["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"].split(",") == WRAPPED_CLASSES
    unet = build_unet("tiny", sample_size=8, latent_channels=4, cross_attention_dim=32)
    present = {type(m).__name__ for m in unet.modules()}
    assert set(WRAPPED_CLASSES) <= present  # the policy shards block by block, not the whole U-Net as one unit


def test_inference_leaves_the_shards_to_the_next_forward():
    """After forward passes without a backward (validation, samples) FSDP2 keeps the root unit's parameters whole:
    `parameters()` gives plain tensors, and a later forward reuses them even when the shards changed (an EMA swapped
    in and out). `reshard_after_inference` puts them back. One process (gloo, world size 1) shows it."""
    import tempfile

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from ldm.parallel.fsdp import reshard_after_inference

    dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Sequential(torch.nn.Linear(4, 4)))
        plain = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Sequential(torch.nn.Linear(4, 4)))
        plain.load_state_dict(model.state_dict())
        fully_shard(model[1])
        fully_shard(model)
        shards = list(model.parameters())  # what an EMA swap writes into
        x = torch.randn(2, 4)

        def shift_the_shards(by: float) -> None:
            with torch.no_grad():
                for p, q in zip(shards, plain.parameters()):
                    p.add_(by)
                    q.add_(by)

        with torch.no_grad():
            model(x)
            assert not all(isinstance(p, DTensor) for p in model.parameters())  # the root's stayed whole
            shift_the_shards(0.5)
            assert not torch.allclose(model(x), plain(x))  # the root's stale whole weights were used: the bug
            reshard_after_inference(model)
            assert all(isinstance(p, DTensor) for p in model.parameters())
            shift_the_shards(0.5)
            assert torch.allclose(model(x), plain(x), atol=1e-6)  # every shard's change is seen
            reshard_after_inference(torch.nn.Linear(2, 2))  # no FSDP: nothing to do
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------- ZeRO-2


@pytest.mark.slow
@needs_deepspeed
def test_zero2_trains_what_ddp_trains_and_exports_the_ema(runs):
    log = (runs / "zero.log").read_text()
    assert "DeepSpeed ZeRO-2: micro-batch 2, gradient accumulation 2, clipping 1.0" in log
    assert "partitioned over 2 processes" in log and "replicas identical across 2 processes" in log
    for part in ("models/unet.safetensors", "ema/unet.safetensors"):
        assert matches_ddp(runs, "zero", part), part
    assert_exports_the_ema(runs / "zero")


def checkpoint_layout(step_dir: Path) -> dict[str, object]:
    """Every file of a checkpoint but the RNG states, with each tensor's dtype and shape and the files' metadata
    (the optimizer's structure: parameter names, param groups)."""
    layout: dict[str, object] = {}
    for path in sorted(step_dir.rglob("*.safetensors")):
        if path.name.startswith("rng_"):
            continue
        with safe_open(str(path), framework="pt") as f:
            layout[str(path.relative_to(step_dir))] = (
                f.metadata(), {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()})
    return layout


@pytest.mark.slow
@needs_deepspeed
def test_zero2_resume_is_exact_and_checkpoints_move_between_zero2_ddp_and_fsdp(runs):
    assert_bit_exact_resume(runs, "zero")
    optimizer = weights(runs / "zero", "optimizers/unet.safetensors")
    assert "state/conv_in.weight/exp_avg" in optimizer  # whole moments, keyed by parameter name as under FSDP
    for name in ("fsdp-from-zero", "zero-from-ddp"):
        assert "resumed from" in (runs / f"{name}.log").read_text()
        for part in ("models/unet.safetensors", "ema/unet.safetensors"):
            assert matches_ddp(runs, name, part), (name, part)
    # ZeRO-2 writes FSDP2's layout file for file, tensor for tensor (names, dtypes, shapes, optimizer structure), so
    # DDP resumes from it exactly as from FSDP2's (ddp-from-fsdp above)
    assert checkpoint_layout(runs / "zero" / STEP2) == checkpoint_layout(runs / "fsdp" / STEP2)


@pytest.mark.slow
@needs_deepspeed
def test_zero2_with_bf16_keeps_fp32_master_and_ema_weights_and_resumes_exactly(runs, tmp_path, tiny_sdxl_model, shapes):
    def args(out: str, *extra: str) -> list[str]:
        return train_args(tmp_path / out, tiny_sdxl_model, shapes, f"cache.dir={runs / 'latents'}", "train.max_steps=2",
                          "train.checkpoint_every=1", "train.mixed_precision=bf16", "data.num_val=0",
                          "sample.every=0", *extra)

    run(launch("zero", args("run"), mixed_precision="bf16"), tmp_path / "run.log")
    resume = ["--resume", str(tmp_path / "run/checkpoints/step-00000001")]
    log = run(launch("zero", args("resumed", *resume), mixed_precision="bf16"), tmp_path / "resumed.log")
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
@needs_deepspeed
def test_zero2_skips_counts_and_stops_on_nonfinite_steps(runs, tmp_path, tiny_sdxl_model, shapes):
    # lr=1e30: the first step moves every weight by ~1e30; DeepSpeed then refuses each non-finite update
    args = train_args(tmp_path / "run", tiny_sdxl_model, shapes, f"cache.dir={runs / 'latents'}", "optim.lr=1e30",
                      "optim.warmup_steps=0", "train.max_steps=10", "train.max_nonfinite_steps=3",
                      "train.checkpoint_every=100", "sample.every=0", "data.num_val=0")
    log = run(launch("zero", args), tmp_path / "run.log", expect=1)
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
