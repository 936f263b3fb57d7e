"""Tests for image-caption datasets (ldm.data.transforms, .decoding, .dataset, .sources) and ldm.data.batch_order
(the exact-resume batch sampler)."""

from __future__ import annotations

import io
import itertools
import json
import os
import random
import time
from pathlib import Path

# No network in tests: datasets / huggingface_hub must never try the hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import numpy as np
import PIL.Image
import pytest
import torch

from ldm import hub
from ldm.data.batch_order import ResumableBatchSampler
from ldm.data.dataset import ImageCaptionDataset, collate_images, split_train_val
from ldm.data.sources import build_image_dataset
from ldm.data.transforms import ImageTransform
from ldm.errors import UserError

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}


# ------------------------------------------------------------------------------------------------ helpers


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def noise_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> PIL.Image.Image:
    array = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return PIL.Image.fromarray(array, "RGB").convert(mode)


def write_metadata(folder: Path, rows: list[dict]) -> None:
    with open(folder / "metadata.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def build(folder: Path, tmp_path: Path, **kwargs) -> ImageCaptionDataset:
    kwargs.setdefault("transform", ImageTransform(8))
    return build_image_dataset(str(folder), cache_dir=str(tmp_path / "hf_cache"), **kwargs)


@pytest.fixture
def caption_folder(tmp_path: Path) -> Path:
    """Solid-colour images of assorted modes, sizes and formats, with captions naming their colour."""
    folder = tmp_path / "captioned"
    folder.mkdir()
    specs = [
        ("red.png", "red", "RGB", (40, 30)),
        ("green.jpg", "green", "RGB", (16, 48)),
        ("blue.png", "blue", "P", (20, 20)),
        ("white_rgba.png", "white", "RGBA", (24, 18)),
        ("white_gray.png", "white", "L", (12, 12)),
        ("red_cmyk.jpg", "red", "CMYK", (33, 21)),
    ]
    rows = []
    for name, color, mode, size in specs:
        PIL.Image.new("RGB", size, COLORS[color]).convert(mode).save(folder / name)
        rows.append({"file_name": name, "text": f"a {color} square", "extra": len(rows), "tags": ["x"]})
    write_metadata(folder, rows)
    return folder


# ------------------------------------------------------------------------------------------------ transform


def test_transform_shape_dtype_and_range() -> None:
    out = ImageTransform(16)(noise_image(40, 30), random.Random(0))
    assert out.shape == (3, 16, 16)
    assert out.dtype == torch.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert out.min() < -0.5 and out.max() > 0.5  # noise spans the range


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "CMYK", "RGBA"])
def test_white_maps_to_one_and_black_to_minus_one(mode: str) -> None:
    transform = ImageTransform(8, center_crop=False, random_flip=True)
    white = PIL.Image.new("RGB", (13, 9), (255, 255, 255)).convert(mode)
    black = PIL.Image.new("RGB", (13, 9), (0, 0, 0)).convert(mode)
    assert torch.equal(transform(white, random.Random(1)), torch.ones(3, 8, 8))
    assert torch.equal(transform(black, random.Random(1)), -torch.ones(3, 8, 8))


def test_mode_conversions_16bit_and_transparency() -> None:
    transform = ImageTransform(4)
    for value, expected in [(65535, 1.0), (0, -1.0)]:
        sixteen = PIL.Image.fromarray(np.full((6, 6), value, dtype=np.uint16))
        buffer = io.BytesIO()
        sixteen.save(buffer, "PNG")  # 16-bit grayscale PNG; Pillow opens it as I;16 (plain convert would clip)
        reopened = PIL.Image.open(io.BytesIO(buffer.getvalue()))
        assert reopened.mode.startswith("I")
        assert torch.equal(transform(reopened, random.Random(0)), torch.full((3, 4, 4), expected))
    mid = PIL.Image.fromarray(np.full((6, 6), 32896, dtype=np.uint16))  # 128 * 257
    assert torch.allclose(transform(mid, random.Random(0)), torch.full((3, 4, 4), 128 / 127.5 - 1), atol=1e-6)
    # Fully transparent pixels become white, not the black hiding under the alpha channel.
    transparent = PIL.Image.new("RGBA", (5, 5), (0, 0, 0, 0))
    assert torch.equal(transform(transparent, random.Random(0)), torch.ones(3, 4, 4))


