"""Aspect-ratio buckets: the table, cover-and-crop (never stretch), one-bucket batches that survive a resume and
agree across processes, the latent cache at bucket sizes, and training on mixed aspect ratios (killed and resumed,
and on 2 processes)."""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from PIL import ImageDraw
from safetensors.torch import load_file

from conftest import accelerate_launch
from ldm.data.buckets import (
    BucketBatchSampler, BucketTransform, bucket_sizes, check_unet_takes_buckets, nearest_bucket,
)
from ldm.errors import UserError
from ldm.latents.cache import LatentCache
from ldm.pixels import pil_to_tensor
from ldm.text.encoder import FrozenTextEncoder
from ldm.unet.tiny import write_tiny_stage2_inputs
from ldm.vae.load_vae import load_vae

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train"))
import cache_latents  # noqa: E402
import train_ldm  # noqa: E402

# 1:1, 3:2, 2:3, 16:9, and extreme ones (8:1, 1:6); resolution 32, step 8, VAE factor 2
SIZES = [(32, 32), (48, 32), (32, 48), (64, 36), (128, 16), (16, 96), (40, 40)]
TABLE_32 = [(16, 56), (16, 64), (24, 40), (24, 48), (32, 32), (40, 24), (48, 24), (56, 16), (64, 16)]
BUCKETS = ["data.buckets=true", "data.bucket_step=8"]

# tiny kernels on shared cores: OpenMP threads only spin-wait (the killed run needs it anyway, for the same kernels)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_mixed(root: Path, per_size: int = 4) -> Path:
    """Images of SIZES, each a random background with a red ellipse inscribed in its central half."""
    root.mkdir(parents=True)
    rng, rows = np.random.default_rng(0), []
    for w, h in SIZES:
        for k in range(per_size):
            image = PIL.Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 255, 3)))
            ImageDraw.Draw(image).ellipse((w / 4, h / 4, 3 * w / 4, 3 * h / 4), fill=(255, 0, 0))
            image.save(root / f"{w}x{h}-{k}.png")
            rows.append({"file_name": f"{w}x{h}-{k}.png", "text": f"a red ellipse on {w}x{h}, number {k % 2}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("buckets")
    parts = write_tiny_stage2_inputs(root, num_images=4)
    return {**parts, "data": write_mixed(root / "mixed")}


def args(out: Path, parts: dict[str, Path], *overrides: str) -> list[str]:
    return ["--config", str(ROOT / "configs/ldm/tiny.yaml"), f"train.output_dir={out}", f"data.path={parts['data']}",
            f"cache.vae={parts['vae']}", f"text_encoder.path={parts['text']}", "train.report_to=none",
            "train.log_every=1", "sample.every=0", *BUCKETS, *overrides]


# ------------------------------------------------------------------------------------------------ the table


def test_the_table_mirrors_portrait_and_landscape_and_keeps_the_area_close():
    assert bucket_sizes(32, 8, 16, 64, 4.0, factor=2) == TABLE_32
    sd = bucket_sizes(512, 64, 256, 1024, 4.0, factor=8)
    assert (512, 512) in sd and (768, 320) in sd and (320, 768) in sd and (1024, 256) in sd
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in sd)
    assert all(abs(w * h / 512**2 - 1) < 0.13 for w, h in sd)  # the step's rounding at the narrowest side
    assert all(max(w / h, h / w) <= 4 for w, h in bucket_sizes(32, 8, 8, 128, 4.0))


@pytest.mark.parametrize("settings, message", [
    (dict(step=12, factor=8), "'data.bucket_step': 12 is not a multiple of the VAE's downsampling factor 8"),
    (dict(step=24), "'data.bucket_step': 24 does not divide data.resolution 32: use a step that divides it (e.g. 8)"),
    (dict(min_side=40), "need bucket_step (8) <= min_side (40) <= resolution (32) <= max_side (64)"),
])
def test_bad_bucket_settings_are_one_line(settings, message):
    kwargs = dict(resolution=32, step=8, min_side=16, max_side=64, max_aspect=4.0, factor=1) | settings
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        bucket_sizes(**kwargs)


def test_buckets_the_unet_cannot_halve_are_refused():
    class UNet:
        class config:  # noqa: N801 - a stand-in for a diffusers config
            block_out_channels = (32, 64, 64)  # downsamples 4x

    with pytest.raises(UserError, match="bucket 24x40 gives 6x10 latents, which the U-Net .downsampling 4x. cannot "
                                        "take: use a bucket_step that is a multiple of 16"):
        check_unet_takes_buckets([(32, 32), (24, 40)], 4, UNet())
    check_unet_takes_buckets([(32, 32), (16, 48)], 4, UNet())


def test_each_image_goes_to_the_nearest_aspect_ratio():
    assert TABLE_32[nearest_bucket((32, 32), TABLE_32)] == (32, 32)
    assert TABLE_32[nearest_bucket((48, 32), TABLE_32)] == (40, 24)  # 3:2 -> 5:3
    assert TABLE_32[nearest_bucket((32, 48), TABLE_32)] == (24, 40)  # and mirrored
    assert TABLE_32[nearest_bucket((1920, 1080), TABLE_32)] == (40, 24)  # 16:9
    assert TABLE_32[nearest_bucket((800, 10), TABLE_32)] == (64, 16)  # beyond max_aspect: the most extreme bucket


def test_images_are_resized_to_cover_and_cropped_never_stretched():
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (10, 100, 3), dtype=np.uint8))
    out = BucketTransform(((64, 16),), 32)(image, random.Random(0))  # (3, 16, 64)
    # cover: scale 1.6 (16 / 10), so the centre 40 x 10 source pixels make the 64 x 16 bucket
    covered = pil_to_tensor(image.resize((64, 16), PIL.Image.Resampling.BICUBIC, box=(30, 0, 70, 10)))[0]
    stretched = pil_to_tensor(image.resize((64, 16), PIL.Image.Resampling.BICUBIC))[0]
    assert out.shape == (3, 16, 64) and torch.equal(out, covered)
    assert not torch.allclose(out, stretched, atol=0.1)
    # a circle stays round: 96 x 32 -> the 40 x 24 bucket at scale 3/4 (a stretch would squeeze x by 0.42/0.75)
    disc = PIL.Image.new("RGB", (96, 32), (0, 0, 0))
    ImageDraw.Draw(disc).ellipse((40, 8, 56, 24), fill=(255, 255, 255))
    white = BucketTransform(((40, 24),), 32)(disc, random.Random(0))[0] > 0  # (24, 40)
    rows, cols = white.any(dim=1).nonzero(), white.any(dim=0).nonzero()
    height, width = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
    assert abs(width / height - 1) < 0.15, (width, height)


