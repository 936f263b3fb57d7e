"""The bundled demo model (ldm/demo): shipped whole and small, the default of ldm-generate, loadable by diffusers,
and it follows its prompts, on combinations of attributes it never saw, to the issue's targets."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.demo import MODEL_DIR, NAME
from ldm.demo.adherence import Settings, prompt_adherence
from ldm.demo.prompts import spread
from ldm.demo.reader import ATTRIBUTE_NAMES, read_attributes
from ldm.demo.shapes import Attributes, heldout_combinations
from ldm.generate import main as generate_main
from ldm.models.spec import inspect_model

ROOT = Path(__file__).resolve().parents[1]
README_PROMPT = "a large red circle in the center on a black background"
MAX_BYTES = 30 * 2**20
PINK_DIR = ROOT / "ldm/demo/pink"  # the pink demo's fine-tuned VAE and LoRA (docs/demo.md, "The pink demo")
TOWER_DIR = ROOT / "ldm/demo/image-tower"  # the demo's image tower: ldm-eval --features demo (ldm/demo/image_tower.py)


def test_bundled_model_is_complete_small_and_packaged():
    files = {p for p in MODEL_DIR.rglob("*") if p.is_file()}
    assert sum(p.stat().st_size for p in files) <= MAX_BYTES
    inspect_model(str(MODEL_DIR))  # every component ldm-generate needs, safetensors only
    # a non-editable install ships exactly what pyproject's package-data globs match: they must match every file
    # of the demo model, of the pink demo's outputs and of the image tower
    files |= {p for d in (PINK_DIR, TOWER_DIR) for p in d.rglob("*") if p.is_file()}
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
    assert read == Attributes("circle", "red", "black", "large", "center")  # every word of the prompt


@pytest.mark.slow
def test_follows_prompts_of_held_out_combinations(one_torch_thread):
    """The issue's targets on combinations it never saw, on a 32-image sample (docs/demo.md has the
    full 252-image table: 93.7% all five at cfg 7.5). Measured on these 32 images: every attribute >= 96.9% and all
    five 96.9% at cfg 7.5; all five 71.9% at cfg 1.0. Chance is 33%/14%/33%/50%/20%, all five 0.2%."""
    from ldm.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(MODEL_DIR, device="cpu")
    combos = spread(heldout_combinations(), 16)
    settings = Settings(steps=25, seeds=2)
    guided = prompt_adherence(pipe, combos, settings, cfg=7.5)["accuracy"]
    unguided = prompt_adherence(pipe, combos, settings, cfg=1.0)["accuracy"]
    assert all(guided[name] >= 0.9 for name in ATTRIBUTE_NAMES), guided
    assert guided["all"] >= 0.85, guided
    assert guided["all"] >= unguided["all"] + 0.1, (guided, unguided)  # guidance helps


@pytest.mark.slow
def test_loads_unchanged_in_diffusers(one_torch_thread):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL_DIR, safety_checker=None, requires_safety_checker=False)
    generator = torch.Generator().manual_seed(0)
    out = pipe(README_PROMPT, num_inference_steps=25, guidance_scale=7.5, generator=generator, output_type="np")
    image = out.images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()
    assert read_attributes((image * 255).round().astype(np.uint8)).color == "red"


@pytest.mark.slow
def test_the_shipped_pink_vae_and_lora_teach_the_demo_pink(one_torch_thread):
    """The shipped outputs of the pink demo, on a sample of its measurement (docs/demo.md: 67% of the held-out pink
    prompts' images read as pink, 0% without them): the VAE reconstructs every pink render as pink and keeps the
    known colours; with the LoRA, pink prompts come out pink; without it, never."""
    from ldm.demo.shapes import all_combinations, new_color_combinations
    from ldm.demo.vae_check import reconstruction_accuracy
    from ldm.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(MODEL_DIR, device="cpu", vae=PINK_DIR / "vae")
    pink = new_color_combinations("pink")
    assert reconstruction_accuracy(pipe.vae, pink, repeats=1, new_colors=("pink",))["color"] == 1.0
    assert reconstruction_accuracy(pipe.vae, spread(all_combinations(), 63), repeats=1)["color"] >= 0.98
    settings = Settings(steps=25, seeds=2, new_colors=("pink",))
    combos = new_color_combinations("pink", "heldout")[:5]
    without = prompt_adherence(pipe, combos, settings, cfg=7.5)["accuracy"]["color"]
    pipe.load_lora(PINK_DIR / "pink.safetensors", 1.0)
    with_lora = prompt_adherence(pipe, combos, settings, cfg=7.5)["accuracy"]["color"]
    assert without == 0.0 and with_lora >= 0.5, (without, with_lora)


@pytest.mark.slow
def test_the_shipped_pink_vae_draws_the_demo_models_samples_as_its_own_vae_does(one_torch_thread):
    """The decoder anchor's point (ldm/vae/finetune.py): on latents the bundled U-Net generates for known-colour
    prompts, the pink VAE reads back the colour the demo's own VAE gives (98.2% of 567 measured, docs/demo.md)."""
    from ldm.demo.reader import read_attributes
    from ldm.demo.shapes import canonical_caption, train_combinations
    from ldm.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(MODEL_DIR, device="cpu", dtype="fp32")  # as measured (auto: bf16 on some CPUs)
    pink_vae = Pipeline.from_pretrained(MODEL_DIR, device="cpu", dtype="fp32", vae=PINK_DIR / "vae").vae
    agree = 0
    for i, combo in enumerate(spread(train_combinations(), 42)):
        result = pipe(canonical_caption(combo), steps=25, seed=2000 + i, show_progress=False)
        with torch.no_grad():
            decoded = pink_vae.decode(result.latents).sample  # (1, 3, 32, 32) in [-1, 1]
        pixels = ((decoded[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        agree += read_attributes(pixels, ("pink",)).color == read_attributes(result.images[0], ("pink",)).color
    assert agree >= 40, agree
