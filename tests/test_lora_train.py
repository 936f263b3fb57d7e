"""LoRA training (ldm/lora/, train/train_ldm.py with lora.enabled): only the adapter trains and is saved, exact resume,
2 processes, fp32 adapters under fp16 autocast, and both saved formats load in diffusers with the same U-Net output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import accelerate_launch
from ldm.data.shapes import NEW_COLORS, new_color_combinations, render
from ldm.errors import UserError
from ldm.eval.reader import read_attributes
from ldm.lora.config import LoRAConfig
from ldm.lora.export import require_lora_backend
from ldm.lora.train import AdapterWeights, add_lora, check_targets
from ldm.unet.presets import build_unet
from ldm.unet.tiny import write_tiny_stage2_inputs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train"))
import train_ldm  # noqa: E402

# rank != alpha: a kohya file that recorded alpha = rank (diffusers' converter does) would load at 3/2 the strength
LORA = ["lora.enabled=true", "lora.rank=2", "lora.alpha=3", "lora.name=tiny",
        "lora.targets=[to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2]"]


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    """Tiny stage-2 inputs and a base model (1 full training step, exported): what a LoRA run fine-tunes."""
    root = tmp_path_factory.mktemp("lora")
    parts = write_tiny_stage2_inputs(root / "parts", num_images=32)
    train_ldm.main(args(root / "base", parts, "train.max_steps=1", "train.ema_decay=0",
                        f"cache.dir={root / 'latents-base'}"))
    reset_accelerate()
    return {**parts, "model": root / "base/model", "root": root}


def args(out: Path, parts: dict[str, Path], *overrides: str) -> list[str]:
    return ["--config", str(ROOT / "configs/ldm/tiny.yaml"), f"train.output_dir={out}", f"data.path={parts['data']}",
            f"cache.vae={parts['vae']}", f"text_encoder.path={parts['text']}", "train.report_to=none",
            "train.log_every=1", "sample.every=0", "train.batch_size=4", *overrides]


def lora_args(out: Path, base: dict[str, Path], *overrides: str) -> list[str]:
    return args(out, base, f"model.pretrained={base['model']}", "model.pretrained_vae=true",
                f"cache.dir={base['root'] / 'latents-lora'}", *LORA, *overrides)


def lora_train(out: Path, base: dict[str, Path], *overrides: str, resume: str | None = None) -> None:
    try:
        train_ldm.main(lora_args(out, base, *overrides) + (["--resume", resume] if resume else []))
    finally:
        reset_accelerate()


@pytest.fixture(scope="module")
def ddp_run(base) -> tuple[Path, subprocess.CompletedProcess]:
    """A 2-process LoRA run (gloo) that exports the adapter and the merged model; lr high enough that the
    adapter's effect on the U-Net is far above float rounding."""
    out = base["root"] / "ddp"
    cmd = accelerate_launch(ROOT / "train/train_ldm.py", *lora_args(
        out, base, "train.cpu=true", "train.max_steps=3", "train.checkpoint_every=3", "optim.lr=2e-2",
        "optim.warmup_steps=0", "train.ema_decay=0.5", "lora.export_merged=true"))
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.mark.slow
def test_two_processes_train_only_the_adapter(base, ddp_run):
    out, result = ddp_run
    assert "replicas identical across 2 processes" in result.stderr
    assert "trainable parameters of" in result.stderr  # "LoRA rank 2, alpha 3 on ...: N trainable parameters of M"
    ckpt = out / "checkpoints/step-00000003"
    adapter = load_file(ckpt / "models/lora.safetensors")
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter), sorted(adapter)[:3]
    assert all(v.dtype == torch.float32 for v in adapter.values())
    assert {p.name for p in (ckpt / "optimizers").iterdir()} == {"lora.safetensors"}
    assert {p.name for p in (ckpt / "ema").iterdir()} == {"lora.safetensors"}
    # the checkpoint holds the adapter only: far smaller than the base U-Net
    base_bytes = (base["model"] / "unet/diffusion_pytorch_model.safetensors").stat().st_size
    assert (ckpt / "models/lora.safetensors").stat().st_size < base_bytes / 10
    assert sorted(p.name for p in (out / "lora").iterdir()) == ["pytorch_lora_weights.safetensors", "tiny.safetensors"]


