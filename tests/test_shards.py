"""WebDataset tar shards as a dataset: patterns, captions, per-process shards, bad shards and samples, the cache."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import webdataset as wds
from safetensors.torch import load as load_safetensors

from ldm.config import load_config
from ldm.data.dataset import collate_images
from ldm.data.loader import train_loader
from ldm.data.shards import expand_pattern, load_shards, process_indices
from ldm.data.sources import build_image_dataset
from ldm.data.transforms import ImageTransform
from ldm.errors import UserError
from ldm.latents import LatentCache
from ldm.latents import shard_writer
from ldm.latents.build import shard_plan
from ldm.latents.config import LatentCacheConfig
from ldm.latents.cache import parse_shard
from ldm.latents.shard_reader import open_latent_shards
from ldm.latents.shard_writer import write_latent_shards
from ldm.vae.presets import build_vae

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train"))
import cache_latents  # noqa: E402
from conftest import accelerate_launch  # noqa: E402
from shard_files import COLOURS, PER_SHARD, png_bytes, write_shards  # noqa: E402


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("shards")
    paths = write_shards(root / "data", 4, corrupt="000000007")
    return SimpleNamespace(root=root, paths=paths, pattern=str(root / "data" / "{00000..00003}.tar"),
                           index=str(root / "index"))


def load(pattern: str, index_dir: str, caption_column: str | None = "text", resolution: int = 16):
    return build_image_dataset(pattern, transform=ImageTransform(resolution, True, False), caption_column=caption_column,
                               cache_dir=index_dir)


def test_a_brace_pattern_reads_every_sample_with_its_caption_and_names_the_corrupt_one(shards):
    dataset = load(shards.pattern, shards.index, caption_column="caption")
    assert len(dataset) == 4 * PER_SHARD
    batch = collate_images([dataset[i] for i in range(len(dataset))])
    # 000000007 (shard 1, sample 2) does not decode: skipped, named by shard and member, the rest intact
    assert batch["skipped"] == ["00001.tar/000000007.jpg: not an image (unrecognised format)"]
    assert batch["indices"].tolist() == [i for i in range(20) if i != 7]
    assert batch["pixel_values"].shape == (19, 3, 16, 16)
    # .txt wins where present (even shards); else the json's caption column (img2dataset's json says "caption")
    assert batch["captions"][0] == "caption 000000000"
    assert batch["captions"][5] == "json caption 000000005"
    # pixel values follow the samples' colours (key k*5+j has colour j): red first, green second
    red = batch["pixel_values"][0].mean(dim=(1, 2))
    assert red[0] > 0.5 and red[1] < -0.5 and red[2] < -0.5
    # keys are epoch * len + index, as for image folders: the same sample one epoch later
    assert torch.equal(dataset[20 + 3]["pixel_values"], dataset[3]["pixel_values"])


def test_the_index_is_cached_and_a_changed_shard_is_reindexed(shards, tmp_path):
    index_dir = tmp_path / "index"
    first = load_shards(shards.pattern, "image", "text", str(index_dir))
    assert len(list(index_dir.glob("*.json"))) == 4
    again = load_shards(shards.pattern, "image", "text", str(index_dir))
    assert again.shard_starts == first.shard_starts == [0, 5, 10, 15, 20]
    fingerprint = load(shards.pattern, str(index_dir)).fingerprint()
    # a rewritten shard (other size and mtime) gets a new index and the dataset a new fingerprint (stale caches)
    copy = tmp_path / "data"
    paths = write_shards(copy, 2)
    pattern = str(copy / "{00000..00001}.tar")
    before = load(pattern, str(index_dir)).fingerprint()
    with wds.TarWriter(str(paths[1]), encoder=False) as sink:
        sink.write({"__key__": "x", "jpg": png_bytes((1, 2, 3), fmt="JPEG"), "txt": b"one"})
    rewritten = load(pattern, str(index_dir))
    assert len(rewritten) == PER_SHARD + 1 and rewritten.fingerprint() != before != fingerprint


def test_missing_broken_and_truncated_shards_are_skipped_named_and_counted(shards, tmp_path, caplog):
    data = tmp_path / "data"
    paths = write_shards(data, 4)
    (data / "00001.tar").write_bytes(b"this is not a tar file at all" * 40)
    whole = paths[2].read_bytes()
    # cut into the 4th sample's image: the first 3 samples survive (each sample: jpg + json + txt members)
    with tarfile.open(paths[2]) as tar:
        cut = [m for m in tar.getmembers() if m.name.endswith(".jpg")][3].offset_data + 10
    paths[2].write_bytes(whole[:cut])
    with caplog.at_level(logging.WARNING):
        records = load_shards(str(data / "{00000..00004}.tar"), "image", "text", str(tmp_path / "index"))
    assert len(records) == PER_SHARD + 3 + PER_SHARD  # shard 0, 3 of shard 2, shard 3
    assert len(records.problems) == 3
    problems = "\n".join(records.problems)
    assert "00001.tar: not a tar archive" in problems
    assert "00002.tar: truncated in member 000000013.jpg (kept 3 samples before it)" in problems
    assert "00004.tar: missing" in problems
    assert "skipped 3 of 5 shards of" in caplog.text


def test_a_pattern_without_samples_or_captions_is_one_clear_error(tmp_path, shards):
    with pytest.raises(UserError, match=r"matches 2 shard names but no readable samples \(.*00000.tar: missing"):
        load_shards(str(tmp_path / "{00000..00001}.tar"), "image", "text", str(tmp_path / "index"))
    with pytest.raises(UserError, match="expands to no shard names"):
        expand_pattern("::")
    with pytest.raises(UserError, match=r"the 'gs://' scheme is not supported: use a local path, http://, https://"):
        expand_pattern("gs://bucket/{0..3}.tar")
    with pytest.raises(UserError, match="pipe: sources are not supported"):
        expand_pattern("pipe:curl -s https://example.com/0.tar")
    assert expand_pattern("https://example.com/{0..2}.tar") == [f"https://example.com/{k}.tar" for k in range(3)]
    bare = tmp_path / "bare.tar"
    with wds.TarWriter(str(bare), encoder=False) as sink:
        sink.write({"__key__": "a", "png": png_bytes((9, 9, 9))})
    with pytest.raises(UserError, match=r"no sample of .* has a \.txt or \.json caption member"):
        load_shards(str(bare), "image", "text", str(tmp_path / "index"))
    assert len(load_shards(str(bare), "image", None, str(tmp_path / "index"))) == 1


def test_each_process_gets_its_own_shards(shards):
    records = load_shards(shards.pattern, "image", "text", shards.index)
    own = [process_indices(records, rank, 2) for rank in range(2)]
    assert own == [list(range(0, 5)) + list(range(10, 15)), list(range(5, 10)) + list(range(15, 20))]
    assert {records.shard_of(i) for i in own[0]} == {0, 2}
    dataset = load(shards.pattern, shards.index)
    plans = [shard_plan(len(dataset), r, 2, 4, dataset.process_indices(r, 2)) for r in range(2)]
    assert plans[1] == [[5, 6, 7, 8], [9, 15, 16, 17], [18, 19]]


def cache_argv(shards: SimpleNamespace, vae_dir: Path, cache_dir: Path) -> list[str]:
    return [f"data.path={shards.pattern}", f"cache.vae={vae_dir}", f"cache.dir={cache_dir}", "cache.shard_size=8",
            "data.resolution=16", "train.cpu=true", "data.caption_column=caption"]


@pytest.fixture(scope="module")
def cached(shards) -> SimpleNamespace:
    """A tiny VAE and the latent cache of the shards built by one process (read-only for the tests)."""
    vae_dir = shards.root / "vae"
    torch.manual_seed(0)
    build_vae("tiny", 16).save_pretrained(vae_dir)
    cache_dir = shards.root / "cache"
    cache_latents.main(cache_argv(shards, vae_dir, cache_dir))
    return SimpleNamespace(vae=vae_dir, dir=cache_dir)


@pytest.mark.usefixtures("fresh_accelerate")
def test_the_latent_cache_builds_from_shards_resumes_and_exports_as_shards(shards, cached, tmp_path, capsys):
    cache_dir = shutil.copytree(cached.dir, tmp_path / "cache")
    argv = cache_argv(shards, cached.vae, cache_dir)
    cache = LatentCache.read(cache_dir)
    assert len(cache) == 19 and [s["name"] for s in cache.skipped] == ["00001.tar/000000007.jpg"]
    # an interrupted build (no manifest, one shard lost) re-encodes only the lost shard, to the same latents
    shard_files = sorted(cache_dir.glob("shard-*.safetensors"))
    kept = {p.name: p.stat().st_mtime_ns for p in shard_files}
    (cache_dir / "manifest.json").unlink()
    lost = shard_files[1]
    lost.unlink()
    cache_latents.main(argv)
    assert sorted(p.name for p in cache_dir.glob("shard-*.safetensors")) == sorted(kept)
    for path in cache_dir.glob("shard-*.safetensors"):
        assert (path.stat().st_mtime_ns == kept[path.name]) == (path != lost)
    resumed = LatentCache.read(cache_dir)
    assert torch.equal(resumed.indices, cache.indices) and resumed.captions == cache.captions
    assert all(torch.equal(resumed.tensors[k], cache.tensors[k]) for k in cache.tensors)
    # the cache as webdataset shards, read back with webdataset's own reader
    written = write_latent_shards(LatentCache.read(cache_dir), str(tmp_path / "out" / "latents-%05d.tar"), 8)
    assert [p.name for p in written] == ["latents-00000.tar", "latents-00001.tar", "latents-00002.tar"]
    samples = [s for s in wds.WebDataset([str(p) for p in written], shardshuffle=False).decode()
               if s["__key__"] != "cache"]  # each shard starts with the cache's manifest
    assert len(samples) == 19 and samples[0]["__key__"] == "000000000"
    first = LatentCache.read(cache_dir).row(0)
    tensors = load_safetensors(samples[0]["latents.safetensors"])
    assert torch.equal(tensors["mean"].float(), first["mean"]) and samples[0]["txt"] == first["caption"]
    assert samples[0]["json"]["index"] == 0
    # ... and read back for training (cache.shards): the same in-memory cache as the directory, bit for bit
    pattern = str(tmp_path / "out" / "latents-{00000..00003}.tar")  # 00003 does not exist: skipped and counted
    assert_same_cache(open_latent_shards(pattern), LatentCache.read(cache_dir))
    with pytest.raises(UserError, match=r"latent shards .* were built with resolution 16 != 32 \(shards != this run\)"):
        open_latent_shards(pattern, resolution=32)
    with pytest.raises(UserError, match=r"matches 1 shard names but none is readable \(.*missing"):
        open_latent_shards(str(tmp_path / "out" / "nothing-00000.tar"))
    with pytest.raises(UserError, match=r"'cache.shards': cannot be used with cache.text_embeddings=true"):
        load_config(LatentCacheConfig, None, ["shards=s3://b/{0..1}.tar", "text_embeddings=true"])
    with pytest.raises(SystemExit) as exit_info:  # the CLI: a bad output pattern is one line, exit 2
        shard_writer.main([str(cache_dir), str(tmp_path / "latents.tar")])
    assert exit_info.value.code == 2
    assert "has no %-placeholder for the shard number" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_encode_their_own_shards(shards, cached, tmp_path):
    cache_dir = tmp_path / "cache"
    cmd = accelerate_launch(ROOT / "train" / "cache_latents.py", *cache_argv(shards, cached.vae, cache_dir))
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    # rank 0 owns tar shards 0 and 2 (indices 0-4, 10-14), rank 1 shards 1 and 3 (5-9 with 7 undecodable, 15-19)
    owned = {s["file"]: parse_shard((cache_dir / s["file"]).read_bytes()).covered_indices()
             for s in manifest["shards"]}
    assert owned == {
        "shard-0-0.safetensors": [0, 1, 2, 3, 4, 10, 11, 12], "shard-0-1.safetensors": [13, 14],
        "shard-1-0.safetensors": [5, 6, 7, 8, 9, 15, 16, 17], "shard-1-1.safetensors": [18, 19],
    }
    one, two = LatentCache.read(cached.dir), LatentCache.read(cache_dir)
    assert one.indices.tolist() == two.indices.tolist() and one.captions == two.captions
    for name in one.tensors:
        torch.testing.assert_close(one.tensors[name], two.tensors[name], atol=1e-6, rtol=1e-5)


def assert_same_cache(read: LatentCache, cache: LatentCache) -> None:
    """Everything training takes from a cache: rows by index, captions, every tensor (dtype too), the manifest."""
    assert torch.equal(read.indices, cache.indices) and read.captions == cache.captions
    assert read.tensors.keys() == cache.tensors.keys()
    for name, tensor in cache.tensors.items():
        assert read.tensors[name].dtype == tensor.dtype and torch.equal(read.tensors[name], tensor), name
    assert {k: v for k, v in read.manifest.items() if k not in ("shards", "row_shape")} == \
        {k: v for k, v in cache.manifest.items() if k != "shards"}
    one, two = read.dataset(seed=5), cache.dataset(seed=5)
    for key in (0, 3, len(two) + 1):
        a, b = one[key], two[key]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k]
                                            for k in a)


def test_a_resumed_loader_restarts_at_the_same_shard_and_sample(shards):
    """Data order is a function of (seed, epoch, index), as for folders: batch k of a resumed run is batch k."""
    dataset = load(shards.pattern, shards.index)
    process = SimpleNamespace(process_index=0, num_processes=1)

    def batches(start: int, n: int) -> list[dict]:
        it = iter(train_loader(dataset, 4, 0, seed=3, accelerator=process, start_batch=start))
        return [next(it) for _ in range(n)]

    full, resumed = batches(0, 7), batches(4, 3)  # 5 batches per epoch: the resumed run crosses into epoch 1
    for a, b in zip(full[4:], resumed):
        assert a["indices"].tolist() == b["indices"].tolist() and torch.equal(a["pixel_values"], b["pixel_values"])
    records = dataset._records
    first = int(resumed[0]["indices"][0])
    assert (records.shard_of(first), first - records.shard_starts[records.shard_of(first)]) == divmod(first, PER_SHARD)


@pytest.mark.slow
def test_a_bucketed_cache_exports_each_row_at_its_bucket_and_an_empty_one_is_refused(shards, cached, tmp_path):
    wide = tmp_path / "wide" / "00000.tar"  # 3:1 and 1:2 images: two non-square buckets
    wide.parent.mkdir()
    with wds.TarWriter(str(wide), encoder=False) as sink:
        for j, size in enumerate([(48, 16), (16, 32), (48, 16)]):
            sink.write({"__key__": f"{j:09d}", "png": png_bytes(COLOURS[j], size), "txt": f"wide {j}".encode()})
    cache_dir = tmp_path / "bucketed"
    argv = cache_argv(SimpleNamespace(pattern=str(wide)), cached.vae, cache_dir)
    cache_latents.main([a for a in argv if not a.startswith("data.caption_column")]
                       + ["data.buckets=true", "data.bucket_step=8", "data.caption_column=txt"])
    cache = LatentCache.read(cache_dir)
    written = write_latent_shards(cache, str(tmp_path / "out" / "b-%05d.tar"), 100)
    samples = list(wds.WebDataset([str(p) for p in written], shardshuffle=False).decode())[1:]  # [0]: the manifest
    assert len(samples) == len(cache) == 3
    assert_same_cache(open_latent_shards(str(written[0])), cache)  # zero-padded bucket rows, re-padded
    buckets = []
    for position, sample in enumerate(samples):
        row, tensors = cache.row(position), load_safetensors(sample["latents.safetensors"])
        width, height = sample["json"]["bucket"]
        buckets.append((width, height))
        assert (width, height) == tuple(cache.buckets[cache.bucket_ids([position])[0]])
        assert tensors["mean"].shape == row["mean"].shape
        assert tensors["mean"].shape[2] * height == tensors["mean"].shape[1] * width  # (C, H/f, W/f)
        assert torch.equal(tensors["mean"].float(), row["mean"]) and torch.equal(tensors["std"].float(), row["std"])
    assert buckets[0] == buckets[2] and buckets[0][0] > buckets[0][1] and buckets[1][0] < buckets[1][1]

    # with a text-embedding cache beside the latents, each sample carries its caption's embedding, and every shard
    # the empty caption's (caption dropout)
    from ldm.latents.text_cache import FILE_NAME, build_text_cache, encoder_key
    from ldm.text.tiny import tiny_clip_text_encoder

    encoder = tiny_clip_text_encoder()
    build_text_cache(cache_dir / FILE_NAME, encoder, encoder_key(encoder), cache.captions)
    written = write_latent_shards(cache, str(tmp_path / "text" / "t-%05d.tar"), 2)
    samples = [s for p in written for s in wds.WebDataset([str(p)], shardshuffle=False)]
    assert [s["__key__"] for s in samples] == ["cache", "empty", "000000000", "000000001", "cache", "empty",
                                              "000000002"]
    for sample in [s for s in samples if s["__key__"] != "cache"]:
        caption = "" if sample["__key__"] == "empty" else sample["txt"].decode()
        embedding = load_safetensors(sample["text.safetensors"])["embedding"]
        assert torch.equal(embedding, encoder.encode([caption])[0])

    class Empty:
        directory = cache_dir

        def __len__(self) -> int:
            return 0

    with pytest.raises(UserError, match="has no rows .*nothing to export"):
        write_latent_shards(Empty(), str(tmp_path / "e-%05d.tar"))
