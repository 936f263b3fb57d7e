"""`ldm-eval`: scoring against fake models with known answers, inpainting's untouched half, and the CLI end to end."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from conftest import run
from ldm.demo.adherence import Settings, inpaint_test, negative_prompt_test, prompt_adherence
from ldm.demo.prompts import NEGATIVE_COLOR, prompt_sets
from ldm.demo.reader import ATTRIBUTE_NAMES
from ldm.demo.shapes import COLORS, Attributes, heldout_combinations, render, train_combinations
from ldm.eval.cli import main
from ldm.pipeline.pipeline import Pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CAPTION = re.compile(r"a (small|large) (\w+) (\w+) in the (.+) on a (\w+) background")
FAST = Settings(steps=2, seeds=2, size=32)


def parse_caption(prompt: str) -> Attributes:
    size, color, shape, position, background = CAPTION.fullmatch(prompt).groups()
    return Attributes(shape, color, background, size, position)


class PerfectModel:
    """Draws exactly what a canonical caption says, and records how it was called."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, prompt: str, negative_prompt: str = "", **kw):
        self.calls.append({"prompt": prompt, "negative": negative_prompt, **kw})
        return SimpleNamespace(images=[render(parse_caption(prompt), 32)] * kw["num_images"])


def constant_model(a: Attributes):
    return lambda prompt, negative_prompt="", **kw: SimpleNamespace(images=[render(a, 32)] * kw["num_images"])


@pytest.fixture(scope="module")
def model_dir(tiny_model) -> Path:
    return tiny_model  # tests/conftest.py: written once per session, read-only


def test_prompt_sets_are_fixed_and_disjoint():
    sets = prompt_sets()
    assert sets == prompt_sets()  # reproducible
    assert sets.heldout == heldout_combinations() and len(sets.train) == 63
    assert set(sets.train) <= set(train_combinations())
    assert all(r.source.color != r.target.color and replace(r.source, color=r.target.color) == r.target
               for r in sets.img2img + sets.inpaint)
    assert len(sets.inpaint) == 18 and {r.source.size for r in sets.inpaint} == {"small"}
    assert {r.source.position for r in sets.inpaint} == {"top left", "bottom left"}
    quick = prompt_sets(quick=True)
    assert quick.quick and all(len(getattr(quick, f)) == 5 for f in ("heldout", "train", "negative", "inpaint"))


def test_a_perfect_model_scores_100_percent():
    model = PerfectModel()
    sets = prompt_sets()
    for combos in (sets.heldout, sets.train):
        result = prompt_adherence(model, combos, FAST, cfg=7.5)
        assert result["images"] == 2 * len(combos)
        assert result["accuracy"] == {name: 1.0 for name in (*ATTRIBUTE_NAMES, "all")}
    # every prompt got the fixed seeds, the requested cfg and steps, and the pipeline's default sampler
    assert {(c["seed"], c["num_images"], c["cfg"], c["steps"]) for c in model.calls} == {(0, 2, 7.5, 2)}
    assert not any("sampler" in c for c in model.calls)


def test_a_model_that_always_draws_a_red_circle_scores_chance():
    fixed = Attributes("circle", "red", "black", "large", "center")
    combos = heldout_combinations()
    acc = prompt_adherence(constant_model(fixed), combos, Settings(seeds=1), cfg=1.0)["accuracy"]
    # the held-out set has each (shape, colour, background) triple exactly once
    assert acc["color"] == pytest.approx(1 / 7) and acc["shape"] == pytest.approx(1 / 3)
    for name in ("background", "size", "position"):
        assert acc[name] == pytest.approx(np.mean([getattr(a, name) == getattr(fixed, name) for a in combos]))
    assert acc["all"] == pytest.approx(np.mean([a == fixed for a in combos]))


def test_negative_prompt_share_is_measured_per_negative():
    def red_unless_negated(prompt, negative_prompt="", **kw):
        color = "blue" if NEGATIVE_COLOR in negative_prompt else "red"
        assert "red" not in prompt and "blue" not in prompt  # the prompts leave the colour out
        return SimpleNamespace(images=[render(Attributes("square", color, "white", "small", "top left"))] * 2)

    cases = prompt_sets(quick=True).negative
    result = negative_prompt_test(red_unless_negated, cases, FAST)
    assert result["color_share"] == {"": 1.0, NEGATIVE_COLOR: 0.0}
    assert result["chance"] == pytest.approx(1 / len(COLORS)) and result["images"] == 2 * len(cases)


def test_inpainting_keeps_the_unmasked_half_bit_for_bit(model_dir):
    pipe = Pipeline.from_pretrained(model_dir, device="cpu", dtype="fp32")
    cases = prompt_sets(quick=True).inpaint[:2]
    s = Settings(steps=2, seeds=2, size=pipe.default_size)
    result = inpaint_test(pipe, cases, s)
    assert result["images"] == 4 and result["max_outside_diff"] == 0

    # and the measure does see a change on the kept side
    def one_pixel_off(prompt, negative_prompt="", *, init_image, **kw):
        pixels = np.array(init_image)
        pixels[0, -1] ^= 7
        return SimpleNamespace(images=[Image.fromarray(pixels)])

    assert inpaint_test(one_pixel_off, cases[:1], FAST)["max_outside_diff"] == 7


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    return run(main, argv, capsys, split=False)  # tests/conftest.py


@pytest.mark.slow  # the whole quick eval (~20 s)
def test_cli_quick_run_prints_the_table_and_writes_json(model_dir, tmp_path, capsys):
    path = tmp_path / "eval.json"
    argv = ["--model", str(model_dir), "--quick", "--steps", "2", "--json", str(path), "--vae", str(model_dir / "vae")]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    report = json.loads(path.read_text())
    assert report["model"] == f"{model_dir} + VAE {model_dir / 'vae'}"
    assert report["quick"] is True and report["settings"]["steps"] == 2 and report["settings"]["seeds"] == 1
    assert report["settings"]["size"] == 64  # the tiny model's native size: 32 latents x VAE factor 2
    assert report["reader"]["accuracy"]["all"] == 1.0  # the judge reads ground truth right at this size
    assert [(r["set"], r["cfg"]) for r in report["adherence"]["rows"]] == [
        ("heldout", 7.5), ("heldout", 1.0), ("train", 7.5), ("train", 1.0)]
    assert set(report["adherence"]["guidance_gain_points"]) == {"heldout", "train"}
    assert set(report["negative"]["color_share"]) == {"", "red"}
    assert set(report["img2img"]["kept"]) == {"shape", "size", "position", "background"}
    assert report["inpaint"]["max_outside_diff"] == 0
    for section in ("reader", "vae", "adherence", "negative", "img2img", "inpaint"):
        assert report[section]["seconds"] >= 0
    assert "QUICK" in out and "| heldout prompts @ cfg 7.5 | 5 |" in out and "| VAE reconstructions |" in out
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]  # no temporary file left


def test_cli_bad_model_is_one_line_and_exit_2(capsys, monkeypatch):
    code, out, err = run_cli(["--model", "/nonexistent"], capsys)
    assert code == 2 and out == "" and err == "error: model directory '/nonexistent' does not exist\n"
    monkeypatch.setattr("ldm.models.spec.DEFAULT_MODEL", None)
    code, _, err = run_cli([], capsys)
    assert code == 2 and err.startswith("error: no model given") and err.count("\n") == 1
    monkeypatch.undo()
    code, _, err = run_cli(["--vae", "/nonexistent/vae.safetensors"], capsys)
    assert code == 2 and "/nonexistent/vae.safetensors" in err and err.count("\n") == 1, err
