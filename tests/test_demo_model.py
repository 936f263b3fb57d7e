"""The bundled demo model (ldm/demo): shipped whole and small, the default of ldm-generate, loadable by diffusers,
and it follows the parts of its prompts it has learned (shape, size; colour with guidance)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.shapes import heldout_combinations
from ldm.demo import MODEL_DIR, NAME
from ldm.eval.adherence import Settings, prompt_adherence
from ldm.eval.prompts import spread
from ldm.eval.reader import read_attributes
from ldm.generate import main as generate_main
from ldm.pipeline.loading import check_model

ROOT = Path(__file__).resolve().parents[1]
README_PROMPT = "a large red circle in the center on a black background"
MAX_BYTES = 30 * 2**20


def test_bundled_model_is_complete_small_and_packaged():
    files = {p for p in MODEL_DIR.rglob("*") if p.is_file()}
    assert sum(p.stat().st_size for p in files) <= MAX_BYTES
    check_model(MODEL_DIR)  # every component ldm-generate needs, safetensors only
    # a non-editable install ships exactly what pyproject's package-data globs match: they must match every file
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["ldm"]
    packaged = {p for pattern in patterns for p in (ROOT / "ldm").glob(pattern)}
    assert packaged == files


@pytest.mark.slow
def test_ldm_generate_defaults_to_the_demo_and_says_so(tmp_path, capsys, one_torch_thread):
    # the README's first command, with a fixed seed
    argv = [README_PROMPT, "--cfg", "7.5", "--negative", "blurry", "--seed", "0", "--outdir", str(tmp_path)]
    generate_main(argv)  # success returns; a user error would exit 2
    out, err = capsys.readouterr()
    [path] = out.splitlines()
    assert "32-px shapes demo" in err and "--model DIR" in err
    image = Image.open(path)
    assert image.size == (32, 32)
    assert f"Model: {NAME}" in image.info["parameters"]  # a name that --from-png can replay on any machine
    read = read_attributes(image)
    assert (read.shape, read.size, read.position) == ("circle", "large", "center")


@pytest.mark.slow
def test_follows_prompts_of_held_out_combinations(one_torch_thread):
    """What the shipped model does reliably on combinations it never saw (README, "The demo model": it does not yet
    meet the colour/background/position targets). Measured on these 32 images: shape 69%, size 78%, colour 53% at
    cfg 7.5 vs 31% at cfg 1.0; chance is 33%, 50% and 14%."""
    from ldm.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(MODEL_DIR, device="cpu")
    combos = spread(heldout_combinations(), 16)
    settings = Settings(steps=25, seeds=2)
    guided = prompt_adherence(pipe, combos, settings, cfg=7.5)["accuracy"]
    unguided = prompt_adherence(pipe, combos, settings, cfg=1.0)["accuracy"]
    assert guided["shape"] >= 0.55 and guided["size"] >= 0.65, guided
    assert guided["color"] >= unguided["color"] + 0.1, (guided, unguided)  # guidance makes it follow the colour


@pytest.mark.slow
def test_loads_unchanged_in_diffusers(one_torch_thread):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL_DIR, safety_checker=None, requires_safety_checker=False)
    generator = torch.Generator().manual_seed(0)
    out = pipe(README_PROMPT, num_inference_steps=25, guidance_scale=7.5, generator=generator, output_type="np")
    image = out.images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()
    assert read_attributes((image * 255).round().astype(np.uint8)).color == "red"