def test_center_crop_keeps_the_centre() -> None:
    # Three vertical bands: red | green | blue. The centre square is exactly the green band.
    wide = PIL.Image.new("RGB", (96, 32))
    for i, color in enumerate(["red", "green", "blue"]):
        wide.paste(COLORS[color], (32 * i, 0, 32 * (i + 1), 32))
    out = ImageTransform(16)(wide, random.Random(0))
    green = torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1)
    assert torch.allclose(out[:, :, 2:14], green.expand(3, 16, 12), atol=1e-6)
    assert (out - green).abs().mean() < 0.05  # the outermost columns may blend slightly with the neighbours
    # Same for a tall image (bands stacked vertically).
    tall = wide.transpose(PIL.Image.Transpose.ROTATE_90)
    out = ImageTransform(16)(tall, random.Random(0))
    assert torch.allclose(out[:, 2:14, :], green.expand(3, 12, 16), atol=1e-6)


def test_flip_is_deterministic_for_a_fixed_rng() -> None:
    image = noise_image(20, 20)
    plain = ImageTransform(20)(image, random.Random(0))
    flipping = ImageTransform(20, random_flip=True)
    outcomes = set()
    for seed in range(24):
        first = flipping(image, random.Random(seed))
        assert torch.equal(first, flipping(image, random.Random(seed)))
        if torch.equal(first, plain):
            outcomes.add("kept")
        else:
            assert torch.equal(first, torch.flip(plain, dims=[2]))
            outcomes.add("flipped")
    assert outcomes == {"kept", "flipped"}


def test_random_crop_depends_on_rng() -> None:
    image = noise_image(64, 24)
    transform = ImageTransform(8, center_crop=False)
    crops = [transform(image, random.Random(seed)) for seed in range(8)]
    assert torch.equal(crops[0], transform(image, random.Random(0)))
    assert len({c.numpy().tobytes() for c in crops}) > 1


def test_bad_resolution_is_a_user_error() -> None:
    with pytest.raises(UserError, match="resolution"):
        ImageTransform(0)


# ------------------------------------------------------------------------------------------------ datasets


def test_captions_from_metadata(caption_folder: Path, tmp_path: Path) -> None:
    ds = build(caption_folder, tmp_path)
    assert len(ds) == 6
    items = [ds[i] for i in range(len(ds))]
    assert [item["index"] for item in items] == list(range(6))
    assert sorted(item["caption"] for item in items) == sorted(
        ["a red square", "a green square", "a blue square", "a white square", "a white square", "a red square"]
    )
    for item in items:  # every caption matches the colour of its own image
        color = item["caption"].split()[1]
        expected = torch.tensor(COLORS[color], dtype=torch.float32) / 127.5 - 1
        assert item["pixel_values"].shape == (3, 8, 8)
        assert torch.allclose(item["pixel_values"].mean(dim=(1, 2)), expected, atol=0.05), item["caption"]
    batch = collate_images(items)
    assert batch["pixel_values"].shape == (6, 3, 8, 8)
    assert batch["captions"] == [item["caption"] for item in items]
    assert batch["indices"].tolist() == list(range(6))
    assert batch["indices"].dtype == torch.long
    assert batch["skipped"] == []


def test_folder_without_metadata(tmp_path: Path) -> None:
    folder = tmp_path / "plain"
    folder.mkdir()
    for i in range(3):
        noise_image(10 + i, 12, seed=i).save(folder / f"img{i}.png")
    ds = build(folder, tmp_path, caption_column=None)
    assert len(ds) == 3
    assert [ds[i]["caption"] for i in range(3)] == ["", "", ""]
    # Captions are required by default: the error names the column and the way out.
    with pytest.raises(UserError, match=r"caption column 'text' not found.*null"):
        build(folder, tmp_path)


