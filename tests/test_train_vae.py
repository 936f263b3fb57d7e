"""Stage-1 training end to end on the tiny preset: learning, the GAN switch, exact resume, 2 processes, bad input, and
the validation rows those runs write (val_loss.jsonl; the mechanism on its own: tests/test_validation.py)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import accelerate_launch, one_process, reset_accelerate_state
from ldm.config import load_config
from ldm.data.dataset import split_train_val
from ldm.data.loader import KeyedSubset
from ldm.data.sources import build_image_dataset
from ldm.data.transforms import ImageTransform
from ldm.demo.shapes import write_dataset
from ldm.errors import UserError
from ldm.vae.config import VAEConfig
from ldm.vae.export import export_vae
from ldm.vae.finetune import DecoderAnchor, LatentAnchor
from ldm.vae.presets import build_vae
from ldm.vae.validation import evaluate_reconstructions

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train"))
import train_vae  # noqa: E402

FAST = ["loss.perceptual_weight=0", "train.log_every=1", "train.report_to=none"]


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "shapes", num_images=256, seed=1, size=32)


def train(out: Path, data: Path, *overrides: str, resume: str | None = None) -> None:
    argv = ["--config", str(ROOT / "configs/vae/tiny.yaml"), f"train.output_dir={out}", f"data.path={data}"]
    argv += ["--resume", resume] if resume else []
    train_vae.main(argv + list(overrides))


def checkpoint_tensors(step_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(step_dir.rglob("*.safetensors")):
        if not f.name.startswith("rng_"):
            tensors.update({f"{f.relative_to(step_dir)}:{k}": v for k, v in load_file(f).items()})
    return tensors


def val_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "checkpoints/val_loss.jsonl").read_text().splitlines()]


def images(data: Path, n: int) -> torch.Tensor:
    files = sorted(data.glob("*.png"))[:n]
    x = torch.stack([torch.from_numpy(__import__("numpy").array(Image.open(f).convert("RGB"))) for f in files])
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1  # (n, 3, 32, 32) in [-1, 1]


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory, shapes) -> dict:
    """200 steps with the GAN from step 150; L1 errors on 32 training images at init, step 150 and step 200."""
    out = tmp_path_factory.mktemp("gan-run") / "run"
    train(out, shapes, "train.max_steps=200", "loss.disc_start=150", "train.val_every=100",
          "train.checkpoint_every=50", "train.keep_last=4", "train.report_to=tensorboard", "train.batch_size=8")
    reset_accelerate_state()
    x = images(shapes, 32)
    torch.manual_seed(0)
    initial = build_vae("tiny", 32)  # the training run's initialisation (same seed)
    before_gan = build_vae("tiny", 32)
    saved = load_file(out / "checkpoints/step-00000150/models/vae.safetensors")  # keys 'vae.<param>'
    before_gan.load_state_dict({k.removeprefix("vae."): v for k, v in saved.items()})
    trained = AutoencoderKL.from_pretrained(out / "vae")
    with torch.no_grad():
        errors = {name: (vae(x, sample_posterior=False).sample - x).abs().mean().item()
                  for name, vae in (("init", initial), ("step150", before_gan), ("step200", trained))}
    return {"out": out, "trained": trained, **errors}


# Bounds from the spread over training seeds 0-5 (constraints.txt's versions, 2026-12-02; `train.seed=N`):
#   err200 / err_init:                     0.39 0.32 0.21 0.22 0.19 0.24  (worst 0.39; bound 0.5)
#   gain kept by the GAN phase, (init - err200) / (init - err150): 0.85 1.02 0.97 0.95 0.99 0.97  (worst 0.85; bound 0.7)
# The former single bound, err200 < 0.3 err_init, sat inside that spread: seed 0 failed it with newer releases.
@pytest.mark.slow
def test_tiny_vae_learns_to_reconstruct(gan_run):
    out, trained = gan_run["out"], gan_run["trained"]
    assert gan_run["step200"] < 0.5 * gan_run["init"], gan_run
    # the latent scale is measured, not SD's 0.18215, and matches the last validation
    state = json.loads((out / "checkpoints/step-00000200/state.json").read_text())
    assert trained.config.scaling_factor == pytest.approx(state["scaling_factor"])
    assert trained.config.scaling_factor != 0.18215
    assert (out / "config.yaml").is_file()
    assert list((out / "logs").rglob("events.out.tfevents.*"))  # TensorBoard


@pytest.mark.slow
def test_the_gan_phase_does_not_undo_reconstruction(gan_run):
    gain_before = gan_run["init"] - gan_run["step150"]
    gain_after = gan_run["init"] - gan_run["step200"]
    assert gain_before > 0.5 * gan_run["init"], gan_run  # it had learned something worth keeping
    assert gain_after >= 0.7 * gain_before, gan_run


@pytest.mark.slow
def test_discriminator_starts_at_disc_start(tmp_path, shapes, fresh_accelerate):
    out = tmp_path / "run"
    train(out, shapes, *FAST, "train.max_steps=4", "loss.disc_start=2", "train.checkpoint_every=1",
          "train.keep_last=10", "train.val_every=100", "train.batch_size=4")
    ckpt = {s: checkpoint_tensors(out / f"checkpoints/step-{s:08d}") for s in (1, 2, 3, 4)}

    def disc(step):
        return {k: v for k, v in ckpt[step].items() if k.startswith("models/discriminator")}

    def vae(step):
        return {k: v for k, v in ckpt[step].items() if k.startswith("models/vae")}

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    assert same(disc(1), disc(2))  # steps 1 and 2 (step indices 0, 1 < disc_start) leave it untouched
    assert not same(disc(2), disc(3))  # the first step with step index 2 >= disc_start trains it
    assert not same(disc(3), disc(4))
    assert not same(vae(1), vae(2)) and not same(vae(2), vae(3))


@pytest.mark.slow
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, shapes, fresh_accelerate):
    hard = ["loss.perceptual_weight=1", "loss.disc_start=2", "train.ema_decay=0.9", "loss.learn_logvar=true",
            "train.grad_accum=2", "data.random_flip=true", "train.batch_size=4", "train.checkpoint_every=3",
            "train.val_every=3", "train.log_every=1", "train.report_to=none", "optim.warmup_steps=2"]
    train(tmp_path / "a", shapes, *hard, "train.max_steps=6")
    reset_accelerate_state()
    train(tmp_path / "b", shapes, *hard, "train.max_steps=3")
    reset_accelerate_state()
    with open(tmp_path / "b/checkpoints/val_loss.jsonl", "a") as f:  # as if killed while appending step 6's row
        f.write('{"step": 6, "raw": {"rec')
    train(tmp_path / "b", shapes, *hard, "train.max_steps=6", resume="latest")
    # each validated step once, raw and EMA weights, with the uninterrupted run's numbers
    rows = val_rows(tmp_path / "a")
    assert [row["step"] for row in rows] == [3, 6] and all(row.keys() == {"step", "raw", "ema"} for row in rows)
    assert rows[-1]["ema"]["count"] == 32 and rows[-1]["ema"]["lpips_loss"] > 0  # configs/vae/tiny.yaml's num_val
    assert val_rows(tmp_path / "b") == rows
    a = checkpoint_tensors(tmp_path / "a/checkpoints/step-00000006")
    b = checkpoint_tensors(tmp_path / "b/checkpoints/step-00000006")
    assert a.keys() == b.keys() and any(k.startswith("ema/") for k in a) and any(k.startswith("optimizers/") for k in a)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    # the learned log-variance really is optimised
    assert a["models/logvar.safetensors:logvar"].item() != 0.0
    va = load_file(tmp_path / "a/vae/diffusion_pytorch_model.safetensors")
    vb = load_file(tmp_path / "b/vae/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(va[k], vb[k]) for k in va)


@pytest.mark.slow
def test_unreadable_images_are_skipped_named_and_counted(tmp_path, capsys, fresh_accelerate):
    data = write_dataset(tmp_path / "data", num_images=24, seed=2, size=32)
    (data / "zero.png").write_bytes(b"")
    (data / "text.png").write_text("not an image")
    good = (data / "00000.png").read_bytes()
    (data / "cut.png").write_bytes(good[: len(good) // 2])
    lines = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    lines += [{"file_name": n, "text": "x"} for n in ("zero.png", "text.png", "cut.png")]
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    # 27 images, 3 held out: one epoch is 3 batches of 8, so 3 steps see every image
    train(tmp_path / "run", data, *FAST, "train.max_steps=3", "train.batch_size=8", "data.num_val=3",
          "train.val_every=100")
    err = capsys.readouterr().err
    for name in ("zero.png: empty file", "text.png: not an image", "cut.png: truncated file"):
        assert f"skipped unreadable image {name}" in err
    assert "3 unreadable images skipped in total: cut.png" in err
    # stderr is no terminal here: compact progress lines (ldm.progress), no bar redraws
    assert "\r" not in err and "vae: 3/3 (100%)" in err


@pytest.mark.slow
def test_two_process_run_keeps_replicas_identical(tmp_path, shapes):
    out = tmp_path / "run"
    cmd = accelerate_launch(
        ROOT / "train/train_vae.py", "--config", str(ROOT / "configs/vae/tiny.yaml"), f"train.output_dir={out}",
        f"data.path={shapes}", "train.cpu=true", "train.max_steps=4", "loss.disc_start=2", "train.batch_size=4",
        "train.val_every=2", "train.checkpoint_every=2", "loss.learn_logvar=true", *FAST,
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "replicas identical across 2 processes" in result.stderr
    state = json.loads((out / "checkpoints/step-00000004/state.json").read_text())
    consumed = state["batches_consumed"]
    assert consumed == [4, 4]  # one batch per step on each process
    assert AutoencoderKL.from_pretrained(out / "vae") is not None
    # the validation of step 4 equals the same weights' validation in one process
    rows = val_rows(out)
    assert [row["step"] for row in rows] == [2, 4] and rows[-1].keys() == {"step", "raw"}
    vae = build_vae("tiny", 32)
    saved = load_file(out / "checkpoints/step-00000004/models/vae.safetensors")  # keys 'vae.<param>'
    vae.load_state_dict({k.removeprefix("vae."): v for k, v in saved.items()})
    full = build_image_dataset(str(shapes), transform=ImageTransform(32, True, False), image_column="image",
                               caption_column=None, split="train", seed=0)
    held_out = KeyedSubset(full, split_train_val(len(full), 32, seed=0)[1])  # configs/vae/tiny.yaml's data.num_val
    here, _, _ = evaluate_reconstructions(vae, held_out, one_process(), None, "l1")
    there = rows[-1]["raw"]
    assert there["count"] == here["count"] == 32
    # the same batches of 16 (one per process there) through the same float32 kernels; only the thread count (1 per
    # process there, up to 2 here) may reorder a convolution's sums: float32 rounding, ~1e-7 relative (the latent
    # mean, near 0, gets an absolute bound)
    assert there == pytest.approx(here, rel=1e-5, abs=1e-6)


@pytest.mark.slow  # starts a process (~20 s of imports); the fine-tune settings' errors below stay fast
def test_bad_config_is_one_line_exit_2_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train/train_vae.py"), "--config", str(ROOT / "configs/vae/tiny.yaml"),
           f"train.output_dir={out}", "train.max_stepz=1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown config key 'train.max_stepz' (did you mean 'train.max_steps'?)"
    ]
    assert not out.exists()


# ---- fine-tuning a trained VAE (ldm/vae/finetune.py): the latent space a U-Net was trained on stays put


@pytest.fixture(scope="module")
def pretrained_vae(tmp_path_factory) -> Path:
    """A tiny VAE with a made-up latent scale, exported as a model directory's vae/ (the layout stage 2 writes)."""
    torch.manual_seed(3)
    directory = tmp_path_factory.mktemp("base") / "model"
    export_vae(build_vae("tiny", 32), directory / "vae", scaling_factor=0.5)
    return directory


