"""Stage-2 training end to end on tiny models: learning, caption dropout, exact resume, 2 processes, export, and the
validation loss those runs write (its mechanism on its own: tests/test_validation.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from conftest import accelerate_launch, one_process
from test_training_metrics import check_metrics_are_ldm_evals, expected_warnings
from ldm.config import load_config
from ldm.data.dataset import split_train_val
from ldm.latents.cache import LatentCache, sample_latents
from ldm.text.load_encoder import load_text_encoder
from ldm.text.tiny import tiny_clip_text_encoder
from ldm.training.validation import timestep_bands
from ldm.unet.config import LDMConfig
from ldm.unet.objective import NoiseConfig, build_noise_scheduler, diffusion_loss, drop_captions
from ldm.unet.presets import build_unet
from ldm.unet.tiny import write_tiny_stage2_inputs
from ldm.unet.val_loss import unet_val_loss

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train"))
import train_ldm  # noqa: E402


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    """A random tiny VAE (with a scaling factor), a tiny CLIP text encoder, and 64 captioned shapes."""
    return write_tiny_stage2_inputs(tmp_path_factory.mktemp("parts"), num_images=64)


def args(out: Path, parts: dict[str, Path], *overrides: str) -> list[str]:
    return ["--config", str(ROOT / "configs/ldm/tiny.yaml"), f"train.output_dir={out}", f"data.path={parts['data']}",
            f"cache.vae={parts['vae']}", f"text_encoder.path={parts['text']}", "train.report_to=none",
            "train.log_every=1", "sample.every=0", *overrides]


def train(out: Path, parts: dict[str, Path], *overrides: str, resume: str | None = None) -> None:
    train_ldm.main(args(out, parts, *overrides) + (["--resume", resume] if resume else []))


def val_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "checkpoints/val_loss.jsonl").read_text().splitlines()]


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


def test_caption_dropout_rate():
    torch.manual_seed(0)
    text, empty = torch.ones(4000, 77, 8), torch.zeros(1, 77, 8)
    dropped = (drop_captions(text, empty, 0.1) == 0).all(dim=(1, 2)).float()
    assert dropped.mean().item() == pytest.approx(0.1, abs=0.015)
    assert not (drop_captions(text, empty, 0.0) == 0).any()
    assert (drop_captions(text, empty, 1.0) == 0).all()


def test_training_scheduler_never_clips_latents():
    scheduler = build_noise_scheduler(NoiseConfig())
    assert scheduler.config.clip_sample is False and scheduler.config.thresholding is False
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.steps_offset == 1 and scheduler.config.set_alpha_to_one is False
    # a DDPM step from a latent far outside [-1, 1] keeps it there
    x = torch.full((1, 4, 2, 2), 5.0)
    scheduler.set_timesteps(10)
    out = scheduler.step(torch.zeros_like(x), scheduler.timesteps[-1], x).pred_original_sample
    assert out.max() > 4.9


@pytest.mark.slow
def test_v_prediction_and_min_snr_change_the_loss():
    torch.manual_seed(0)
    unet = build_unet("tiny", sample_size=8, latent_channels=4, cross_attention_dim=32)
    x0, text = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    losses = {}
    for name, cfg in {"eps": NoiseConfig(), "v": NoiseConfig(prediction_type="v_prediction"),
                      "snr": NoiseConfig(min_snr_gamma=5.0)}.items():
        torch.manual_seed(1)
        losses[name] = diffusion_loss(unet, build_noise_scheduler(cfg), x0, text, cfg).item()
    assert len({round(v, 6) for v in losses.values()}) == 3


@pytest.mark.slow
def test_tiny_unet_loss_decreases(tmp_path, parts, fresh_accelerate):
    out = tmp_path / "run"
    train(out, parts, "train.max_steps=80", "train.batch_size=16", "train.ema_decay=0", "train.checkpoint_every=80")
    cache = LatentCache.open(out / "latents", vae=None, data_fingerprint=None, resolution=32, center_crop=True,
                             random_flip=False)
    text = tiny_clip_text_encoder()
    text_states = text.encode(cache.captions[:32])
    torch.manual_seed(0)
    initial = build_unet("tiny", sample_size=16, latent_channels=4, cross_attention_dim=32)
    trained = UNet2DConditionModel.from_pretrained(out / "model/unet")
    scheduler = build_noise_scheduler(NoiseConfig())

    def loss(unet) -> float:
        g = torch.Generator().manual_seed(0)
        x0 = sample_latents(cache.tensors["mean"][:32], cache.tensors["std"][:32], cache.scaling_factor,
                            generator=g)
        torch.manual_seed(0)
        with torch.no_grad():
            return sum(diffusion_loss(unet, scheduler, x0, text_states, NoiseConfig()).item() for _ in range(8))

    before, after = loss(initial), loss(trained)
    assert after < 0.7 * before, (before, after)


@pytest.mark.slow
def test_resume_gives_the_same_weights(tmp_path, parts, fresh_accelerate, capsys):
    hard = ["train.grad_accum=2", "train.batch_size=8", "train.checkpoint_every=3", "train.caption_dropout=0.3",
            "data.random_flip=true", "noise.min_snr_gamma=5", "noise.offset_noise=0.05", "noise.input_perturbation=0.1",
            "optim.warmup_steps=2", "sample.every=3", "sample.prompts=[a red circle]", "sample.steps=2",
            "data.num_val=8", "train.val_every=3",
            # sample quality against the held-out images, every worse evaluation warned of
            "sample.metrics=[fid,kid,clip,cmmd]", "sample.features=demo", "sample.metric_images=2",
            "sample.worse_patience=1"]
    # (the schedule after warmup must not depend on max_steps here: the first run is a shorter run, not a killed one)
    shared_cache = f"cache.dir={tmp_path / 'latents'}"
    train(tmp_path / "a", parts, *hard, shared_cache, "train.max_steps=6")
    reset_accelerate()
    train(tmp_path / "b", parts, *hard, shared_cache, "train.max_steps=3")
    reset_accelerate()
    # as if killed after validating step 5 (a row the resumed run computes again) and while appending step 6's; and
    # with a perfect evaluation at step 2 before step 3's, so that the resumed run's streaks start at 1 for all four
    path = tmp_path / "b/checkpoints/val_loss.jsonl"
    perfect = {"step": 2, "metrics": {"fid": 0.0, "kid": {"mean": 0.0}, "clip_score": 100.0, "cmmd": 0.0}}
    path.write_text(json.dumps(perfect) + "\n" + path.read_text() + json.dumps({"step": 5, "raw": {"loss": 1.0,
                    "count": 1}}) + '\n{"step": 6, "raw": {"lo')
    capsys.readouterr()
    train(tmp_path / "b", parts, *hard, shared_cache, "train.max_steps=6", resume="latest")
    # every validated step once, with the uninterrupted run's numbers (the same weights, the same fixed draws)
    assert [row["step"] for row in val_rows(tmp_path / "a")] == [3, 6]
    assert val_rows(tmp_path / "b") == [perfect, *val_rows(tmp_path / "a")]
    # the streaks went on from the rows before the resume: at step 6 each metric is worse than step 2's for the 2nd
    # time in a row (a forgetful resume would see step 6 as the first evaluation and warn of nothing)
    worse = [line.split("sample_metrics: ", 1)[1] for line in capsys.readouterr().err.splitlines() if "worse:" in line]
    assert worse == expected_warnings(val_rows(tmp_path / "b"), patience=1)[4:]
    assert len(worse) == 4 and all("(step 2, " in w and "2 evaluations in a row" in w for w in worse)
    a = {k: v for f in sorted((tmp_path / "a/checkpoints/step-00000006").rglob("*.safetensors"))
         if not f.name.startswith("rng") for k, v in load_file(f).items()}
    b = {k: v for f in sorted((tmp_path / "b/checkpoints/step-00000006").rglob("*.safetensors"))
         if not f.name.startswith("rng") for k, v in load_file(f).items()}
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


@pytest.mark.slow
def test_two_processes_and_the_export_loads_in_diffusers(tmp_path, parts, fresh_accelerate, capsys):
    out = tmp_path / "run"
    validation = ["data.num_val=7", "train.val_every=2"]  # 7 held out: batches of 4 and 3, rank 1 pads and drops
    metrics = ["sample.metrics=[fid,kid,clip,cmmd]", "sample.features=demo", "sample.metric_images=5",
               f"sample.reference={parts['data']}"]  # 5 images: 3 on rank 0, 2 on rank 1
    cmd = accelerate_launch(ROOT / "train/train_ldm.py", *args(
        out, parts, "train.cpu=true", "train.max_steps=4", "train.batch_size=4", "train.checkpoint_every=2",
        "sample.every=2", "sample.steps=2", "sample.prompts=[a,b,c]", *validation, *metrics))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "replicas identical across 2 processes" in result.stderr
    state = json.loads((out / "checkpoints/step-00000004/state.json").read_text())
    assert state["batches_consumed"] == [4, 4]
    check_validation_equals_one_process(out, parts, validation)
    check_metrics_are_ldm_evals(val_rows(out), out / "model", parts["data"], ["a", "b", "c"], 5,
                                {"seed": 0, "steps": 2, "cfg": 7.5}, tmp_path, capsys)  # 2 processes = 1 process
    shards = sorted(p.name for p in (out / "latents").glob("shard-*.safetensors"))
    assert any(s.startswith("shard-0") for s in shards) and any(s.startswith("shard-1") for s in shards)

    model = out / "model"
    for part in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (model / part).exists(), part
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    image = pipe("a red circle", num_inference_steps=3, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()
    assert pipe.scheduler.config.clip_sample is False


def check_validation_equals_one_process(out: Path, parts: dict[str, Path], validation: list[str]) -> None:
    """The 2-process run's validation rows against the same weights validated here, in one process: the raw weights
    of the step-4 checkpoint and the EMA weights the run exported."""
    rows = val_rows(out)
    assert [row["step"] for row in rows] == [2, 4] and all(row.keys() >= {"step", "raw", "ema"} for row in rows)
    cfg = load_config(LDMConfig, ROOT / "configs/ldm/tiny.yaml", args(out, parts, *validation)[2:])
    cache = LatentCache.read(out / "latents")
    positions = cache.positions_of(split_train_val(cache.dataset_size, 7, seed=0)[1])
    text = load_text_encoder(cfg.text_encoder)
    unet = build_unet("tiny", sample_size=16, latent_channels=4, cross_attention_dim=32)
    scheduler = build_noise_scheduler(cfg.noise)
    for weights, state in (("raw", load_file(out / "checkpoints/step-00000004/models/unet.safetensors")),
                           ("ema", load_file(out / "model/unet/diffusion_pytorch_model.safetensors"))):
        unet.load_state_dict(state)
        here = unet_val_loss(one_process(), unet, scheduler, cache, positions, text.encode_conditioning, cfg.noise,
                             timestep_bands(1000, 4), batch_size=4)  # the run's train.batch_size
        there = rows[-1][weights]
        assert there["count"] == here["count"] == 28 and there["bands"].keys() == here["bands"].keys()
        # the same batches through the same float32 kernels; only the thread count (1 per process there, up to 2
        # here) may reorder a convolution's sums: float32 rounding, ~1e-7 relative
        assert there["loss"] == pytest.approx(here["loss"], rel=1e-6), weights
        for label, band in here["bands"].items():
            assert there["bands"][label]["loss"] == pytest.approx(band["loss"], rel=1e-6), (weights, label)
        overall = sum(b["loss"] * b["count"] for b in there["bands"].values()) / there["count"]
        assert there["loss"] == pytest.approx(overall, rel=1e-12)  # the bands weighted by their counts


def test_resolution_not_divisible_by_the_vae_factor_is_refused(tmp_path, parts, fresh_accelerate):
    with pytest.raises(SystemExit) as e:
        train(tmp_path / "run", parts, "data.resolution=33")
    assert e.value.code == 2
    assert not (tmp_path / "run" / "latents").exists()


def test_missing_vae_is_a_clear_error(tmp_path, parts, fresh_accelerate, capsys):
    with pytest.raises(SystemExit):
        train(tmp_path / "run", parts, f"cache.vae={tmp_path / 'nope'}")
    assert "VAE directory" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncated", "pickle", "lfs pointer"])
def test_a_damaged_vae_is_named_not_a_traceback(tmp_path, parts, fresh_accelerate, capsys, damage):
    import shutil

    vae = tmp_path / "vae"
    shutil.copytree(parts["vae"], vae)
    weights = vae / "diffusion_pytorch_model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-1000])
    elif damage == "pickle":
        torch.save(load_file(weights), vae / "diffusion_pytorch_model.bin")
        weights.unlink()
    else:
        weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(SystemExit) as e:
        train(tmp_path / "run", parts, f"cache.vae={vae}")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("error: ") and "diffusion_pytorch_model" in err[-1]
    assert "Traceback" not in "\n".join(err)


@pytest.mark.slow
def test_a_bad_data_path_stops_both_processes_with_one_line_each(tmp_path, parts):
    cmd = accelerate_launch(ROOT / "train/train_ldm.py", *args(
        tmp_path / "run", parts, "train.cpu=true", f"data.path={tmp_path / 'missing'}"))
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert result.stderr.count(f"error: dataset path '{tmp_path / 'missing'}' does not exist") == 2, result.stderr[-3000:]
    # the other process is told, instead of dying in the barrier with a gloo traceback
    assert "[rank1]: Traceback" not in result.stderr and "Connection closed by peer" not in result.stderr
