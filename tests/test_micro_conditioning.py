"""SDXL's micro-conditioning in the latent cache: each row's original size and crop offset, mirrored for its flip,
checked against hand-computed values and against the pixels they name; old caches stale; the 1024 px buckets."""

from __future__ import annotations

import json
import random
import shutil
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import reset_accelerate_state
from ldm.data.buckets import BucketTransform, bucket_settings, bucket_sizes
from ldm.data.config import DataConfig
from ldm.data.crops import CropGeometry
from ldm.data.transforms import ImageTransform
from ldm.latents import LatentCache, StaleCacheError, collate_latents
from ldm.latents import build as latents_build
from ldm.latents.micro_conditioning import batch_time_ids, time_ids
from ldm.latents.shard_writer import write_latent_shards
from ldm.pixels import pil_to_tensor
from ldm.vae.load_vae import load_vae
from ldm.vae.presets import build_vae

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train"))
import cache_latents  # noqa: E402

FLIP = PIL.Image.Transpose.FLIP_LEFT_RIGHT
BICUBIC = PIL.Image.Resampling.BICUBIC
# (W, H) as PIL writes sizes. At resolution 32 (the tiny VAE: factor 2; buckets: step 8, the table of
# tests/test_buckets.py) they crop as worked out by hand in EXPECTED.
SIZES = {"wide": (96, 64), "tall": (48, 96), "long": (120, 48)}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def render(width: int, height: int) -> PIL.Image.Image:
    """A left-to-right gradient (no image equals its mirror) with a red 8 x 8 marker near the left edge."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]  # (1, W, 1)
    pixels = np.broadcast_to(x * np.array([0.2, 0.6, 1.0], dtype=np.float32), (height, width, 3)).copy()
    top = height // 2 - 4
    pixels[top : top + 8, 4:12] = (255, 0, 0)
    return PIL.Image.fromarray(pixels.astype(np.uint8))


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("micro")
    data = root / "data"
    data.mkdir()
    for name, size in SIZES.items():
        render(*size).save(data / f"{name}.png")
    (data / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{n}.png", "text": n}) + "\n"
                                                 for n in SIZES))
    torch.manual_seed(0)
    build_vae("tiny", 32).save_pretrained(root / "vae")
    return SimpleNamespace(root=root, data=data, vae=root / "vae")


def build_cache(parts: SimpleNamespace, name: str, *overrides: str) -> LatentCache:
    directory = parts.root / name
    try:
        cache_latents.main([f"data.path={parts.data}", f"cache.vae={parts.vae}", f"cache.dir={directory}",
                            "data.resolution=32", "data.random_flip=true", "train.cpu=true", *overrides])
    finally:
        reset_accelerate_state()
    return LatentCache.read(directory)


def rows_by_caption(cache: LatentCache, flipped: bool) -> dict[str, dict]:
    return {cache.captions[p]: cache.row(p, flipped) for p in range(len(cache))}


def pixels_named(image: PIL.Image.Image, crop: CropGeometry, top_left: tuple[int, int]) -> torch.Tensor:
    """(3, h, w): what the offsets say the model sees: `image` resized by the crop's scale, cut at `top_left` (in
    one resample of that box, as the transforms do)."""
    (top, left), (h, w), s = top_left, crop.target_size, crop.scale
    return pil_to_tensor(image.resize((w, h), BICUBIC, box=(left / s, top / s, (left + w) / s, (top + h) / s)))[0]


# (original (h, w), crop_top_left, flipped crop_top_left, target (h, w)), worked out by hand:
# square, resolution 32: the short side becomes 32, the centre is cut.
#   wide 96x64 -> resized 48x32, left (48 - 32) / 2 = 8; flipped 48 - 8 - 32 = 8 (a centre crop is its own mirror)
#   tall 48x96 -> resized 32x64, top (64 - 32) / 2 = 16
#   long 120x48 -> resized 80x32, left (80 - 32) / 2 = 24; flipped 80 - 24 - 32 = 24
# buckets (TABLE_32 of test_buckets.py): resized to cover the bucket nearest the aspect ratio, centre cut.
#   wide 3:2 -> 40x24 (5:3); scale max(40/96, 24/64) = 5/12: resized 40 x 26.67, top (26.67 - 24) / 2 = 1.33 -> 1
#   tall 1:2 -> 24x48; scale 1/2: resized 24x48, nothing cut
#   long 5:2 -> 48x24 (2:1); scale max(48/120, 24/48) = 1/2: resized 60x24, left (60 - 48) / 2 = 6; flipped 6
# The unmirrored formula of diffusers #6234 (target width - left) would say 24, 24 and 42 for the flips.
EXPECTED = {
    "square": {"wide": ((64, 96), (0, 8), (0, 8), (32, 32)), "tall": ((96, 48), (16, 0), (16, 0), (32, 32)),
               "long": ((48, 120), (0, 24), (0, 24), (32, 32))},
    "buckets": {"wide": ((64, 96), (1, 0), (1, 0), (24, 40)), "tall": ((96, 48), (0, 0), (0, 0), (48, 24)),
                "long": ((48, 120), (0, 6), (0, 6), (24, 48))},
}


# ------------------------------------------------------------------------------------------------ the geometry


def test_offsets_name_the_pixels_of_each_copy_and_the_unmirrored_formula_does_not():
    image = render(96, 64)
    hits = 0
    for seed in range(6):  # random crops: 0 <= left <= 32 source pixels, i.e. 0..16 resized
        x, crop = ImageTransform(32, center_crop=False).apply(image, random.Random(seed))  # (3, 32, 32)
        left = crop.box[0]
        assert crop.original_size == (64, 96) and crop.resized_size == (32, 48) and crop.target_size == (32, 32)
        assert crop.crop_top_left == (0, round(left / 2))
        flipped = crop.mirrored().crop_top_left
        assert flipped == (0, round((96 - left - 64) / 2))  # source columns right of the 64 px box, resized
        if left % 2 == 0:  # on whole resized pixels: exactly resized width - left - target width
            assert flipped[1] == 48 - crop.crop_top_left[1] - 32
            # the offsets name the pixels: the crop itself, and for the flip, that crop of the mirrored image
            torch.testing.assert_close(pixels_named(image, crop, crop.crop_top_left), x, atol=0, rtol=0)
            mirrored = pixels_named(image.transpose(FLIP), crop, flipped)
            torch.testing.assert_close(mirrored, x.flip(-1), atol=1 / 127.5, rtol=0)  # one 8-bit level
            # the test can fail: off centre, the unmirrored offset names other pixels of the mirrored image
            if crop.crop_top_left[1] != 8:
                hits += 1
                wrong = pixels_named(image.transpose(FLIP), crop, crop.crop_top_left)
                assert (wrong - x.flip(-1)).abs().max() > 0.5
        assert flipped[1] != 32 - crop.crop_top_left[1]  # diffusers #6234: the crop's own width - left
    assert hits >= 2  # the pixel checks above ran on crops off the centre
    # the transform's own coin: a flipped output carries the mirrored offset
    for seed in range(4):
        x, crop = ImageTransform(32, center_crop=False, random_flip=True).apply(image, random.Random(seed))
        plain, plain_crop = ImageTransform(32, center_crop=False).apply(image, random.Random(seed))
        assert crop == (plain_crop.mirrored() if crop.flipped else plain_crop)
        assert torch.equal(x, plain.flip(-1) if crop.flipped else plain)


def test_a_random_bucket_crop_and_its_mirror():
    image = render(120, 48)
    for seed in range(4):
        x, crop = BucketTransform(((48, 24),), 32, center_crop=False).apply(image, random.Random(seed))
        left = crop.box[0]  # a float in [0, 24] source pixels: the crop is 96 of the 120 columns
        assert x.shape == (3, 24, 48) and crop.resized_size == (24, 60) and crop.target_size == (24, 48)
        assert crop.crop_top_left == (0, round(left / 2))
        assert crop.mirrored().crop_top_left == (0, round((24 - left) / 2))


# ------------------------------------------------------------------------------------------------ the cache


@pytest.fixture(scope="module")
def square(parts) -> LatentCache:
    return build_cache(parts, "square")


@pytest.fixture(scope="module")
def bucketed(parts) -> LatentCache:
    return build_cache(parts, "buckets", "data.buckets=true", "data.bucket_step=8")


@pytest.mark.parametrize("layout", ["square", "buckets"])
def test_the_cache_records_sizes_and_offsets_of_each_copy(layout, square, bucketed, tmp_path):
    cache = square if layout == "square" else bucketed
    for flipped in (False, True):
        for caption, row in rows_by_caption(cache, flipped).items():
            original, crop, flip_crop, target = EXPECTED[layout][caption]
            assert row["original_size"] == original and row["target_size"] == target, caption
            assert row["crop_top_left"] == (flip_crop if flipped else crop), (caption, flipped)
            assert (row["mean"].shape[1] * 2, row["mean"].shape[2] * 2) == target  # latent size x VAE factor 2
            assert time_ids(row).tolist() == [*original, *(flip_crop if flipped else crop), *target]
            assert time_ids(row).dtype == torch.float32 and isinstance(row["crop_top_left"][0], int)
    # through the keyed dataset view and its collate function: (B, 6) rows equal the items' time ids
    view = cache.dataset(seed=0)
    first = view[0]["mean"].shape
    items = [item for item in (view[key] for key in range(12)) if item["mean"].shape == first]  # one bucket
    batch = collate_latents(items)
    assert len(items) >= 4 and len({item["flipped"] for item in items}) == 2
    assert batch["original_size"].shape == (len(items), 2) and batch["crop_top_left"].dtype == torch.long
    assert torch.equal(batch_time_ids(batch), torch.stack([time_ids(item) for item in items]))
    # ... and in the webdataset export
    (path,) = write_latent_shards(cache, str(tmp_path / "out-%05d.tar"), 10)
    with tarfile.open(path) as tar:
        infos = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    for info, position in zip(infos, range(len(cache))):
        original, crop, flip_crop, target = EXPECTED[layout][cache.captions[position]]
        assert (info["original_size"], info["crop_top_left"], info["flip_crop_top_left"], info["target_size"]) == (
            list(original), list(crop), list(flip_crop), list(target))


@pytest.mark.usefixtures("fresh_accelerate")
def test_a_cached_random_crop_records_its_own_offset_and_the_mirrored_one(parts, monkeypatch):
    """The cache refuses random crops (one frozen crop would drop the augmentation), so a centre crop, its own
    mirror, is all it ever records. Encoding with a random crop here shows the recording is per row and mirrored,
    and that the flipped latents are the mirrored crop's."""
    monkeypatch.setattr(latents_build, "ImageTransform",
                        lambda resolution, center_crop, random_flip: ImageTransform(resolution, False, random_flip))
    cache = build_cache(parts, "random")
    vae = load_vae(parts.vae)
    off_centre = 0
    for position in range(len(cache)):
        row, flip = cache.row(position), cache.row(position, flipped=True)
        name = row["caption"]
        image = render(*SIZES[name])
        # the encoding dataset is seeded with 0, so the key of image `index` is the index itself
        x, crop = ImageTransform(32, center_crop=False).apply(image, random.Random(row["index"]))
        width, height = SIZES[name]
        left, top = crop.box[:2]
        scale = 32 / min(width, height)
        assert row["crop_top_left"] == (round(top * scale), round(left * scale))
        assert flip["crop_top_left"] == (round(top * scale), round((width - left - min(width, height)) * scale))
        off_centre += row["crop_top_left"] != flip["crop_top_left"]
        with torch.no_grad():
            mean = vae.encode(torch.stack([x, x.flip(-1)])).latent_dist.mean  # (2, 4, 16, 16)
        torch.testing.assert_close(row["mean"], mean[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(flip["mean"], mean[1], atol=1e-5, rtol=1e-5)
        if left == round(left) and (width - left - min(width, height)) * scale % 1 == 0:
            named = pixels_named(image.transpose(FLIP), crop, flip["crop_top_left"])
            torch.testing.assert_close(named, x.flip(-1), atol=1 / 127.5, rtol=0)
    assert off_centre >= 1  # wide and long were cut off centre, so the mirrored offsets differ


@pytest.mark.usefixtures("fresh_accelerate")
def test_an_old_format_cache_is_stale_in_one_line_and_rebuilt(parts, square, tmp_path, capsys):
    directory = shutil.copytree(square.directory, tmp_path / "old")
    manifest = json.loads((directory / "manifest.json").read_text())
    (directory / "manifest.json").write_text(json.dumps({**manifest, "version": 1}))  # before the crop offsets
    message = (f"latent cache {directory} is stale: it was built with format version 1 != 2 (cache != this run): "
               "delete it or run train/cache_latents.py with cache.rebuild=true")
    for open_it in (LatentCache.read, lambda d: LatentCache.open(d, vae=None, data_fingerprint=None, resolution=32,
                                                                  center_crop=True, random_flip=True)):
        with pytest.raises(StaleCacheError) as error:
            open_it(directory)
        assert str(error.value) == message
    argv = [f"data.path={parts.data}", f"cache.vae={parts.vae}", f"cache.dir={directory}", "data.resolution=32",
            "data.random_flip=true", "train.cpu=true"]
    with pytest.raises(SystemExit) as exit_info:
        cache_latents.main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and err[-1] == f"error: {message}"
    cache_latents.main(argv + ["cache.rebuild=true"])
    assert rows_by_caption(LatentCache.read(directory), True)["long"]["crop_top_left"] == (0, 24)


# ------------------------------------------------------------------------------------------------ the buckets


def test_default_buckets_are_sdxls_at_1024_and_unchanged_at_512():
    def table(resolution: int, **changes) -> list[tuple[int, int]]:
        cfg = DataConfig(resolution=resolution, buckets=True, **changes)
        return bucket_sizes(resolution, factor=8, **bucket_settings(cfg))

    sdxl = table(1024)
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in sdxl)
    assert all(0.9 * 1024**2 <= w * h <= 1024**2 for w, h in sdxl)  # about 1 Mpx, never more
    assert all(max(w / h, h / w) <= 4 for w, h in sdxl) and len(sdxl) == 33
    for size in [(1024, 1024), (1152, 896), (1216, 832), (1344, 768), (1536, 640), (2048, 512)]:
        assert size in sdxl and size[::-1] in sdxl
    # 512 px (SD 1.x) keeps its table and its settings (so its cache key) exactly
    assert table(512) == [(256, 960), (256, 1024), (320, 768), (320, 832), (320, 896), (384, 640), (384, 704),
                          (448, 576), (512, 512), (576, 448), (640, 384), (704, 384), (768, 320), (832, 320),
                          (896, 320), (960, 256), (1024, 256)]
    assert bucket_settings(DataConfig(resolution=512, buckets=True)) == {
        "step": 64, "min_side": 256, "max_side": 1024, "max_aspect": 4.0}
    # the rule can be chosen at either resolution
    assert (1920, 576) in table(1024, bucket_area="nearest") and (1920, 576) not in sdxl  # 1.05 Mpx: nearest
    assert table(512, bucket_area="at_most") != table(512)
