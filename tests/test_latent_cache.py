"""The latent cache: exact round trip through the VAE, staleness and corruption refused, 2 processes, resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from conftest import free_port
from ldm.data.sources import build_image_dataset
from ldm.data.transforms import ImageTransform
from ldm.demo.shapes import write_dataset
from ldm.latents import (
    CorruptCacheError, LatentCache, MissingCacheError, StaleCacheError, collate_latents, sample_latents,
)
from ldm.vae.presets import build_vae

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train"))
import cache_latents  # noqa: E402

SCALE = 0.37
NUM_IMAGES = 13  # 12 shapes + 1 undecodable file; shards of 4 -> 4 shards from one process, 2 + 2 from two

# run_cli builds an Accelerator in this process; every test leaves a clean accelerate state behind (a run_cli in
# the module-scoped `clean` fixture included: the first test's teardown resets it). Several run_cli calls within one
# test share one state, which accelerate allows for identical settings.
pytestmark = pytest.mark.usefixtures("fresh_accelerate")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("latents")
    data = write_dataset(root / "data", num_images=12, seed=0, size=32)
    (data / "broken.png").write_text("not an image")
    with open(data / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "broken.png", "text": "nothing"}) + "\n")
    vae_dir = save_vae(root / "vae", seed=0, scaling_factor=SCALE)
    return SimpleNamespace(root=root, data=data, vae=vae_dir)


def save_vae(directory: Path, seed: int, scaling_factor: float) -> Path:
    torch.manual_seed(seed)
    vae = build_vae("tiny", 32)
    vae.register_to_config(scaling_factor=scaling_factor)
    vae.save_pretrained(directory)
    return directory


def run_cli(data: Path, vae: Path, cache_dir: Path, *overrides: str) -> None:
    """train/cache_latents.py in this process (one CPU process)."""
    argv = [f"data.path={data}", f"cache.vae={vae}", f"cache.dir={cache_dir}", "cache.shard_size=4",
            "data.random_flip=true", "train.cpu=true", *overrides]
    cache_latents.main(argv)


@pytest.fixture(scope="module")
def clean(assets) -> Path:
    """A cache built in one go by one process: the reference for the other tests (read-only)."""
    cache_dir = assets.root / "clean"
    run_cli(assets.data, assets.vae, cache_dir)
    return cache_dir


def copy_cache(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)  # copy2 keeps mtimes, but the tests compare mtimes of the copy only
    return target


def mtimes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in directory.glob("shard-*.safetensors")}


def assert_same_cache(a: LatentCache, b: LatentCache) -> None:
    """Equal contents, compared by dataset index (rows are sorted by index whatever process wrote them)."""
    assert a.indices.tolist() == b.indices.tolist()
    assert a.captions == b.captions
    assert a.tensors.keys() == b.tensors.keys()
    for name in a.tensors:
        torch.testing.assert_close(a.tensors[name], b.tensors[name], atol=1e-6, rtol=1e-5)
    assert a.skipped == b.skipped


def open_kwargs(cache_dir: Path, vae: Path, **changes) -> dict:
    """What `clean` was built with, with some values changed."""
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    kwargs = dict(vae=vae, data_fingerprint=manifest["data"]["fingerprint"], resolution=32, center_crop=True,
                  random_flip=True)
    return {**kwargs, **changes}


# ----------------------------------------------------------------------------------------------------------------


def test_cached_latents_reproduce_the_vae(assets, clean):
    cache = LatentCache.open(clean, **open_kwargs(clean, assets.vae))
    vae = AutoencoderKL.from_pretrained(assets.vae).eval()
    images = build_image_dataset(str(assets.data), transform=ImageTransform(32))
    items = [images[i] for i in cache.indices.tolist()]
    x = torch.stack([item["pixel_values"] for item in items])  # (12, 3, 32, 32)
    assert cache.captions == [item["caption"] for item in items]
    assert cache.latent_shape == (4, 16, 16) and cache.scaling_factor == SCALE

    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        torch.testing.assert_close(cache.tensors["mean"], posterior.mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.tensors["std"], posterior.std, atol=1e-5, rtol=1e-5)
        # latents are stored unscaled: decoding the cached mean is the VAE's own (deterministic) reconstruction
        reconstruction = vae(x, sample_posterior=False).sample
        torch.testing.assert_close(vae.decode(cache.tensors["mean"]).sample, reconstruction, atol=1e-5, rtol=1e-5)
        flipped = vae.encode(x.flip(-1)).latent_dist
    torch.testing.assert_close(cache.tensors["flip_mean"], flipped.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.tensors["flip_std"], flipped.std, atol=1e-5, rtol=1e-5)
    # ... which is not the same as flipping the latent (the VAE is not flip-equivariant)
    assert not torch.allclose(cache.tensors["flip_mean"], cache.tensors["mean"].flip(-1), atol=1e-3)

    batch = collate_latents([cache.row(0), cache.row(1, flipped=True)])
    z = sample_latents(batch["mean"], batch["std"], cache.scaling_factor, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(batch["mean"].shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z, (batch["mean"] + batch["std"] * eps) * SCALE)


def test_undecodable_images_are_skipped_and_listed(clean):
    manifest = json.loads((clean / "manifest.json").read_text())
    assert manifest["count"] == NUM_IMAGES - 1 and manifest["data"]["size"] == NUM_IMAGES
    assert len(manifest["skipped"]) == 1
    skipped = manifest["skipped"][0]
    assert skipped["name"] == "broken.png" and "not an image" in skipped["reason"]
    cache = LatentCache.read(clean)
    assert skipped["index"] not in cache.indices.tolist()
    assert cache.positions_of(range(NUM_IMAGES)) == list(range(NUM_IMAGES - 1))  # the skipped index has no row


def test_dataset_view_is_keyed_and_flips_half_the_time(clean):
    cache = LatentCache.read(clean)
    view = cache.dataset(seed=3)
    n = len(view)
    assert n == NUM_IMAGES - 1
    first = [view[key] for key in range(3 * n)]
    again = cache.dataset(seed=3)
    for key in (0, 5, 2 * n + 7):  # same (seed, key) -> same item, in any order, from a fresh view
        a, b = first[key], again[key]
        assert a["flipped"] == b["flipped"] and a["index"] == b["index"] and torch.equal(a["mean"], b["mean"])
    # key = epoch * len + position: the same image every epoch, its flip drawn afresh
    assert [first[k]["index"] for k in range(n)] == [first[n + k]["index"] for k in range(n)]
    flips = [view[key]["flipped"] for key in range(2000)]
    assert 0.45 < sum(flips) / len(flips) < 0.55
    other = cache.dataset(seed=4)
    assert [other[k]["flipped"] for k in range(200)] != flips[:200]
    item = next(view[k] for k in range(n) if view[k]["flipped"])
    position = cache.positions_of([item["index"]])[0]
    assert torch.equal(item["mean"], cache.tensors["flip_mean"][position])
    assert item["mean"].shape == (4, 16, 16) and item["mean"].dtype == torch.float32
    # a split's view: keys range over its own rows
    subset = cache.dataset(seed=3, indices=[4, 2, 12])  # 12 is the undecodable image
    assert len(subset) == 2 and {subset[k]["index"] for k in range(4)} == {4, 2}
    batch = collate_latents([view[k] for k in range(5)])
    assert batch["mean"].shape == (5, 4, 16, 16) and batch["indices"].shape == (5,) and len(batch["captions"]) == 5


def test_stale_cache_is_refused_naming_what_changed(assets, clean, tmp_path):
    other_weights = save_vae(tmp_path / "vae2", seed=1, scaling_factor=SCALE)
    with pytest.raises(StaleCacheError, match=r"different VAE \(weights sha256 \w{8}\.\. != \w{8}\.\.\).*rebuild=true"):
        LatentCache.open(clean, **open_kwargs(clean, other_weights))
    other_scale = shutil.copytree(assets.vae, tmp_path / "vae3")
    config = json.loads((other_scale / "config.json").read_text())
    (other_scale / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.5}))
    with pytest.raises(StaleCacheError, match=r"different VAE config \(scaling_factor 0.37 != 0.5\)"):
        LatentCache.open(clean, **open_kwargs(clean, other_scale))
    with pytest.raises(StaleCacheError, match="resolution 32 != 16"):
        LatentCache.open(clean, **open_kwargs(clean, assets.vae, resolution=16))
    with pytest.raises(StaleCacheError, match="random_flip True != False"):
        LatentCache.open(clean, **open_kwargs(clean, assets.vae, random_flip=False))
    with pytest.raises(StaleCacheError, match="different dataset"):
        LatentCache.open(clean, **open_kwargs(clean, assets.vae, data_fingerprint="0" * 32))


def test_changed_dataset_is_refused_then_rebuilt(assets, clean, tmp_path, capsys):
    data = shutil.copytree(assets.data, tmp_path / "data")
    cache_dir = copy_cache(clean, tmp_path / "cache")
    # the copy has the same files, sizes and mtimes: the same fingerprint, so the copied cache is valid for it
    run_cli(data, assets.vae, cache_dir)
    assert "keeping" not in capsys.readouterr().err  # a complete cache is opened, not rebuilt
    Image.new("RGB", (32, 32), (200, 10, 10)).save(data / "extra.png")
    with open(data / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "extra.png", "text": "a red square"}) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(data, assets.vae, cache_dir)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: latent cache" in err and "different dataset" in err and "cache.rebuild=true" in err
    run_cli(data, assets.vae, cache_dir, "cache.rebuild=true")
    cache = LatentCache.read(cache_dir)
    assert len(cache) == NUM_IMAGES and cache.captions.count("a red square") == 1


def test_corrupt_shard_is_named_and_rebuild_repairs_only_it(assets, clean, tmp_path, capsys):
    cache_dir = copy_cache(clean, tmp_path / "cache")
    shard = cache_dir / "shard-0-2.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the tensor data: same size, still parses
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptCacheError, match=r"shard shard-0-2.safetensors does not match its sha256"):
        LatentCache.read(cache_dir)
    truncated = cache_dir / "shard-0-1.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    with pytest.raises(CorruptCacheError, match=r"shard shard-0-1.safetensors has \d+ bytes instead of \d+"):
        LatentCache.read(cache_dir)
    with pytest.raises(SystemExit):
        run_cli(assets.data, assets.vae, cache_dir)
    assert "shard shard-0-1.safetensors" in capsys.readouterr().err

    before = mtimes(cache_dir)
    run_cli(assets.data, assets.vae, cache_dir, "cache.rebuild=true")
    after = mtimes(cache_dir)
    assert {n for n in before if before[n] == after[n]} == {"shard-0-0.safetensors", "shard-0-3.safetensors"}
    assert_same_cache(LatentCache.read(cache_dir), LatentCache.read(clean))


def test_interrupted_build_resumes_keeping_written_shards(assets, clean, tmp_path):
    cache_dir = copy_cache(clean, tmp_path / "cache")
    # as if killed while writing the third shard: no manifest, no shard-0-2, its temporary file left behind
    (cache_dir / "manifest.json").unlink()
    (cache_dir / "shard-0-2.safetensors").rename(cache_dir / ".tmp-shard-0-2.safetensors.12345")
    (cache_dir / "shard-0-3.safetensors").unlink()
    with pytest.raises(MissingCacheError, match="no manifest.json"):  # incomplete: refused by the reader
        LatentCache.read(cache_dir)
    before = mtimes(cache_dir)
    run_cli(assets.data, assets.vae, cache_dir)
    after = mtimes(cache_dir)
    assert before == {n: after[n] for n in before}  # shards 0 and 1 were kept untouched
    assert set(after) == {f"shard-0-{k}.safetensors" for k in range(4)}
    assert not list(cache_dir.glob(".tmp-*"))
    assert_same_cache(LatentCache.read(cache_dir), LatentCache.read(clean))


def test_fp16_cache_and_a_shard_of_only_skipped_images(assets, clean, tmp_path, capsys):
    cache_dir = copy_cache(clean, tmp_path / "cache")
    with pytest.raises(SystemExit):  # the dtype is part of what a cache must match
        run_cli(assets.data, assets.vae, cache_dir, "cache.dtype=fp16", "cache.shard_size=1")
    assert "dtype fp32 != fp16" in capsys.readouterr().err
    # one image per shard: the undecodable image's shard has zero rows (and lists it as skipped)
    run_cli(assets.data, assets.vae, cache_dir, "cache.dtype=fp16", "cache.shard_size=1", "cache.rebuild=true")
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert len(manifest["shards"]) == NUM_IMAGES and min(s["rows"] for s in manifest["shards"]) == 0
    half, full = LatentCache.read(cache_dir), LatentCache.read(clean)
    assert half.tensors["mean"].dtype == torch.float16 and half.skipped == full.skipped
    assert half.indices.tolist() == full.indices.tolist() and half.captions == full.captions
    for name in full.tensors:
        # (latents in fp16; the crop offsets (ldm.latents.micro_conditioning) stay int64)
        torch.testing.assert_close(half.tensors[name].to(full.tensors[name].dtype), full.tensors[name], atol=1e-3,
                                   rtol=1e-3)
    assert half.row(0)["mean"].dtype == torch.float32


@pytest.mark.slow
def test_two_processes_write_their_own_shards(assets, clean, tmp_path):
    cache_dir = tmp_path / "cache"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(ROOT / "train/cache_latents.py"),
           f"data.path={assets.data}", f"cache.vae={assets.vae}", f"cache.dir={cache_dir}", "cache.shard_size=4",
           "data.random_flip=true", "train.cpu=true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    # rank 0 encodes indices 0, 2, ..., 12 (7 images), rank 1 indices 1, 3, ..., 11 (6): two shards each
    assert [s["file"] for s in manifest["shards"]] == [
        "shard-0-0.safetensors", "shard-0-1.safetensors", "shard-1-0.safetensors", "shard-1-1.safetensors"
    ]
    assert manifest["count"] == NUM_IMAGES - 1 and manifest["world_size"] == 2
    assert_same_cache(LatentCache.read(cache_dir), LatentCache.read(clean))


def test_bad_settings_are_one_line_errors(assets, tmp_path, capsys):
    for overrides, message in [
        (["data.center_crop=false"], "error: config key 'data.center_crop': the latent cache stores centre crops only"),
        ([f"cache.vae={tmp_path / 'nowhere'}"], "does not exist: set cache.vae to a diffusers AutoencoderKL"),
        (["cache.dtype=fp64"], "error: config key 'cache.dtype': 'fp64' is not one of 'fp32', 'fp16'"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(assets.data, assets.vae, tmp_path / "cache", *overrides)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and len([line for line in err if line.startswith("error:")]) == 1
    assert not (tmp_path / "cache").exists()
