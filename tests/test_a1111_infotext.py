"""PNGs written by AUTOMATIC1111's webui: its `parameters` text parsed, its sampler names mapped, its model replaced
by --model, the fields we do not use named once; and `--width 0` refused."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from ldm.generate import main
from ldm.pipeline.metadata import format_parameters, parse_parameters, unread_fields
from ldm.pipeline.request import GenerationRequest
from ldm.pipeline.samplers import sampler_from_label
from conftest import run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# What A1111 v1.10 writes (modules/processing.py create_infotext: prompt, "Negative prompt: ...", then the fields
# joined by ", " in its order; hires fields come from extra_generation_params, Version last). Size 32x32 and 2 steps
# so that the tiny test model can replay it.
A1111_TEXT = (
    "a red car, (masterpiece:1.2), photo\n"
    "Negative prompt: blurry, lowres\n"
    "Steps: 2, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 32x32, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, VAE hash: 735e4c3a44, "
    "VAE: vae-ft-mse-840000-ema-pruned.safetensors, Version: v1.10.1"
)
A1111_HIRES = (
    "a castle on a hill\n"
    "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.5, Seed: 42, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, Hires upscale: 2, "
    "Hires steps: 10, Hires upscaler: Latent, Version: v1.10.1"
)


@pytest.fixture(scope="module")
def model(tiny_model) -> Path:
    return tiny_model  # tests/conftest.py: written once per session, read-only


generate = partial(run, main)  # (argv, capsys) -> (exit code, stdout lines, stderr)


def a1111_png(path: Path, text: str) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (32, 32)).save(path, pnginfo=info)
    return path


def test_a1111_text_is_parsed_with_its_sampler_schedule_and_unused_fields():
    p = parse_parameters(A1111_TEXT)
    assert p == {
        "prompt": "a red car, (masterpiece:1.2), photo", "negative_prompt": "blurry, lowres", "steps": 2,
        "sampler": "dpmpp_2m", "schedule": "karras", "cfg": 7.0, "seed": 1234, "width": 32, "height": 32,
        "model": "v1-5-pruned-emaonly",
    }
    assert unread_fields(A1111_TEXT) == ["Model hash", "VAE hash", "VAE", "Version"]
    # older A1111 versions put Karras into the sampler's name instead of "Schedule type"
    old = A1111_TEXT.replace("Sampler: DPM++ 2M, Schedule type: Karras", "Sampler: DPM++ 2M Karras")
    assert parse_parameters(old) == p
    # the hires fix: Size is the first pass, Denoising strength the second pass's (not an img2img strength)
    h = parse_parameters(A1111_HIRES)
    assert (h["width"], h["height"], h["sampler"], h["schedule"]) == (512, 768, "euler_a", "")
    assert (h["hires_scale"], h["hires_strength"], h["hires_steps"], h["hires_upscaler"]) == (2.0, 0.45, 10, "latent")
    assert "strength" not in h
    # and we write a hires image the way A1111 does, which parses back to the same settings
    ours = GenerationRequest(**{**h, "model": "m"})
    assert format_parameters(ours).endswith(
        "Size: 512x768, Model: m, Denoising strength: 0.45, Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent")
    assert GenerationRequest(**parse_parameters(format_parameters(ours))) == ours


@pytest.mark.parametrize("name, expected", [
    ("Euler a", ("euler_a", "")), ("euler A", ("euler_a", "")), ("Euler", ("euler", "")),
    ("DPM++ 2M Karras", ("dpmpp_2m", "karras")), ("dpm++ 2m", ("dpmpp_2m", "")), ("DDIM", ("ddim", "")),
    ("PLMS", ("pndm", "")), ("UniPC", ("unipc", "")), ("LMS Karras", ("lms", "karras")), ("Heun", ("heun", "")),
    ("k_dpmpp_2m_ka", ("dpmpp_2m", "karras")), ("k_euler_a", ("euler_a", "")), ("DPMPP_2M", ("dpmpp_2m", "")),
    ("LCM", ("lcm", "")), ("k_lcm", ("lcm", "")), ("TCD", ("tcd", "")), ("Euler SGM Uniform", ("euler", "sgm_uniform")),
    ("euler_ancestral", ("euler_a", "")), ("Euler a SGMUniform", ("euler_a", "sgm_uniform")),
    ("dpmpp_2m_karras", ("dpmpp_2m_karras", "")),
])
def test_a1111_sampler_names_map_to_ours(name, expected):
    assert sampler_from_label(name) == expected


def test_an_a1111_png_replays_with_model_override_and_one_warning(model, tmp_path, capsys):
    png = a1111_png(tmp_path / "a1111.png", A1111_TEXT)
    code, lines, err = generate(["--from-png", str(png), "--model", str(model), "--outdir", str(tmp_path / "r"),
                                 "-q"], capsys)
    assert code == 0, err
    warning = f"warning: '{png}': ignoring fields ldm-generate does not use: Model hash, VAE hash, VAE, Version\n"
    assert err == warning  # named once, in one line
    text = Image.open(lines[0]).info["parameters"]
    assert text == ("a red car, (masterpiece:1.2), photo\nNegative prompt: blurry, lowres\nSteps: 2, Sampler: DPM++ "
                    f"2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 32x32, Model: {model}")
    # the same image as asking for it by A1111's sampler name on the command line
    code, direct, err = generate(["a red car, (masterpiece:1.2), photo", "--negative", "blurry, lowres", "--model",
                                  str(model), "--sampler", "dpm++ 2M karras", "--cfg", "7", "--seed", "1234",
                                  "--steps", "2", "--width", "32", "--height", "32", "--outdir", str(tmp_path / "d"),
                                  "-q"], capsys)
    assert code == 0, err
    np.testing.assert_array_equal(np.asarray(Image.open(direct[0])), np.asarray(Image.open(lines[0])))


def test_an_a1111_model_name_without_model_says_pass_model(tmp_path, capsys):
    png = a1111_png(tmp_path / "a1111.png", A1111_TEXT)
    code, lines, err = generate(["--from-png", str(png), "--outdir", str(tmp_path / "r")], capsys)
    assert code == 2 and lines == []
    last = err.splitlines()[-1]
    assert last.startswith("error: model directory 'v1-5-pruned-emaonly' does not exist; the model "
                           f"'v1-5-pruned-emaonly' is named by --from-png '{png}': pass --model DIR"), err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_an_unknown_a1111_sampler_is_refused_unless_overridden(model, tmp_path, capsys):
    png = a1111_png(tmp_path / "sde.png", A1111_TEXT.replace("DPM++ 2M", "DPM++ SDE"))
    code, lines, err = generate(["--from-png", str(png), "--model", str(model), "--outdir", str(tmp_path / "r")],
                                capsys)
    assert code == 2 and lines == [] and err.count("\n") == 1
    assert err.startswith(f"error: '{png}' was made with sampler 'DPM++ SDE', which ldm-generate does not have: "
                          "pass --sampler NAME to replay it with another"), err
    code, lines, err = generate(["--from-png", str(png), "--model", str(model), "--sampler", "Euler",
                                 "--outdir", str(tmp_path / "r"), "-q"], capsys)
    assert code == 0, err
    assert "Sampler: Euler, " in Image.open(lines[0]).info["parameters"]
    assert "Schedule type" not in err  # overridden with the sampler, so not "ignored" either


@pytest.mark.parametrize("argv, expected", [
    (["--width", "0"], "error: --width 0 is not a size: give pixels"),
    (["--height", "-8"], "error: --height -8 is not a size"),
    (["--sampler", "DPM++ SDE Karras"], "error: unknown sampler 'DPM++ SDE Karras'; known samplers: ddim,"),
])
def test_bad_sizes_and_sampler_names_are_one_line(argv, expected, model, tmp_path, capsys):
    code, lines, err = generate(["a red car", "--model", str(model), "--outdir", str(tmp_path / "o"), *argv], capsys)
    assert code == 2 and lines == [] and err.count("\n") == 1 and err.startswith(expected), err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@pytest.mark.slow
def test_an_a1111_hires_png_replays_and_another_upscaler_needs_hires_upscaler(model, tmp_path, capsys):
    text = (A1111_HIRES.replace("Steps: 20", "Steps: 3").replace("Size: 512x768", "Size: 16x16")
            .replace("Hires steps: 10", "Hires steps: 4").replace("Hires upscaler: Latent", "Hires upscaler: R-ESRGAN 4x+"))
    png = a1111_png(tmp_path / "hires.png", text)
    argv = ["--from-png", str(png), "--model", str(model), "--outdir", str(tmp_path / "r"), "-q"]
    code, lines, err = generate(argv, capsys)
    assert code == 2 and lines == []
    assert err.splitlines()[-1] == ("error: hires upscaler 'R-ESRGAN 4x+' is not available; use --hires-upscaler "
                                    "latent or lanczos"), err
    code, lines, err = generate([*argv, "--hires-upscaler", "latent"], capsys)
    assert code == 0, err
    image = Image.open(lines[0])
    assert image.size == (32, 32)
    assert image.info["parameters"] == (
        f"a castle on a hill\nSteps: 3, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 16x16, Model: {model}, "
        "Denoising strength: 0.45, Hires upscale: 2, Hires steps: 4, Hires upscaler: Latent")