def test_missing_columns_are_named(caption_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"caption column 'prompt' not found.*columns: image, text, extra"):
        build(caption_folder, tmp_path, caption_column="prompt")
    with pytest.raises(UserError, match=r"image column 'picture' not found.*image, text"):
        build(caption_folder, tmp_path, image_column="picture")


def make_bad_folder(root: Path) -> tuple[Path, set[str], dict[str, str]]:
    """Good small images plus every kind of bad file; returns (folder, good names, bad name -> reason pattern)."""
    folder = root / "bad"
    folder.mkdir()
    good = {"good0.png", "good1.jpg", "good2.png", "good3.png"}
    noise_image(30, 30, seed=0).save(folder / "good0.png")
    noise_image(20, 40, seed=1).save(folder / "good1.jpg")
    noise_image(25, 25, seed=2, mode="L").save(folder / "good2.png")
    noise_image(16, 16, seed=3, mode="RGBA").save(folder / "good3.png")
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.png").write_text("this is not an image\n")
    for name, fmt in [("trunc.jpg", "JPEG"), ("trunc.png", "PNG")]:
        buffer = io.BytesIO()
        noise_image(30, 30, seed=5).save(buffer, fmt)
        data = buffer.getvalue()
        (folder / name).write_bytes(data[: len(data) // 2])
    noise_image(64, 64, seed=6).save(folder / "huge.png")  # 4096 pixels > max_pixels=1000 below
    bad = {
        "zero.png": "0 bytes",
        "text.png": "not an image",
        "trunc.jpg": "truncated",
        "trunc.png": "truncated",
        "huge.png": "too large",
    }
    return folder, good, bad


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_files_are_skipped_and_reported(tmp_path: Path, num_workers: int) -> None:
    folder, good, bad = make_bad_folder(tmp_path)
    ds = build(folder, tmp_path, caption_column=None, max_pixels=1000)  # building does not choke on bad files
    assert len(ds) == len(good) + len(bad)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_images, num_workers=num_workers)
    seen, skipped = [], []
    for batch in loader:  # never raises
        assert batch["pixel_values"].shape == (len(batch["indices"]), 3, 8, 8)
        assert len(batch["captions"]) == len(batch["indices"])
        seen += batch["indices"].tolist()
        skipped += batch["skipped"]
    assert len(seen) == len(good)
    reported = {entry.split(":", 1)[0]: entry.split(":", 1)[1] for entry in skipped}
    assert set(reported) == set(bad)
    for name, reason in bad.items():
        assert reason in reported[name], (name, reported[name])


def test_metadata_listing_a_missing_file(caption_folder: Path, tmp_path: Path) -> None:
    with open(caption_folder / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "gone.png", "text": "lost", "extra": 9, "tags": []}) + "\n")
    ds = build(caption_folder, tmp_path)
    assert ds[6] == {"skipped": "gone.png", "reason": "file not found", "index": 6, "resolution": 8}


def test_all_skipped_batch_is_empty_not_an_error(tmp_path: Path) -> None:
    folder, _, _ = make_bad_folder(tmp_path)
    ds = build(folder, tmp_path, caption_column=None, max_pixels=1000)
    names = [ds[i].get("skipped") for i in range(len(ds))]
    bad_keys = [i for i, name in enumerate(names) if name]
    batch = collate_images([ds[i] for i in bad_keys])
    assert batch["pixel_values"].shape == (0, 3, 8, 8)
    assert batch["indices"].shape == (0,)
    assert batch["captions"] == []
    assert len(batch["skipped"]) == len(bad_keys)