def _unet_output(unet: UNet2DConditionModel) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 700]), text).sample


def _ours(base: dict[str, Path], out: Path) -> UNet2DConditionModel:
    """Our trained model: the base U-Net with the adapter added as training adds it and the exported weights."""
    unet = UNet2DConditionModel.from_pretrained(base["model"] / "unet")
    cfg = LoRAConfig(enabled=True, rank=2, alpha=3, targets=["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj",
                                                               "ff.net.2"])
    add_lora(unet, cfg)
    with safe_open(out / "lora/pytorch_lora_weights.safetensors", "pt") as f:  # peft's names, without "unet."
        saved = {k.removeprefix("unet."): f.get_tensor(k) for k in f.keys()}
    adapter = AdapterWeights(unet)
    adapter.load_state_dict({k: saved[k.replace(".default.", ".")] for k in adapter.state_dict()})
    return unet


@pytest.mark.slow
def test_both_formats_load_in_diffusers_with_the_same_unet_output(base, ddp_run):
    out, _ = ddp_run
    ours = _unet_output(_ours(base, out))
    plain = _unet_output(UNet2DConditionModel.from_pretrained(base["model"] / "unet"))
    effect = (ours - plain).abs().max().item()
    tol = 1e-5 * ours.abs().max().item()  # float32 rounding of the same sums in another order
    assert effect > 1000 * tol, "the adapter barely changes the U-Net: the comparison below would prove nothing"
    for weight_name in ("pytorch_lora_weights.safetensors", "tiny.safetensors"):
        pipe = StableDiffusionPipeline.from_pretrained(base["model"], safety_checker=None)
        pipe.load_lora_weights(out / "lora", weight_name=weight_name)
        theirs = _unet_output(pipe.unet)
        assert (theirs - ours).abs().max().item() < tol, weight_name
    merged = _unet_output(UNet2DConditionModel.from_pretrained(out / "model/unet"))
    assert (merged - ours).abs().max().item() < tol


@pytest.mark.slow
def test_the_kohya_file_has_a1111_keys_and_the_adapters_alpha(ddp_run):
    out, _ = ddp_run
    with safe_open(out / "lora/tiny.safetensors", "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        alpha = f.get_tensor("lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0.alpha")
        down = f.get_tensor("lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj.lora_down.weight")
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in keys)
    assert alpha.item() == 3.0 and down.shape[0] == 2
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "3"


@pytest.mark.slow
def test_resume_gives_the_same_adapter_under_bf16(tmp_path, base):
    hard = ["train.checkpoint_every=2", "train.caption_dropout=0.3", "lora.dropout=0.1", "train.ema_decay=0.9",
            "optim.warmup_steps=1", "train.mixed_precision=bf16"]
    lora_train(tmp_path / "a", base, *hard, "train.max_steps=4")
    lora_train(tmp_path / "b", base, *hard, "train.max_steps=2")
    lora_train(tmp_path / "b", base, *hard, "train.max_steps=4", resume="latest")
    a, b = ({k: v for f in sorted((tmp_path / run / "checkpoints/step-00000004").rglob("*.safetensors"))
             if not f.name.startswith("rng") for k, v in load_file(f).items()} for run in ("a", "b"))
    assert a.keys() == b.keys() and any(".lora_A." in k for k in a)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    # under bf16 the trainable parameters stay fp32
    assert all(v.dtype == torch.float32 for k, v in a.items() if ".lora_" in k)


