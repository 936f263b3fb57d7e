"""Hires fix: the second pass is exactly an img2img of the upscaled first pass, per-image seeds hold, the PNG says
what A1111 writes and replays, and bad hires values are one line each."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.generate import main
from ldm.pipeline.hires import HiresFix
from ldm.pipeline.pipeline import Pipeline
from conftest import run

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BASE = dict(steps=4, cfg=7.5, sampler="euler_a", seed=5, height=16, width=16, show_progress=False)


@pytest.fixture(scope="module")
def model(tiny_model) -> Path:
    return tiny_model  # tests/conftest.py: written once per session, read-only


@pytest.fixture(scope="module")
def pipe(model) -> Pipeline:
    return Pipeline.from_pretrained(model, device="cpu", dtype="fp32")


generate = partial(run, main)  # (argv, capsys) -> (exit code, stdout lines, stderr)


def test_lanczos_hires_is_img2img_of_the_resized_first_pass(pipe):
    hires = HiresFix(scale=2.0, strength=0.5, steps=6, upscaler="lanczos")
    calls = []
    result = pipe("a red car", **BASE, hires=hires, on_step=lambda done, total: calls.append((done, total)))
    assert result.images[0].size == (32, 32)
    # A1111's hires steps: the second pass runs all 6 (of a 12-step schedule, re-noised to half of it), after the 4
    assert calls[-1] == (4 + 6, 4 + 6) and len(calls) == 10
    # by hand: the first pass, Lanczos-resized, then img2img at the target size with the same seed and sampler, on
    # A1111's stretched schedule: int(6 / 0.5) = 12 steps, of which the last 6 run
    first = pipe("a red car", **BASE).images[0]
    by_hand = pipe("a red car", **{**BASE, "height": 32, "width": 32, "steps": 12},
                   init_image=first.resize((32, 32), Image.LANCZOS), strength=0.5)
    np.testing.assert_array_equal(np.asarray(result.images[0]), np.asarray(by_hand.images[0]))
    p = result.params[0]
    assert (p.width, p.height, p.steps, p.strength) == (16, 16, 4, None)  # the first pass, as A1111 records it
    assert (p.hires_scale, p.hires_strength, p.hires_steps, p.hires_upscaler) == (2.0, 0.5, 6, "lanczos")


def test_latent_hires_keeps_per_image_seeds_and_differs_from_lanczos(pipe):
    latent = HiresFix(scale=1.5, strength=0.6, upscaler="latent")
    together = pipe("a red car", **BASE, hires=latent, num_images=2, batch_size=2)
    alone = pipe("a red car", **{**BASE, "seed": 6}, hires=latent)
    assert together.images[1].size == (24, 24)  # int(16 x 1.5), a multiple of the VAE factor 2
    np.testing.assert_allclose(together.decoded[1], alone.decoded[0], atol=1e-5)  # batch-size independent
    lanczos = pipe("a red car", **BASE, hires=HiresFix(scale=1.5, strength=0.6, upscaler="lanczos"))
    assert np.abs(lanczos.decoded[0] - together.decoded[0]).max() > 1e-3
    plain = pipe("a red car", **BASE)
    assert plain.decoded.shape[1:3] == (16, 16)


def test_target_size_rounds_down_to_the_vae_factor():
    assert HiresFix(scale=1.3).target_size(512, 768, 8) == (664, 992)  # 665.6 -> 664, 998.4 -> 992
    assert HiresFix(scale=2).target_size(16, 16, 2) == (32, 32)


def test_cli_hires_png_metadata_and_replay(model, tmp_path, capsys):
    argv = ["a red car", "--model", str(model), "--steps", "4", "--height", "16", "--width", "16", "--seed", "3",
            "--hires-scale", "2", "--hires-strength", "0.5", "--hires-steps", "4", "--hires-upscaler", "Lanczos",
            "--outdir", str(tmp_path / "a"), "-q"]
    code, lines, err = generate(argv, capsys)
    assert code == 0, err
    image = Image.open(lines[0])
    assert image.size == (32, 32)
    assert image.info["parameters"] == (
        f"a red car\nSteps: 4, Sampler: Euler a, CFG scale: 7.5, Seed: 3, Size: 16x16, Model: {model}, "
        "Denoising strength: 0.5, Hires upscale: 2, Hires steps: 4, Hires upscaler: Lanczos")
    code, replay, err = generate(["--from-png", lines[0], "--outdir", str(tmp_path / "b"), "-q"], capsys)
    assert code == 0, err  # a hires PNG is txt2img: no --init-image needed to replay it
    np.testing.assert_array_equal(np.asarray(Image.open(replay[0])), np.asarray(image))
    assert Image.open(replay[0]).info["parameters"] == image.info["parameters"]


BAD = {
    "scale below 1": (["--hires-scale", "0.5"], "--hires-scale must be in [1, 8], got 0.5"),
    "scale not a number": (["--hires-scale", "nan"], "--hires-scale must be in [1, 8], got nan"),
    "strength zero": (["--hires-scale", "2", "--hires-strength", "0"], "--hires-strength must be in (0, 1], got 0.0"),
    "strength above one": (["--hires-scale", "2", "--hires-strength", "1.5"], "--hires-strength must be in (0, 1]"),
    "negative steps": (["--hires-scale", "2", "--hires-steps", "-1"], "--hires-steps must be >= 0"),
    "unknown upscaler": (["--hires-scale", "2", "--hires-upscaler", "R-ESRGAN 4x+"],
                         "hires upscaler 'R-ESRGAN 4x+' is not available; use --hires-upscaler latent or lanczos"),
    "options without a scale": (["--hires-strength", "0.5", "--hires-steps", "3"],
                                "--hires-strength, --hires-steps only apply with --hires-scale"),
    "too large": (["--hires-scale", "8", "--width", "2048"],
                  "--hires-scale 8.0 makes 2048x16 into 16384x128, over 8192"),
    "with an init image": (["--hires-scale", "2", "--init-image", "{init}"], "the hires fix is for txt2img"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_hires_values_are_one_line_and_write_nothing(case, model, tmp_path, capsys):
    extra, expected = BAD[case]
    init = tmp_path / "init.png"
    Image.new("RGB", (16, 16)).save(init)
    outdir = tmp_path / "out"
    argv = ["a red car", "--model", str(model), "--height", "16", "--width", "16", "--outdir", str(outdir),
            *[a.format(init=init) for a in extra]]
    code, lines, err = generate(argv, capsys)
    assert code == 2 and lines == [] and err.count("\n") == 1 and err.startswith("error: "), err
    assert expected in err, err
    assert not outdir.exists() or not any(outdir.iterdir())