def encoder_means(vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.encode(x).latent_dist.mean


@pytest.mark.slow  # trains
def test_decoder_only_fine_tune_keeps_the_encoder_and_the_scale(tmp_path, shapes, pretrained_vae, fresh_accelerate):
    out = tmp_path / "run"
    train(out, shapes, *FAST, f"model.pretrained={pretrained_vae}", "model.freeze_encoder=true",
          "train.max_steps=3", "train.batch_size=4", "train.val_every=100", "train.ema_decay=0.9")
    base = load_file(pretrained_vae / "vae/diffusion_pytorch_model.safetensors")
    tuned = load_file(out / "vae/diffusion_pytorch_model.safetensors")
    frozen = [k for k in base if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(base[k], tuned[k]) for k in frozen)
    assert not torch.equal(base["decoder.conv_out.weight"], tuned["decoder.conv_out.weight"])
    # the pretrained scale, not the one measured on this run's validation images
    assert AutoencoderKL.from_pretrained(out / "vae").config.scaling_factor == 0.5


@pytest.mark.slow  # trains twice
def test_latent_anchor_holds_the_encoder_near_the_pretrained_one(tmp_path, shapes, pretrained_vae):
    x = images(shapes, 16)
    base = AutoencoderKL.from_pretrained(pretrained_vae / "vae")
    moved = {}
    for weight in (0, 1000):
        reset_accelerate_state()
        out = tmp_path / f"anchor-{weight}"
        train(out, shapes, *FAST, f"model.pretrained={pretrained_vae}", f"loss.latent_anchor_weight={weight}",
              "optim.lr=3e-3", "train.max_steps=4", "train.batch_size=4", "train.val_every=100")
        tuned = AutoencoderKL.from_pretrained(out / "vae")
        moved[weight] = (encoder_means(tuned, x) - encoder_means(base, x)).pow(2).mean().sqrt().item()
    assert moved[0] > 0 and moved[1000] < 0.5 * moved[0], moved


def test_latent_anchor_loss_is_the_squared_distance_of_the_means():
    torch.manual_seed(0)
    vae = build_vae("tiny", 32)
    anchor, before = LatentAnchor(vae), copy.deepcopy(vae)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert anchor(x, vae.encode(x).latent_dist).item() == 0.0
    with torch.no_grad():
        vae.encoder.conv_in.bias.add_(0.1)  # the trained encoder moves; the anchor's copy does not
    posterior = vae.encode(x).latent_dist
    expected = (posterior.mean - encoder_means(before, x)).pow(2).sum((1, 2, 3)).mean()  # per image, batch mean
    assert expected > 0
    assert anchor(x, posterior).item() == pytest.approx(expected.item(), rel=1e-5)
    assert not any(p.requires_grad for p in anchor.parameters())


@pytest.fixture(scope="module")
def held_latents(tmp_path_factory) -> Path:
    """Latents for the tiny VAE (4 channels, 32 px / 2) that no encoder produced, as an anchor_latents file."""
    path = tmp_path_factory.mktemp("held") / "latents.safetensors"
    save_file({"latents": torch.randn(16, 4, 16, 16, generator=torch.Generator().manual_seed(5))}, str(path))
    return path


def decoded(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(z).sample


@pytest.mark.slow  # trains twice
def test_decoder_anchor_holds_the_decoder_on_the_sampled_latents(tmp_path, shapes, pretrained_vae, held_latents):
    z = load_file(held_latents)["latents"]
    base = AutoencoderKL.from_pretrained(pretrained_vae / "vae")
    moved = {}
    for weight in (0, 10):  # measured 2026-12-02: RMS change 0.34 without, 0.12 with (weights 1: 0.21, 100: 0.14)
        reset_accelerate_state()
        out = tmp_path / f"decoder-anchor-{weight}"
        anchored = [f"loss.decoder_anchor_weight={weight}", f"loss.decoder_anchor_latents={held_latents}"]
        train(out, shapes, *FAST, f"model.pretrained={pretrained_vae}", *(anchored if weight else []),
              "optim.lr=1e-3", "train.max_steps=8", "train.batch_size=4", "train.val_every=100")
        tuned = AutoencoderKL.from_pretrained(out / "vae")
        moved[weight] = (decoded(tuned, z) - decoded(base, z)).pow(2).mean().sqrt().item()
    assert moved[0] > 0 and moved[10] < 0.5 * moved[0], moved


def test_decoder_anchor_loss_and_its_draws():
    torch.manual_seed(0)
    vae = build_vae("tiny", 32)
    latents = torch.randn(10, 4, 16, 16)
    anchor, before = DecoderAnchor(vae, latents, seed=7), copy.deepcopy(vae)
    z = anchor.draw(step=3, rank=0, n=4)
    assert torch.equal(z, anchor.draw(step=3, rank=0, n=4))  # a resumed run draws the same latents
    assert not torch.equal(z, anchor.draw(step=3, rank=1, n=4))  # each process its own
    assert not torch.equal(z, anchor.draw(step=4, rank=0, n=4))
    assert anchor(z, vae.decode(z).sample).item() < 1e-8  # float rounding between two identical decoders
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.1)  # the trained decoder moves; the anchor's copy does not
    expected = (vae.decode(z).sample - decoded(before, z)).pow(2).sum((1, 2, 3)).mean()  # per image, batch mean
    assert expected > 0
    assert anchor(z, vae.decode(z).sample).item() == pytest.approx(expected.item(), rel=1e-5)
    assert not any(p.requires_grad for p in anchor.parameters())


def test_missing_or_wrong_decoder_anchor_latents_are_one_line(tmp_path, shapes, pretrained_vae, capsys):
    wrong = tmp_path / "wrong.safetensors"
    save_file({"latents": torch.randn(4, 8, 8, 8)}, str(wrong))
    messages = {
        wrong: f"loss.decoder_anchor_latents: {wrong} holds latents of shape (4, 8, 8, 8), not (N, 4, h, w) for "
               "this VAE; write it with python -m ldm.pipeline.anchor_latents for a model using this VAE",
        tmp_path / "nope.safetensors": f"loss.decoder_anchor_latents: {tmp_path / 'nope.safetensors'} is not a "
                                       "file; write it with python -m ldm.pipeline.anchor_latents",
    }
    for path, message in messages.items():
        reset_accelerate_state()
        with pytest.raises(SystemExit) as exit_:
            train(tmp_path / "run", shapes, *FAST, f"model.pretrained={pretrained_vae}",
                  "loss.decoder_anchor_weight=1", f"loss.decoder_anchor_latents={path}", "train.max_steps=1")
        assert exit_.value.code == 2
        assert f"error: {message}" in capsys.readouterr().err.splitlines()
        assert not (tmp_path / "run" / "vae").exists()


@pytest.mark.parametrize("overrides, message", [
    (["loss.decoder_anchor_weight=1", "loss.decoder_anchor_latents=HELD"], "config key "
     "'loss.decoder_anchor_weight': holds the decoder to model.pretrained's: set model.pretrained"),
    (["model.pretrained=PRE", "loss.decoder_anchor_weight=1"], "config key 'loss.decoder_anchor_latents': is "
     "needed with loss.decoder_anchor_weight: write one with python -m ldm.pipeline.anchor_latents"),
    (["model.pretrained=PRE", "loss.decoder_anchor_latents=HELD"], "config key 'loss.decoder_anchor_latents': "
     "is only used with loss.decoder_anchor_weight > 0"),
    (["loss.latent_anchor_weight=1"], "config key 'loss.latent_anchor_weight': anchors the latents to "
     "model.pretrained's encoder: set model.pretrained, or the weight to 0"),
    (["model.freeze_encoder=true"], "config key 'model.freeze_encoder': needs model.pretrained"),
    (["model.pretrained=PRE", "model.freeze_encoder=true", "loss.latent_anchor_weight=1"],
     "config key 'loss.latent_anchor_weight': has nothing to anchor with model.freeze_encoder=true"),
    (["model.pretrained=MISSING"], "does not exist: set model.pretrained to a VAE directory or a model directory"),
])
def test_bad_fine_tune_settings_are_refused(overrides, message, pretrained_vae, held_latents, tmp_path):
    overrides = [o.replace("PRE", str(pretrained_vae)).replace("MISSING", str(tmp_path / "nope"))
                 .replace("HELD", str(held_latents)) for o in overrides]
    with pytest.raises(UserError) as error:
        load_config(VAEConfig, ROOT / "configs/vae/tiny.yaml", overrides)
    assert message in str(error.value)