# ------------------------------------------------------------------------------------------------ the sampler


def test_batches_are_one_bucket_disjoint_across_processes_and_resume_exactly():
    ids = [random.Random(i).randrange(4) for i in range(50)]
    samplers = [BucketBatchSampler(ids, 3, seed=7, rank=r, world_size=2) for r in range(2)]
    per_epoch = samplers[0].batches_per_epoch
    assert per_epoch == sum(ids.count(b) // 6 for b in range(4))
    streams = [list(itertools.islice(iter(s), 3 * per_epoch)) for s in samplers]
    for epoch in range(3):
        seen = []
        for step in range(epoch * per_epoch, (epoch + 1) * per_epoch):
            b0, b1 = streams[0][step], streams[1][step]
            assert {k // 50 for k in b0 + b1} == {epoch}  # keys carry the epoch
            assert len({ids[k % 50] for k in b0 + b1}) == 1, (b0, b1)  # one bucket for both processes
            seen += [k % 50 for k in b0 + b1]
        assert len(seen) == len(set(seen))  # nothing twice in an epoch, on any process
    assert streams[0][:per_epoch] != streams[0][per_epoch : 2 * per_epoch]  # reshuffled every epoch
    for start in (0, 1, per_epoch, per_epoch + 2):
        resumed = BucketBatchSampler(ids, 3, seed=7, rank=1, world_size=2, start_batch=start)
        assert list(itertools.islice(iter(resumed), 5)) == streams[1][start : start + 5]
    with pytest.raises(UserError, match="no aspect-ratio bucket holds one step's 60 images"):
        BucketBatchSampler(ids, 30, seed=0, world_size=2)
    with pytest.raises(ValueError, match="start_batch must be >= 0, got -1"):  # the checks the plain sampler makes
        BucketBatchSampler(ids, 3, seed=0, start_batch=-1)


# ------------------------------------------------------------------------------------------------ the cache


@pytest.fixture(scope="module")
def cache_dir(parts) -> Path:
    directory = parts["data"].parent / "cache"
    cache_latents.main([f"data.path={parts['data']}", f"cache.vae={parts['vae']}", f"cache.dir={directory}",
                        "data.random_flip=true", "train.cpu=true", "cache.batch_size=8", *BUCKETS])
    return directory


@pytest.mark.usefixtures("fresh_accelerate")
def test_the_cache_holds_each_image_at_its_bucket_and_its_flip(parts, cache_dir):
    cache = LatentCache.read(cache_dir)
    assert cache.buckets == TABLE_32 and len(cache) == 4 * len(SIZES)
    vae = load_vae(parts["vae"])
    transform = BucketTransform(tuple(TABLE_32), 32)
    names = [json.loads(line)["file_name"] for line in (parts["data"] / "metadata.jsonl").read_text().splitlines()]
    by_size: dict[tuple[int, int], list[int]] = {}  # (W, H) -> cache positions, encoded together below
    for position in range(len(cache)):
        image = PIL.Image.open(parts["data"] / names[cache.row(position)["index"]])
        by_size.setdefault(TABLE_32[nearest_bucket(image.size, TABLE_32)], []).append(position)
    assert {size: len(p) for size, p in by_size.items()} == {(32, 32): 8, (40, 24): 8, (24, 40): 4, (64, 16): 4,
                                                             (16, 64): 4}
    for size, positions in by_size.items():
        rows = [cache.row(p) for p in positions]
        x = torch.stack([transform(PIL.Image.open(parts["data"] / names[r["index"]]), random.Random(0)) for r in rows])
        with torch.no_grad():
            mean = vae.encode(torch.cat([x, x.flip(-1)])).latent_dist.mean  # (2B, 4, H/2, W/2)
        torch.testing.assert_close(torch.stack([r["mean"] for r in rows]), mean[: len(rows)], atol=1e-5, rtol=1e-5)
        flips = torch.stack([cache.row(p, flipped=True)["mean"] for p in positions])
        torch.testing.assert_close(flips, mean[len(rows) :], atol=1e-5, rtol=1e-5)
        assert all(r["caption"] == f"a red ellipse on {names[r['index']].split('-')[0]}, number "
                   f"{int(names[r['index']].split('-')[1][0]) % 2}" for r in rows)
    ids = cache.dataset(seed=0).bucket_ids()  # (W, H) = 2 x the latent's (w, h)
    assert all(TABLE_32[i] == (cache.row(p)["mean"].shape[2] * 2, cache.row(p)["mean"].shape[1] * 2)
               for p, i in enumerate(ids))


@pytest.mark.usefixtures("fresh_accelerate")
@pytest.mark.parametrize("change, built", [
    (["data.bucket_step=16"], "buckets step=8, min_side=16, max_side=64, max_aspect=4.0 != step=16, min_side=16"),
    (["data.buckets=false"], "buckets step=8, min_side=16, max_side=64, max_aspect=4.0 != off"),
])
def test_a_changed_bucket_setting_makes_the_cache_stale(parts, cache_dir, capsys, change, built):
    with pytest.raises(SystemExit) as e:
        cache_latents.main([f"data.path={parts['data']}", f"cache.vae={parts['vae']}", f"cache.dir={cache_dir}",
                            "data.random_flip=true", "train.cpu=true", *BUCKETS, *change])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and f"is stale: it was built with {built}" in err, err
    assert err.endswith("(cache != this run): delete it or run train/cache_latents.py with cache.rebuild=true")


# ------------------------------------------------------------------------------------------------ training


def checkpoint(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(path.rglob("*.safetensors")) if not f.name.startswith("rng")
            for k, v in load_file(f).items()}


HARD = ["train.batch_size=2", "train.checkpoint_every=2", "data.random_flip=true", "train.caption_dropout=0.3",
        "cache.text_embeddings=true", "optim.warmup_steps=2", "train.ema_decay=0.9"]


@pytest.mark.slow  # one torch thread (pytestmark), as the killed process (OMP_NUM_THREADS=1): the same kernels
def test_mixed_aspect_training_killed_and_resumed_is_bit_exact(tmp_path, parts, monkeypatch):
    from conftest import reset_accelerate_state
    from test_faults import Run, kill_after_step

    shared = f"cache.dir={tmp_path / 'latents'}"
    train_ldm.main(args(tmp_path / "reference", parts, *HARD, shared, "train.max_steps=6"))
    reset_accelerate_state()
    # killed by SIGKILL during step 4 (its last checkpoint: step 2), reusing the latent and text caches
    killed = tmp_path / "killed"
    run = Run([sys.executable, str(ROOT / "train/train_ldm.py"), *args(killed, parts, *HARD, shared,
                                                                        "train.max_steps=6")], tmp_path / "run.log")
    try:
        kill = kill_after_step(run, 3, killed / "checkpoints")
    finally:
        run.kill()
    assert kill["checkpoint"] == 2 and "encoding latents" not in run.text, kill
    # the resumed run never runs the text encoder: every step's captions come from the text-embedding cache
    calls = []
    real = FrozenTextEncoder.encode
    monkeypatch.setattr(FrozenTextEncoder, "encode", lambda self, prompts: calls.append(prompts) or real(self, prompts))
    train_ldm.main(args(killed, parts, *HARD, shared, "train.max_steps=6") + ["--resume", "latest"])
    reset_accelerate_state()
    assert calls == []
    a = checkpoint(tmp_path / "reference/checkpoints/step-00000006")
    b = checkpoint(killed / "checkpoints/step-00000006")
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []


@pytest.mark.slow
def test_two_processes_train_on_buckets_with_the_text_cache(tmp_path, parts):
    out = tmp_path / "run"
    cmd = accelerate_launch(ROOT / "train/train_ldm.py", *args(out, parts, *HARD, "train.cpu=true",
                                                                 "train.max_steps=3"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "replicas identical across 2 processes" in result.stderr
    assert "9 aspect-ratio buckets (width x height: images)" in result.stderr
    assert "   32 x 32           8" in result.stderr
    state = json.loads((out / "checkpoints/step-00000003/state.json").read_text())
    assert state["batches_consumed"] == [3, 3]
    assert (out / "latents/text-embeddings.safetensors").is_file()