def test_dataset_augmentation_is_a_function_of_seed_and_key(tmp_path: Path) -> None:
    folder = tmp_path / "aug"
    folder.mkdir()
    noise_image(64, 20, seed=0).save(folder / "wide.png")
    noise_image(20, 20, seed=1).save(folder / "square.png")
    transform = ImageTransform(8, center_crop=False, random_flip=True)
    ds = build(folder, tmp_path, transform=transform, caption_column=None, seed=3)
    again = build(folder, tmp_path, transform=transform, caption_column=None, seed=3)
    other_seed = build(folder, tmp_path, transform=transform, caption_column=None, seed=4)
    wide = next(i for i in range(2) if ds._records[i]["image"]["path"].endswith("wide.png"))
    keys = [wide + 2 * epoch for epoch in range(8)]  # the same image in 8 epochs
    crops = [ds[k]["pixel_values"] for k in keys]
    assert all(ds[k]["index"] == wide for k in keys)
    for key, crop in zip(keys, crops):
        assert torch.equal(crop, ds[key]["pixel_values"])
        assert torch.equal(crop, again[key]["pixel_values"])
    assert len({c.numpy().tobytes() for c in crops}) > 1  # differs across epochs
    assert any(not torch.equal(ds[k]["pixel_values"], other_seed[k]["pixel_values"]) for k in keys)


def test_select_keeps_original_indices(caption_folder: Path, tmp_path: Path) -> None:
    ds = build(caption_folder, tmp_path)
    _, val = split_train_val(len(ds), 2, seed=0)
    val_ds = ds.select(val)
    assert len(val_ds) == 2
    assert [val_ds[k]["index"] for k in range(4)] == val + val  # keys wrap per epoch, indices stay original
    assert val_ds[0]["caption"] == ds[val[0]]["caption"]
    assert val_ds.fingerprint() == ds.fingerprint()


def test_split_train_val() -> None:
    train, val = split_train_val(20, 5, seed=1)
    assert (train, val) == split_train_val(20, 5, seed=1)
    assert len(val) == 5 and len(train) == 15
    assert sorted(train + val) == list(range(20))
    assert train == sorted(train) and val == sorted(val)
    assert split_train_val(20, 5, seed=2)[1] != val
    assert split_train_val(20, 0, seed=1) == (list(range(20)), [])
    with pytest.raises(UserError, match="num_val"):
        split_train_val(5, 5, seed=0)
    with pytest.raises(UserError, match="num_val"):
        split_train_val(5, -1, seed=0)


def test_hub_id_offline_fails_fast() -> None:
    start = time.monotonic()
    with pytest.raises(UserError, match=r"cannot load dataset 'someone/some-dataset' .*offline.*data\.path"):
        build_image_dataset("someone/some-dataset", transform=ImageTransform(8))
    assert time.monotonic() - start < 10


def test_hub_unreachable_without_offline_env_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    import huggingface_hub.constants

    # Simulate a process that imported the libraries online, then lost the network: no retries for ~25 s.
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "reachable", lambda timeout_s=3.0: False)
    start = time.monotonic()
    with pytest.raises(UserError, match="download it and set data.path"):
        build_image_dataset("someone/some-dataset", transform=ImageTransform(8))
    assert time.monotonic() - start < 10
    assert datasets.config.HF_HUB_OFFLINE is False  # the forced offline mode was undone


def test_bad_local_paths(tmp_path: Path) -> None:
    missing = tmp_path / "does" / "not" / "exist"
    with pytest.raises(UserError, match=f"'{missing}' does not exist"):
        build_image_dataset(str(missing), transform=ImageTransform(8))
    with pytest.raises(UserError, match="'no_such_folder' does not exist"):
        build_image_dataset("no_such_folder", transform=ImageTransform(8))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no image files"):
        build(empty, tmp_path)
    (empty / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="no image files"):
        build(empty, tmp_path)
    with pytest.raises(UserError, match="not a folder"):
        build(empty / "notes.txt", tmp_path)