@pytest.mark.usefixtures("one_torch_thread")
def test_an_fp16_autocast_step_keeps_fp32_adapters_and_unscales():
    """The GPU fp16 path on the CPU: an fp16 base, autocast and a gradient scaler (accelerate enables fp16 only on
    GPUs, so torch's own CPU autocast and GradScaler stand in for it)."""
    torch.manual_seed(0)

    def step(keep_fp32: bool) -> list[torch.nn.Parameter]:
        unet = build_unet("tiny", sample_size=8, latent_channels=4, cross_attention_dim=32)
        params = add_lora(unet, LoRAConfig(enabled=True), base_dtype=torch.float16)
        if not keep_fp32:  # what diffusers' users did before cast_training_params
            for p in params:
                p.data = p.data.half()
        optimizer, scaler = torch.optim.AdamW(params, lr=1e-2), torch.amp.GradScaler("cpu")
        with torch.autocast("cpu", dtype=torch.float16):
            out = unet(torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)).sample
        assert out.dtype == torch.float16 and unet.conv_in.weight.dtype == torch.float16
        scaler.scale(out.float().pow(2).mean()).backward()
        scaler.unscale_(optimizer)
        scaler.step(optimizer)
        return params

    params = step(keep_fp32=True)
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in params)
    assert all(torch.isfinite(p).all() for p in params)
    assert any(p.abs().sum() > 0 for p in params if p.shape[1] == 4)  # a lora_B moved off zero: the step applied
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):  # the failure it prevents
        step(keep_fp32=False)


def test_bad_targets_are_named():
    unet = build_unet("tiny", sample_size=8, latent_channels=4, cross_attention_dim=32)
    with pytest.raises(UserError, match=r"'lora.targets': 'to_qq' matches no module of the U-Net"):
        check_targets(unet, ["to_q", "to_qq"])
    with pytest.raises(UserError, match=r"'to_out' names a ModuleList, not a linear"):
        check_targets(unet, ["to_out"])
    check_targets(unet, ["to_q", "to_out.0", "ff.net.2"])


@pytest.mark.parametrize("override, message", [
    ("lora.rank=0", "config key 'lora.rank': must be >= 1, got 0"),
    ("lora.alpha=-1", "config key 'lora.alpha': must be > 0"),
    ("lora.dropout=1", "config key 'lora.dropout': must be in [0, 1)"),
    ("lora.targets=[]", "config key 'lora.targets': is empty"),
    ("lora.rnak=4", "unknown config key 'lora.rnak' (did you mean 'lora.rank'?)"),
    ("lora.name=pytorch_lora_weights", "config key 'lora.name': 'pytorch_lora_weights' would clash"),
    ("model.pretrained=", "config key 'lora.enabled': needs model.pretrained"),
])
def test_bad_lora_config_values_stop_the_run_with_one_line(tmp_path, capsys, override, message):
    with pytest.raises(SystemExit) as e:
        train_ldm.main(["--config", str(ROOT / "configs/ldm/tiny.yaml"), f"train.output_dir={tmp_path}",
                        "lora.enabled=true", f"model.pretrained={tmp_path / 'base'}", override])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not any(tmp_path.iterdir())


def test_sharded_backends_are_refused():
    class Sharded:
        sharded = True

    with pytest.raises(UserError, match="lora.enabled runs under one process or DDP"):
        require_lora_backend(Sharded())


def test_the_new_colour_is_outside_the_spec_and_readable():
    assert set(NEW_COLORS).isdisjoint(__import__("ldm.data.shapes", fromlist=["COLORS"]).COLORS)
    combos = new_color_combinations("pink")
    heldout = new_color_combinations("pink", "heldout")
    assert len(combos) == 90 and len(heldout) == 9 and set(heldout) <= set(combos)
    assert not set(heldout) & set(new_color_combinations("pink", "train"))
    a = combos[0]
    assert read_attributes(render(a), new_colors=("pink",)) == a
    assert read_attributes(render(a)).color == "purple"  # the nearest known colour, without the new one

