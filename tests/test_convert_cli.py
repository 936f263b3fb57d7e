"""`ldm-convert` and `ldm-generate --model FILE.safetensors`: the demo converted to one file gives diffusers'
`from_single_file` image; bad input is one line, exit code 2, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import run
from ldm.convert import main as convert
from ldm.demo import MODEL_DIR
from ldm.generate import main as generate
from ldm.singlefile import keys

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPT = "a large red circle in the center on a black background"


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("convert") / "shapes.safetensors"
    convert([str(MODEL_DIR), str(path)])
    return path


@pytest.mark.slow
def test_the_demo_as_one_file_gives_diffusers_from_single_file_image(demo_file, tmp_path, capsys, monkeypatch):
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    code, lines, err = run(generate, [PROMPT, "--model", str(demo_file), "--steps", "6", "--seed", "3",
                                      "--sampler", "euler_a", "--dtype", "fp32", "--outdir", str(tmp_path / "out")],
                              capsys)
    assert code == 0, err
    assert "'shapes.safetensors': an ldm-convert file (configs in its metadata); holds U-Net, VAE, text encoder" in err
    assert "prediction type: epsilon (the file's metadata)" in err
    ours = np.asarray(Image.open(lines[0]))

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    configs = tmp_path / "configs"  # no weights: every tensor must come from the file
    shutil.copytree(MODEL_DIR, configs, ignore=shutil.ignore_patterns("*.safetensors"))
    ref = StableDiffusionPipeline.from_single_file(str(demo_file), config=str(configs), local_files_only=True,
                                                   safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = EulerAncestralDiscreteScheduler.from_config(ref.scheduler.config)
    theirs = ref(PROMPT, negative_prompt="", num_inference_steps=6, guidance_scale=7.5,
                 generator=[torch.Generator().manual_seed(3)], output_type="np").images[0]
    assert np.abs(ours.astype(int) - np.round(theirs * 255).astype(int)).max() <= 1


def test_file_to_directory_and_back_through_the_cli(demo_file, tmp_path, capsys):
    out = tmp_path / "dir"
    code, lines, err = run(convert, [str(demo_file), str(out), "--prediction-type", "v_prediction"], capsys)
    assert code == 0, err
    assert lines == [str(out)]
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    half = tmp_path / "half.safetensors"
    code, lines, err = run(convert, [str(out), str(half), "--half"], capsys)
    assert code == 0 and lines == [str(half)], err
    assert "tensors (fp16)" in err
    assert half.stat().st_size < 0.6 * demo_file.stat().st_size
    fp16 = load_file(str(half))
    assert {v.dtype for v in fp16.values()} == {torch.float16}
    # and the fp16 file back to a directory keeps exactly those values (no trip through fp32 rounding)
    code, _, err = run(convert, [str(half), str(tmp_path / "dir16")], capsys)
    assert code == 0, err
    unet = load_file(str(tmp_path / "dir16" / "unet" / "diffusion_pytorch_model.safetensors"))
    config = json.loads((out / "unet" / "config.json").read_text())
    expected = keys.unet_from_original(fp16, config)
    assert unet.keys() == expected.keys() and all(torch.equal(unet[k], expected[k]) for k in unet)


def test_bad_input_is_one_line_and_exit_2(demo_file, tmp_path, capsys):
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x02}q\x00.")
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(demo_file.read_bytes()[:100_000])
    cases = [
        (convert, [str(MODEL_DIR), str(demo_file)], "already exists; choose a new name"),
        (convert, [str(MODEL_DIR), str(tmp_path / "x.ckpt")], "must end in .safetensors"),
        (convert, [str(pickle), str(tmp_path / "d")], "is a pickle checkpoint, which is never loaded"),
        (convert, [str(tmp_path / "missing"), str(tmp_path / "d")], "does not exist"),
        (generate, ["a", "--model", str(pickle)], "is a pickle checkpoint, which is never loaded"),
        (generate, ["a", "--model", str(truncated)], "is truncated: it has 100000 bytes"),
        (generate, ["a", "--model", str(demo_file), "--vae", str(pickle)], "is a pickle checkpoint"),
    ]
    for main, argv, message in cases:
        code, lines, err = run(main, argv, capsys)
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert code == 2 and len(errors) == 1 and message in errors[0], (argv, err)
        assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.safetensors", "model.ckpt"]


def test_a_full_disk_is_one_line_and_leaves_nothing(demo_file, tmp_path, capsys, monkeypatch):
    import errno

    import safetensors.torch

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")  # what a real full disk leaves: part of the file
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    out = tmp_path / "out"
    out.mkdir()
    for argv in ([str(MODEL_DIR), str(out / "m.safetensors")], [str(demo_file), str(out / "m")]):
        code, _, err = run(convert, argv, capsys)
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert code == 2 and len(errors) == 1, err
        assert errors[0].startswith(f"error: cannot write {argv[1]}: No space left on device") and "Traceback" not in err
        assert list(out.iterdir()) == []  # no partial output, no temporary
    code, _, err = run(convert, [str(demo_file), str(out / "copy.safetensors")], capsys)  # file -> file
    assert code == 2 and "is a single file, so DST is the diffusers directory to write" in err
    assert list(out.iterdir()) == []
