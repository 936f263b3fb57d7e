"""Stage-2 training under FSDP2, with 2 CPU processes (tests/fsdp_on_cpu.py): it trains the same weights as DDP,
resumes exactly, and its checkpoints (whole tensors) resume under DDP too."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import accelerate_launch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from ldm.unet.presets import build_unet
from ldm.unet.tiny import write_tiny_stage2_inputs

ROOT = Path(__file__).resolve().parents[1]
SHIM = Path(__file__).with_name("fsdp_on_cpu.py")
RUNS: dict[str, Path] = {}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Four 2-process runs of 4 steps on one latent cache: FSDP, DDP, FSDP resumed at step 2, DDP resumed from
    the FSDP run's step-2 checkpoint."""
    root = tmp_path_factory.mktemp("fsdp")
    parts = write_tiny_stage2_inputs(root / "parts", num_images=64)
    common = [
        "--config", str(ROOT / "configs/ldm/tiny.yaml"), f"data.path={parts['data']}", f"cache.vae={parts['vae']}",
        f"text_encoder.path={parts['text']}", f"cache.dir={root / 'latents'}", "train.report_to=none",
        "train.cpu=true", "train.log_every=1", "train.max_steps=4", "train.batch_size=4", "train.grad_accum=2",
        "train.checkpoint_every=2", "train.caption_dropout=0.3", "optim.warmup_steps=1", "noise.min_snr_gamma=5",
        "sample.every=2", "sample.steps=2", "sample.prompts=[a,b,c]",  # 3 prompts on 2 processes: uneven shares
    ]
    plans = {
        "fsdp": (True, []),
        "ddp": (False, []),
        "fsdp-resumed": (True, ["--resume", str(root / "fsdp/checkpoints/step-00000002")]),
        "ddp-from-fsdp": (False, ["--resume", str(root / "fsdp/checkpoints/step-00000002")]),
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, (fsdp, extra) in plans.items():
        script = [str(SHIM), str(ROOT / "train/train_ldm.py")] if fsdp else [str(ROOT / "train/train_ldm.py")]
        cmd = accelerate_launch(Path(script[0]), *script[1:], *common, f"train.output_dir={root / name}", *extra)
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, f"{name}:\n{result.stderr[-4000:]}"
        (root / f"{name}.log").write_text(result.stderr)
    RUNS.update({name: root / name for name in plans})
    return root


def weights(run: Path, part: str, step: int = 4) -> dict[str, torch.Tensor]:
    return load_file(run / f"checkpoints/step-{step:08d}" / part)


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """L2 norm of the difference over all tensors."""
    assert a.keys() == b.keys()
    return sum((a[k].double() - b[k].double()).pow(2).sum().item() for k in a) ** 0.5


def matches_ddp(run: Path, part: str) -> bool:
    """`run`'s step-4 tensors are the DDP run's up to float summation order: their distance is under 2% of how far
    the DDP run itself moved from step 2 to step 4. (Adam divides by sqrt(v), so where a gradient is ~0 a last-bit
    difference changes that element's step by up to lr: bit equality is not to be had across different reductions.)"""
    ddp = weights(RUNS["ddp"], part)
    return distance(weights(run, part), ddp) < 0.02 * distance(ddp, weights(RUNS["ddp"], part, step=2))


@pytest.mark.slow
def test_fsdp_shards_and_trains_what_ddp_trains(runs):
    assert "FSDP2: the U-Net, its optimizer state and EMA are sharded over 2 processes" in (runs / "fsdp.log").read_text()
    assert "replicas identical" not in (runs / "fsdp.log").read_text()
    assert json.loads((runs / "fsdp/checkpoints/step-00000004/state.json").read_text())["batches_consumed"] == [8, 8]
    # the same data, noise and updates; only the order of floating-point sums differs (reduce-scatter vs all-reduce)
    for part in ("models/unet.safetensors", "ema/unet.safetensors"):
        fsdp, ddp = weights(runs / "fsdp", part), weights(runs / "ddp", part)
        assert sum(v.numel() for v in fsdp.values()) == sum(v.numel() for v in ddp.values())  # whole, not a shard
        assert matches_ddp(runs / "fsdp", part), part
    ema = weights(runs / "fsdp", "ema/unet.safetensors")  # the export holds the EMA weights, gathered whole
    shadow = [ema[f"shadow_params/{i}"] for i in range(len(ema))]
    exported = list(UNet2DConditionModel.from_pretrained(runs / "fsdp/model/unet").parameters())
    assert len(shadow) == len(exported) and all(torch.equal(s, p) for s, p in zip(shadow, exported))


@pytest.mark.slow
def test_fsdp_resume_is_exact_and_checkpoints_resume_under_ddp(runs):
    for part in ("models/unet.safetensors", "ema/unet.safetensors", "optimizers/unet.safetensors"):
        a, b = weights(runs / "fsdp", part), weights(runs / "fsdp-resumed", part)
        assert [k for k in a if not torch.equal(a[k], b[k])] == [], part
    assert "resumed from" in (runs / "ddp-from-fsdp.log").read_text()
    for part in ("models/unet.safetensors", "ema/unet.safetensors"):
        assert matches_ddp(runs / "ddp-from-fsdp", part), part


@pytest.mark.slow
def test_fsdp_with_bf16_mixed_precision(runs, tmp_path):
    """bf16 compute under FSDP2 (accelerate's MixedPrecisionPolicy), with fp32 master weights saved and exported."""
    args = [str(ROOT / "train/train_ldm.py"), "--config", str(ROOT / "configs/ldm/tiny.yaml"),
            f"data.path={runs / 'parts/shapes'}", f"cache.vae={runs / 'parts/vae'}", f"text_encoder.path={runs / 'parts/text'}",
            f"cache.dir={tmp_path / 'latents'}", "train.report_to=none", "train.cpu=true", "train.max_steps=2",
            "train.batch_size=4", "train.mixed_precision=bf16", "sample.every=2", "sample.steps=2",
            "sample.prompts=[a,b,c]", f"train.output_dir={tmp_path / 'run'}"]
    cmd = accelerate_launch(SHIM, *args)
    cmd[cmd.index("--mixed_precision") + 1] = "bf16"
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
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
