"""Loss masks (ldm/data/masks.py): read beside the image or from metadata.jsonl, through the image's own crop and
flip, area-averaged to latent resolution, keyed in the latent cache, weighting the loss; and the end-to-end runs: an
all-ones mask trains exactly as no mask, and a run with masks, flips and caption tag shuffling/dropout resumes
bit-exactly (tests/test_caption_tags.py has the tag rules themselves)."""

from __future__ import annotations

import json
import random
import sys
import tarfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file

from conftest import reset_accelerate_state
from ldm.data.buckets import BucketTransform
from ldm.data.masks import latent_mask
from ldm.data.sources import build_image_dataset
from ldm.data.transforms import ImageTransform
from ldm.errors import UserError
from ldm.latents.cache import LatentCache
from ldm.latents.cache_key import CacheSpec, VAEIdentity, differences
from ldm.latents.shard_writer import write_latent_shards
from ldm.unet.objective import NoiseConfig, build_noise_scheduler, denoising_error
from ldm.unet.presets import build_unet
from ldm.unet.tiny import write_tiny_stage2_inputs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train"))
import train_ldm  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny U-Nets: one thread is faster on shared cores


def gray(width: int, height: int, seed: int) -> PIL.Image.Image:
    """An asymmetric grey image: a ramp plus noise, so a wrong crop offset or a missing flip shows."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, width)[None, :] + np.linspace(0, 40, height)[:, None]
    return PIL.Image.fromarray((ramp + rng.integers(0, 15, (height, width))).clip(0, 255).astype(np.uint8), "L")


@pytest.mark.parametrize("transform", [ImageTransform(16, center_crop=False, random_flip=True),
                                       BucketTransform(((24, 16), (16, 16)), 16, center_crop=False, random_flip=True)])
def test_the_mask_goes_through_its_images_crop_and_flip(transform):
    # the mask is the image's own grey levels: after the shared transform it must equal the image's channel, pixel
    # for pixel (the same box, the same bicubic resample, the same flip; uint8 rounding per channel in both)
    mask = gray(37, 23, seed=1)
    flips = set()
    for seed in range(6):
        pixels, crop, weights = transform.apply_with_mask(mask.convert("RGB"), mask, random.Random(seed))
        assert weights.shape == (1, *pixels.shape[1:])
        assert torch.equal(torch.round((pixels[0] + 1) * 127.5), torch.round(weights[0] * 255))
        flips.add(crop.flipped)
    assert flips == {True, False}
    # the check sees a mask that is not flipped with its image
    pixels, crop, weights = transform.apply_with_mask(mask.convert("RGB"), mask, random.Random(0))
    assert not torch.equal(torch.round((pixels[0] + 1) * 127.5), torch.round(weights[0].flip(-1) * 255))


def test_a_folders_masks_are_found_beside_the_images_or_in_the_metadata(tmp_path):
    image, mask = gray(20, 16, 2).convert("RGB"), gray(20, 16, 3)
    beside = tmp_path / "beside"
    beside.mkdir()
    image.save(beside / "a.png")
    image.save(beside / "b.png")
    mask.save(beside / "a_mask.png")  # b has none: it weighs 1 everywhere
    listed = tmp_path / "listed"
    (listed / "masks").mkdir(parents=True)
    image.save(listed / "a.png")
    image.save(listed / "b.png")
    mask.save(listed / "masks" / "a.png")
    rows = [{"file_name": "a.png", "text": "x", "mask": "masks/a.png"},
            {"file_name": "b.png", "text": "y", "mask": None}]
    (listed / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    transform = ImageTransform(8, center_crop=True)
    expected = transform.apply_with_mask(image, mask, random.Random(0))[2]
    for folder, captions in ((beside, None), (listed, "text")):
        data = build_image_dataset(str(folder), transform=transform, caption_column=captions, masks="auto",
                                   cache_dir=str(tmp_path / "hf"))
        assert len(data) == 2  # a_mask.png is a mask, not a third image
        assert torch.equal(data[0]["mask"], expected)
        assert torch.equal(data[1]["mask"], torch.ones(1, 8, 8))
        assert data.masks_fingerprint() is not None
        off = build_image_dataset(str(folder), transform=transform, caption_column=captions, masks="ignore",
                                  cache_dir=str(tmp_path / "hf"))
        assert "mask" not in off[0] and off.masks_fingerprint() is None
    assert len(build_image_dataset(str(beside), transform=transform, caption_column=None,
                                   cache_dir=str(tmp_path / "hf"))) == 3  # masks off (stage 1's default): 3 images
    bare = tmp_path / "bare"
    bare.mkdir()
    image.save(bare / "a.png")
    with pytest.raises(UserError, match=r"^data.masks=require, but '.*bare' has no masks: add a \"mask\" column"):
        build_image_dataset(str(bare), transform=transform, caption_column=None, masks="require",
                            cache_dir=str(tmp_path / "hf"))
    with pytest.raises(UserError, match=r"masks are read from local image folders only and '.*\.tar' is tar shards"):
        build_image_dataset(str(tmp_path / "x-{0..1}.tar"), transform=transform, masks="require")


def test_a_mask_of_another_size_skips_its_image_saying_so(tmp_path):
    gray(20, 16, 2).convert("RGB").save(tmp_path / "a.png")
    gray(10, 16, 3).save(tmp_path / "a_mask.png")
    data = build_image_dataset(str(tmp_path), transform=ImageTransform(8), caption_column=None, masks="auto",
                               cache_dir=str(tmp_path / "hf"))
    assert data[0]["skipped"] == "a.png" and data[0]["reason"] == "its mask is 10x16 but its image 20x16"


def test_the_latent_mask_is_the_area_average_of_each_block():
    mask = torch.rand(2, 1, 16, 24, generator=torch.Generator().manual_seed(0))
    # independently: every 8 x 8 block's mean, by reshaping (B, 1, h, 8, w, 8), in float64
    expected = mask.double().reshape(2, 1, 2, 8, 3, 8).mean(dim=(3, 5))
    # float32 sums of 64 terms in [0, 1): at most 64 roundings of <= 2^-24 * 64 each, / 64 -> under 4e-6 (bound)
    assert torch.allclose(latent_mask(mask, 8).double(), expected, atol=4e-6, rtol=0)
    assert not torch.allclose(latent_mask(mask.flip(-1), 8).double(), expected, atol=1e-3)  # the check sees a flip
    assert torch.equal(latent_mask(torch.ones(1, 1, 16, 16), 8), torch.ones(1, 1, 2, 2))


def test_the_masked_loss_is_the_weighted_mean_per_sample():
    torch.manual_seed(0)
    unet = build_unet("tiny", sample_size=8, latent_channels=4, cross_attention_dim=32)
    scheduler = build_noise_scheduler(NoiseConfig())
    x0, eps, text = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.randn(3, 77, 32)
    t = torch.tensor([10, 500, 990])
    mask = torch.rand(3, 1, 8, 8)
    mask[1] = 0  # an all-zero mask: nothing trains, loss 0
    with torch.no_grad():
        mse, _ = denoising_error(unet, scheduler, x0, eps, t, text, NoiseConfig(), mask=mask)
        pred = unet(scheduler.add_noise(x0, eps, t), t, encoder_hidden_states=text).sample
        plain, _ = denoising_error(unet, scheduler, x0, eps, t, text, NoiseConfig())
        ones, _ = denoising_error(unet, scheduler, x0, eps, t, text, NoiseConfig(), mask=torch.ones(3, 1, 8, 8))
    err = (pred.double() - eps.double()) ** 2  # (B, C, h, w), by hand in float64
    by_hand = (err * mask.double()).sum(dim=(1, 2, 3)) / (mask.double().sum(dim=(1, 2, 3)) * 4)
    by_hand[1] = 0
    assert torch.allclose(mse.double(), by_hand, rtol=1e-5, atol=0)  # float32 reductions of 256 terms
    assert mse[1] == 0
    assert torch.equal(ones, plain)  # an all-ones mask is the plain mean, bit for bit


def test_masks_are_part_of_the_cache_key():
    spec = CacheSpec(vae=VAEIdentity("w", "c", {}), data_fingerprint="f", resolution=32, center_crop=True,
                     random_flip=True, caption_column="text", dtype="fp32")
    assert spec.build_id() == "05ad635018e4ec5dc31fa0b6d139db3e"  # before masks existed: old caches stay valid
    masked = CacheSpec(**{**spec.__dict__, "masks": "0123456789abcdef"})
    other = CacheSpec(**{**spec.__dict__, "masks": "fedcba9876543210"})
    assert len({spec.build_id(), masked.build_id(), other.build_id()}) == 3
    manifest = {"data": {"fingerprint": "f", "resolution": 32, "center_crop": True, "random_flip": True,
                         "caption_column": "text"}, "dtype": "fp32"}  # a cache built before masks existed
    assert differences(manifest, {"masks": None}) == []
    assert differences(manifest, {"masks": "0123456789abcdef"}) == ["no loss masks != loss masks 01234567.."]


# ---------------------------------------------------------------------------------------------------------------
# End to end: tiny runs of train/train_ldm.py on a folder of tag-captioned images with masks
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    """The tiny VAE and text encoder, and two copies of 8 tag-captioned 40x32 images listed in metadata.jsonl: with
    all-white masks ("ones") and with half-black ones ("half")."""
    root = tmp_path_factory.mktemp("masked")
    parts = write_tiny_stage2_inputs(root, num_images=1)
    rng = np.random.default_rng(0)
    for name, value in (("ones", 255), ("half", 0)):
        folder = root / name
        folder.mkdir()
        lines = []
        for i in range(8):
            PIL.Image.fromarray(rng.integers(0, 255, (32, 40, 3)).astype(np.uint8)).save(folder / f"{i}.png")
            mask = np.full((32, 40), 255, np.uint8)
            mask[:, :20] = value
            PIL.Image.fromarray(mask, "L").save(folder / f"{i}_m.png")
            lines.append(json.dumps({"file_name": f"{i}.png", "mask": f"{i}_m.png",
                                     "text": f"shape {i}, red, large, on white, centred"}))
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
        parts[name] = folder
    return parts


def train(out: Path, parts: dict[str, Path], data: str, *overrides: str, resume: str | None = None) -> None:
    argv = ["--config", str(ROOT / "configs/ldm/tiny.yaml"), f"train.output_dir={out}", f"data.path={parts[data]}",
            f"cache.vae={parts['vae']}", f"text_encoder.path={parts['text']}", "train.report_to=none",
            "sample.every=0", "data.num_val=0", "train.batch_size=2", "train.ema_decay=0", "optim.warmup_steps=0",
            *overrides]
    try:
        train_ldm.main(argv + (["--resume", resume] if resume else []))
    finally:
        reset_accelerate_state()


def weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    files = sorted((out / f"checkpoints/step-{step:08d}").rglob("*.safetensors"))
    return {k: v for f in files if not f.name.startswith("rng") for k, v in load_file(f).items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_an_all_ones_mask_trains_exactly_as_no_mask(tmp_path, parts, capsys):
    train(tmp_path / "masked", parts, "ones", "train.max_steps=2", "train.checkpoint_every=2")
    train(tmp_path / "plain", parts, "ones", "train.max_steps=2", "train.checkpoint_every=2", "data.masks=ignore")
    cache = LatentCache.read(tmp_path / "masked/latents")
    assert cache.has_masks and torch.equal(cache.tensors["mask"], torch.ones(8, 1, 16, 16))
    assert not LatentCache.read(tmp_path / "plain/latents").has_masks
    assert same(weights(tmp_path / "masked", 2), weights(tmp_path / "plain", 2))
    # the cache built without masks is not reused with them: refused as stale, naming the masks
    with pytest.raises(SystemExit):
        train(tmp_path / "x", parts, "ones", "train.max_steps=1", f"cache.dir={tmp_path / 'plain/latents'}")
    assert "is stale: it was built with no loss masks != loss masks " in capsys.readouterr().err


@pytest.mark.slow
def test_masks_and_tag_shuffling_resume_bit_exactly(tmp_path, parts):
    hard = ["train.checkpoint_every=1", "data.random_flip=true", "data.shuffle_tags=true", "data.keep_tokens=1",
            "data.tag_dropout=0.3", "train.caption_dropout=0.2", f"cache.dir={tmp_path / 'latents'}"]
    train(tmp_path / "a", parts, "half", *hard, "train.max_steps=3")
    train(tmp_path / "b", parts, "half", *hard, "train.max_steps=1")
    train(tmp_path / "b", parts, "half", *hard, "train.max_steps=3", resume="latest")
    cache = LatentCache.read(tmp_path / "latents")
    assert torch.equal(cache.tensors["mask"][:, :, :, :8], torch.zeros(8, 1, 16, 8))  # black left half: weight 0
    assert torch.equal(cache.tensors["mask"][:, :, :, 8:], torch.ones(8, 1, 16, 8))
    row = cache.row(0, flipped=True)  # the flipped copy's mask is mirrored with its latents
    assert torch.equal(row["mask"], cache.row(0)["mask"].flip(-1))
    tar = write_latent_shards(cache, str(tmp_path / "out-%05d.tar"), 8)[0]  # the cache as shards keeps the masks
    with tarfile.open(tar) as archive:
        tensors = load_safetensors(archive.extractfile("000000000.latents.safetensors").read())
    assert torch.equal(tensors["mask"], cache.row(0)["mask"]) and torch.equal(tensors["flip_mask"], row["mask"])
    assert same(weights(tmp_path / "a", 3), weights(tmp_path / "b", 3))
    # and the tag options act: without them the same step gives other weights
    train(tmp_path / "c", parts, "half", *hard[:2], hard[-1], "train.max_steps=1", "train.caption_dropout=0.2")
    assert not same(weights(tmp_path / "b", 1), weights(tmp_path / "c", 1))
