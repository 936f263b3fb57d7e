"""`ldm-generate` (and inference/generate.py): outputs, metadata replay, and every bad input -> one line on stderr,
exit code 2, no file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run
from ldm.generate import main
from ldm.text.tiny import tiny_clip_text_model

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--steps", "2", "--height", "32", "--width", "32", "--seed", "42", "--sampler", "euler_a"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(tiny_model) -> Path:
    return tiny_model  # tests/conftest.py: written once per session, read-only


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("images")
    rng = np.random.RandomState(0)
    Image.fromarray((rng.rand(32, 32, 3) * 255).astype(np.uint8)).save(d / "init.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(d / "mask.png")
    Image.fromarray(np.kron(mask, np.ones((2, 2), np.uint8))).save(d / "mask64.png")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return {p.stem: p for p in d.iterdir()}


generate = partial(run, main)  # (argv, capsys) -> (exit code, stdout lines, stderr)


def pixels(path: str | Path) -> np.ndarray:
    return np.asarray(Image.open(path))


# -------------------------------------------------------------------------------------------------- normal runs

def test_txt2img_writes_pngs_and_prints_only_their_paths(model, tmp_path, capsys):
    outdir = tmp_path / "out"
    code, lines, err = generate(["a red car", "--model", str(model), "--cfg", "7.5", "--negative", "blurry",
                                 "--num-images", "3", "--batch-size", "2", "--outdir", str(outdir), *FAST], capsys)
    assert code == 0, err
    assert [Path(p).name for p in lines] == [
        "00000-42-a-red-car.png", "00001-43-a-red-car.png", "00002-44-a-red-car.png"]
    assert sorted(p.name for p in outdir.iterdir()) == [Path(p).name for p in lines]  # no temp files left
    text = Image.open(lines[1]).info["parameters"]
    assert text == (f"a red car\nNegative prompt: blurry\nSteps: 2, Sampler: Euler a, CFG scale: 7.5, Seed: 43, "
                    f"Size: 32x32, Model: {model}")
    # the next run continues the numbering instead of overwriting
    (outdir / "00012-1-other.png").write_bytes(b"")
    code, lines, _ = generate(["a red car", "--model", str(model), "--outdir", str(outdir), "--quiet", *FAST], capsys)
    assert code == 0 and Path(lines[0]).name == "00013-42-a-red-car.png"


@pytest.mark.slow
def test_replay_from_png_gives_the_same_pixels(model, tmp_path, capsys):
    code, lines, _ = generate(["a blue boat", "--model", str(model), "--negative", "ugly", "--num-images", "2",
                               "--sampler", "dpmpp_2m", "--karras", "--cfg", "5", "--outdir", str(tmp_path), "-q",
                               "--steps", "3", "--height", "32", "--width", "32", "--seed", "7"], capsys)
    assert code == 0
    second = lines[1]  # seed 8
    code, replay, _ = generate(["--from-png", second, "--outdir", str(tmp_path / "replay"), "-q"], capsys)
    assert code == 0
    np.testing.assert_array_equal(pixels(replay[0]), pixels(second))
    assert Image.open(replay[0]).info["parameters"] == Image.open(second).info["parameters"]
    # explicit options override the PNG's values
    code, other, _ = generate(["--from-png", second, "--seed", "9", "--outdir", str(tmp_path / "o"), "-q"], capsys)
    assert code == 0 and "Seed: 9," in Image.open(other[0]).info["parameters"]
    assert not np.array_equal(pixels(other[0]), pixels(second))


def test_img2img_reports_the_steps_it_runs_and_replays(model, images, tmp_path, capsys):
    argv = ["a red car", "--model", str(model), "--init-image", str(images["init"]), "--strength", "0.6",
            "--steps", "5", "--seed", "3", "--outdir", str(tmp_path)]
    code, lines, err = generate(argv, capsys)
    assert code == 0
    assert "img2img: strength 0.6 -> 3 of 5 steps" in err
    assert "Denoising strength: 0.6" in Image.open(lines[0]).info["parameters"]
    # replaying needs the init image again, and says so
    code, _, err = generate(["--from-png", lines[0], "--outdir", str(tmp_path / "r")], capsys)
    assert code == 2 and "pass --init-image" in err
    code, replay, _ = generate(["--from-png", lines[0], "--init-image", str(images["init"]), "--outdir",
                                str(tmp_path / "r"), "-q"], capsys)
    assert code == 0
    np.testing.assert_array_equal(pixels(replay[0]), pixels(lines[0]))


def test_inpainting_cli_keeps_pixels_and_warns_about_mask_size(model, images, tmp_path, capsys):
    code, lines, err = generate(["a red car", "--model", str(model), "--init-image", str(images["init"]), "--mask",
                                 str(images["mask64"]), "--steps", "2", "--outdir", str(tmp_path)], capsys)
    assert code == 0
    assert "mask is 64x64 but the init image is 32x32" in err
    assert "Mask blur: 4" in Image.open(lines[0]).info["parameters"]
    out, original = pixels(lines[0]), pixels(images["init"])
    keep = pixels(images["mask"]) == 0
    np.testing.assert_array_equal(out[keep], original[keep])


def test_quiet_leaves_stderr_empty_but_keeps_warnings(model, tmp_path, capsys):
    code, lines, err = generate(["a red car", "--model", str(model), "--outdir", str(tmp_path), "-q", *FAST], capsys)
    assert code == 0 and len(lines) == 1 and err == ""
    # long prompts are chunked now, not truncated: an unclosed bracket is the warning that A1111 syntax tolerates
    code, _, err = generate(["a (red car", "--model", str(model), "--outdir", str(tmp_path), "-q", *FAST], capsys)
    assert code == 0
    assert err == ("warning: prompt has 1 unclosed '(': it weights everything after it x 1.1 (as A1111 does); "
                   "close it, or write \\( for a literal bracket\n")


def test_fp16_on_cpu_falls_back_with_a_message(model, tmp_path, capsys):
    code, lines, err = generate(["a red car", "--model", str(model), "--dtype", "fp16", "--device", "cpu",
                                 "--outdir", str(tmp_path), "-q", *FAST], capsys)
    assert code == 0 and len(lines) == 1
    assert "warning: fp16 is not supported on the CPU; using fp32" in err


@pytest.mark.slow  # starts a process
def test_console_script_in_a_subprocess(model, images, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "ldm.generate", "a red car", "--model", str(model), "--outdir", str(tmp_path), *FAST]
    ok = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == f"{tmp_path / '00000-42-a-red-car.png'}\n"  # stdout: the paths and nothing else
    assert "denoising" in ok.stderr  # the progress bar is on stderr
    bad = subprocess.run([*cmd, "--strength", "0.5"], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == "error: --strength only applies with --init-image\n"  # one line, no traceback


@pytest.mark.slow  # starts two processes
def test_inference_script_writes_what_ldm_generate_writes(model, tmp_path):
    console = shutil.which("ldm-generate")
    if console is None:
        pytest.skip("the ldm-generate console script is not installed (pip install -e .)")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    argv = ["a red car", "--model", str(model), "--negative", "blurry", "--num-images", "2", *FAST]
    runs = {}
    for name, command in (("script", [sys.executable, str(ROOT / "inference/generate.py")]), ("console", [console])):
        outdir = tmp_path / name
        # from another directory: the script needs no particular working directory
        runs[name] = subprocess.run([*command, *argv, "--outdir", str(outdir)], capture_output=True, text=True,
                                    env=env, cwd=tmp_path, timeout=180, check=False)
        assert runs[name].returncode == 0, runs[name].stderr
        assert runs[name].stdout == f"{outdir / '00000-42-a-red-car.png'}\n{outdir / '00001-43-a-red-car.png'}\n"
    for png in ("00000-42-a-red-car.png", "00001-43-a-red-car.png"):
        script, console_png = tmp_path / "script" / png, tmp_path / "console" / png
        np.testing.assert_array_equal(pixels(script), pixels(console_png))
        assert Image.open(script).info["parameters"] == Image.open(console_png).info["parameters"]
    # a bad input: the same one line and exit code 2, no file
    bad = subprocess.run([sys.executable, str(ROOT / "inference/generate.py"), *argv, "--strength", "0.5",
                          "--outdir", str(tmp_path / "bad")], capture_output=True, text=True, env=env, timeout=180,
                         check=False)
    assert bad.returncode == 2 and bad.stdout == "" and not (tmp_path / "bad").exists()
    assert bad.stderr == "error: --strength only applies with --init-image\n"


# ---------------------------------------------------------------------------------------------------- bad input

def _variant(model: Path, root: Path, name: str, component: str, files: dict[str, bytes | str]) -> Path:
    """A copy of `model` (symlinks) whose `component` folder holds the config and `files` instead of its weights."""
    d = root / name
    d.mkdir()
    for sub in model.iterdir():
        if sub.name != component:
            (d / sub.name).symlink_to(sub)
    if files is not None:
        (d / component).mkdir()
        (d / component / "config.json").write_text((model / component / "config.json").read_text())
        for fname, content in files.items():
            path = d / component / fname
            path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return d


@pytest.fixture(scope="module")
def broken_models(model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("broken")
    weights = (model / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    lfs = "version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 3438167534\n"
    mismatch = _variant(model, root, "mismatch", "text_encoder", None)
    tiny_clip_text_model(hidden_size=64).save_pretrained(mismatch / "text_encoder", safe_serialization=True)
    return {
        "mismatch": mismatch,
        "no_unet": _variant(model, root, "no_unet", "unet", None),
        "pickle": _variant(model, root, "pickle", "unet", {"diffusion_pytorch_model.bin": b"\x80\x04pickle"}),
        "lfs": _variant(model, root, "lfs", "unet", {"diffusion_pytorch_model.safetensors": lfs}),
        "truncated": _variant(model, root, "truncated", "unet",
                              {"diffusion_pytorch_model.safetensors": weights[: len(weights) - 1000]}),
    }


BAD_INPUTS = {
    # name: (argv after the prompt and --model, with {init}, {mask}, {broken}, {file} filled in; expected message)
    "missing init image": (["--init-image", "nope.png"], "init image 'nope.png' does not exist"),
    "unreadable init image": (["--init-image", "{broken}"], "cannot read init image"),
    "missing mask": (["--init-image", "{init}", "--mask", "nope.png"], "mask 'nope.png' does not exist"),
    "unreadable mask": (["--init-image", "{init}", "--mask", "{broken}"], "cannot read mask"),
    "mask without init image": (["--mask", "{mask}"], "--mask needs --init-image"),
    "height not a multiple": (["--height", "33"], "height 33 is not a multiple of 2"),
    "height too small": (["--height", "4"], "height 4 is out of range: use 8..8192 px"),
    "width too large": (["--width", "10000"], "width 10000 is out of range"),
    "strength zero": (["--init-image", "{init}", "--strength", "0"], "strength must be in (0, 1], got 0.0"),
    "strength above one": (["--init-image", "{init}", "--strength", "1.5"], "strength must be in (0, 1]"),
    "strength runs no step": (["--init-image", "{init}", "--strength", "0.1", "--steps", "5"], "runs no denoising step"),
    "strength without init": (["--strength", "0.5"], "--strength only applies with --init-image"),
    "steps zero": (["--steps", "0"], "steps must be at least 1, got 0"),
    "steps not a number": (["--steps", "many"], "argument --steps: invalid int value: 'many'"),
    "negative cfg": (["--cfg", "-1"], "cfg (guidance scale) must be a finite number >= 0, got -1.0"),
    "unknown sampler": (["--sampler", "DPM++ SDE"], "unknown sampler 'DPM++ SDE'; known samplers: ddim, ddpm, euler, euler_a"),
    "karras on euler_a": (["--sampler", "euler_a", "--karras"], "sampler 'euler_a' takes no Karras schedule"),
    "unknown schedule": (["--schedule", "exponential"], "unknown schedule 'exponential'; known schedules: karras, "
                         "sgm_uniform (Karras, SGM Uniform), or Automatic for the sampler's own"),
    "karras on lcm": (["--sampler", "lcm", "--karras"], "sampler 'lcm' takes no Karras schedule; samplers that do: "),
    "eta on euler_a": (["--eta", "0.5"], "--eta only applies to the tcd sampler (TCD's gamma); sampler 'euler_a'"),
    "num images zero": (["--num-images", "0"], "num-images must be at least 1"),
    "negative seed": (["--seed", "-5"], "seed must be in 0.."),
    "negative mask blur": (["--init-image", "{init}", "--mask", "{mask}", "--mask-blur", "-1"], "mask blur must be >= 0"),
    "guidance rescale": (["--guidance-rescale", "2"], "guidance rescale must be in [0, 1]"),
    "no prompt": (["--no-prompt"], "no prompt given"),
    "from-png missing": (["--from-png", "nope.png"], "--from-png 'nope.png' does not exist"),
    "from-png without parameters": (["--from-png", "{init}"], "has no 'parameters' text chunk"),
    "device not there": (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
}
BAD_MODELS = {
    "no model and no bundled default": (None, "no model given: pass --model DIR (a diffusers-format Stable Diffusion directory)"),
    "missing model dir": ("does/not/exist/here", "model directory 'does/not/exist/here' does not exist"),
    "hub id offline": ("someone/some-model", "'someone/some-model' is not a local directory, and as a hub id it could"),
    "no unet": ("{no_unet}", "has no unet/"),
    "pickle weights": ("{pickle}", "diffusion_pytorch_model.bin' is a pickle checkpoint; only safetensors"),
    "lfs pointer": ("{lfs}", "diffusion_pytorch_model.safetensors' is a git-lfs pointer file"),
    "truncated weights": ("{truncated}", "diffusion_pytorch_model.safetensors' is truncated: it has"),
    "model is a file": ("{file}", "is a diffusers component's weights file (found "),
    "parts that do not fit": ("{mismatch}", "the U-Net attends to 32-dim text features but the text encoder gives 64"),
}


def _check_refused(argv: list[str], expected: str, outdir: Path, capsys, after_loading: bool = False) -> None:
    code, lines, err = generate(argv, capsys)
    assert code == 2, err
    assert lines == []  # nothing on stdout
    if after_loading:  # found while loading the model, after the "loading ..." info line
        err = err.splitlines()[-1] + "\n"
    assert err.count("\n") == 1 and err.startswith("error: "), err  # one line, no traceback
    assert expected in err
    assert not outdir.exists() or not any(outdir.iterdir())  # no file written


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_and_no_file(case, model, images, tmp_path, capsys):
    extra, expected = BAD_INPUTS[case]
    fill = {"init": images["init"], "mask": images["mask"], "broken": images["broken"]}
    extra = [a.format(**fill) for a in extra]
    prompt = [] if "--no-prompt" in extra or "--from-png" in extra else ["a red car"]
    extra = [a for a in extra if a != "--no-prompt"]
    outdir = tmp_path / "out"
    _check_refused([*prompt, "--model", str(model), "--outdir", str(outdir), *extra], expected, outdir, capsys)


@pytest.mark.parametrize("case", BAD_MODELS)
def test_bad_model_is_one_line_exit_2_and_no_file(case, broken_models, model, tmp_path, capsys, monkeypatch):
    value, expected = BAD_MODELS[case]
    if value is None:  # an install without the bundled demo model
        monkeypatch.setattr("ldm.models.spec.DEFAULT_MODEL", None)
    model_args = [] if value is None else ["--model", value.format(
        **broken_models, file=model / "unet" / "diffusion_pytorch_model.safetensors")]
    outdir = tmp_path / "out"
    _check_refused(["a red car", *model_args, "--outdir", str(outdir), *FAST], expected, outdir, capsys,
                   after_loading=case == "parts that do not fit")


def test_unwritable_outdir_is_refused_before_any_work(model, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, lines, err = generate(["a red car", "--model", str(model), "--outdir", str(blocker / "sub"), *FAST], capsys)
    assert code == 2 and lines == [] and err.count("\n") == 1
    assert f"output directory '{blocker / 'sub'}' is not writable" in err
    if os.geteuid() != 0:  # root writes anywhere, whatever the mode bits
        ro = tmp_path / "read-only"
        ro.mkdir(mode=0o555)
        code, _, err = generate(["a red car", "--model", str(model), "--outdir", str(ro), *FAST], capsys)
        assert code == 2 and "is not writable" in err