def test_split_named_files_give_a_clear_error(tmp_path: Path) -> None:
    # datasets puts "my-test-image.png" in a "test" split and then has no "train" split at all.
    folder = tmp_path / "names"
    folder.mkdir()
    noise_image(8, 8).save(folder / "cat.png")
    noise_image(8, 8).save(folder / "my-test-image.png")
    with pytest.raises(UserError, match=r"split 'train' not found.*rename them or set data.split"):
        build(folder, tmp_path, caption_column=None)
    assert len(build(folder, tmp_path, caption_column=None, split="test")) == 1


def test_bad_metadata_is_a_user_error(tmp_path: Path) -> None:
    folder = tmp_path / "badmeta"
    folder.mkdir()
    noise_image(8, 8).save(folder / "a.png")
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{not json\n')
    with pytest.raises(UserError, match="cannot read image folder"):
        build(folder, tmp_path)


def test_rebuild_after_changes_is_not_stale(caption_folder: Path, tmp_path: Path) -> None:
    first = build(caption_folder, tmp_path)
    assert "a red square" in {first[i]["caption"] for i in range(len(first))}
    rows = [json.loads(line) for line in (caption_folder / "metadata.jsonl").read_text().splitlines()]
    for row in rows:
        row["text"] = row["text"].replace("square", "box")
    rows.append({"file_name": "new.png", "text": "a blue box", "extra": 7, "tags": []})
    PIL.Image.new("RGB", (9, 9), COLORS["blue"]).save(caption_folder / "new.png")
    write_metadata(caption_folder, rows)
    second = build(caption_folder, tmp_path)
    assert len(second) == 7
    assert {second[i]["caption"] for i in range(7)} == {"a red box", "a green box", "a blue box", "a white box"}
    # An image's content is read at access time (the Arrow cache stores only its path).
    PIL.Image.new("RGB", (40, 30), (0, 0, 0)).save(caption_folder / "red.png")
    red = next(i for i in range(7) if second._records[i]["image"]["path"].endswith("red.png"))
    assert torch.equal(build(caption_folder, tmp_path)[red]["pixel_values"], -torch.ones(3, 8, 8))


def test_fingerprint(tmp_path: Path) -> None:
    folder = tmp_path / "fp"
    folder.mkdir()
    for i in range(3):
        noise_image(8, 8, seed=i).save(folder / f"{i}.png")
    fp = build(folder, tmp_path, caption_column=None).fingerprint()
    assert isinstance(fp, str) and len(fp) >= 16
    assert build(folder, tmp_path, caption_column=None).fingerprint() == fp  # stable
    assert build(folder, tmp_path, caption_column=None, transform=ImageTransform(16)).fingerprint() == fp

    noise_image(8, 8, seed=9).save(folder / "3.png")  # added
    added = build(folder, tmp_path, caption_column=None).fingerprint()
    assert added != fp

    noise_image(8, 8, seed=10).save(folder / "0.png")  # modified content (and mtime)
    modified = build(folder, tmp_path, caption_column=None).fingerprint()
    assert modified not in (fp, added)

    stat = (folder / "1.png").stat()
    os.utime(folder / "1.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))  # touched only
    assert build(folder, tmp_path, caption_column=None).fingerprint() != modified


# ------------------------------------------------------------------------------------------------ sampler


def take(sampler: ResumableBatchSampler, count: int) -> list[list[int]]:
    return list(itertools.islice(iter(sampler), count))


def test_sampler_determinism_and_keys() -> None:
    sampler = ResumableBatchSampler(10, 3, seed=7)
    assert sampler.batches_per_epoch == 3
    batches = take(sampler, 9)  # three epochs
    assert batches == take(ResumableBatchSampler(10, 3, seed=7), 9)
    assert batches != take(ResumableBatchSampler(10, 3, seed=8), 9)
    assert all(len(b) == 3 for b in batches)
    for epoch in range(3):
        keys = [k for b in batches[3 * epoch : 3 * epoch + 3] for k in b]
        assert all(epoch * 10 <= k < (epoch + 1) * 10 for k in keys)  # key = epoch * n + index
        assert len(set(keys)) == 9  # no repeats within an epoch (one item sits out)
    orders = [[k % 10 for b in batches[3 * e : 3 * e + 3] for k in b] for e in range(3)]
    assert orders[0] != orders[1]  # reshuffled every epoch


def test_sampler_without_shuffle() -> None:
    batches = take(ResumableBatchSampler(7, 2, seed=0, shuffle=False), 4)
    assert batches == [[0, 1], [2, 3], [4, 5], [7, 8]]


def test_sampler_ranks_are_disjoint_and_equal() -> None:
    n, batch_size, world = 23, 3, 2
    samplers = [ResumableBatchSampler(n, batch_size, seed=1, rank=r, world_size=world) for r in range(world)]
    assert {s.batches_per_epoch for s in samplers} == {3}  # 23 // 6
    for epoch in range(2):
        per_rank = [take(s, 6)[3 * epoch : 3 * epoch + 3] for s in samplers]
        assert all(len(batches) == 3 and all(len(b) == 3 for b in batches) for batches in per_rank)
        keys = [set(k for b in batches for k in b) for batches in per_rank]
        assert not keys[0] & keys[1]
        assert len(keys[0] | keys[1]) == 2 * 3 * batch_size
    with pytest.raises(ValueError):
        ResumableBatchSampler(10, 2, seed=0, rank=2, world_size=2)


def test_sampler_too_few_items() -> None:
    with pytest.raises(UserError, match=r"dataset has 5 images but one step needs 6.*train.batch_size"):
        ResumableBatchSampler(5, 3, seed=0, world_size=2)
    with pytest.raises(UserError, match="batch"):
        ResumableBatchSampler(5, 0, seed=0)


@pytest.mark.parametrize("world_size", [1, 3])
def test_sampler_resume_equivalence(world_size: int) -> None:
    n, batch_size, total = 17, 2, 30
    for rank in range(world_size):
        uninterrupted = take(ResumableBatchSampler(n, batch_size, seed=5, rank=rank, world_size=world_size), total)
        bpe = ResumableBatchSampler(n, batch_size, seed=5, world_size=world_size).batches_per_epoch
        # Every split point, including those right before, at and after an epoch boundary.
        for j in range(total):
            head = take(ResumableBatchSampler(n, batch_size, seed=5, rank=rank, world_size=world_size), j)
            resumed = ResumableBatchSampler(n, batch_size, seed=5, rank=rank, world_size=world_size, start_batch=j)
            assert head + take(resumed, total - j) == uninterrupted, (rank, j, bpe)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_sampler_resume_through_dataloader(tmp_path: Path, num_workers: int) -> None:
    folder = tmp_path / "loader"
    folder.mkdir()
    for i in range(5):
        noise_image(12 + 3 * i, 10, seed=i).save(folder / f"{i}.png")
    ds = build(folder, tmp_path, transform=ImageTransform(8, center_crop=False, random_flip=True), caption_column=None)

    def batches(start: int, count: int, workers: int) -> list[dict]:
        sampler = ResumableBatchSampler(len(ds), 2, seed=3, start_batch=start)
        loader = torch.utils.data.DataLoader(
            ds, batch_sampler=sampler, collate_fn=collate_images, num_workers=workers
        )
        return list(itertools.islice(iter(loader), count))

    reference = batches(0, 7, workers=0)  # 2 batches per epoch: crosses three epoch boundaries
    resumed = batches(0, 3, workers=num_workers) + batches(3, 4, workers=num_workers)
    for want, got in zip(reference, resumed, strict=True):
        assert torch.equal(want["indices"], got["indices"])
        assert torch.equal(want["pixel_values"], got["pixel_values"])
    # Same item, different epochs -> different augmentation.
    firsts = {}
    for batch in reference:
        for index, pixels in zip(batch["indices"].tolist(), batch["pixel_values"]):
            firsts.setdefault(index, []).append(pixels)
    assert any(len(v) > 1 and not torch.equal(v[0], v[1]) for v in firsts.values())
