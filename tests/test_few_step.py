"""Few-step generation: the lcm and tcd samplers and the SGM Uniform schedule against diffusers' schedulers built by
diffusers' own means (`LCMScheduler.from_config`, `TCDScheduler`, `timestep_spacing="trailing"`) on the same tiny
random weights; an LCM-distilled U-Net (guidance as an input); their names in PNGs, the CLI and A1111 payloads.

Tolerance: SD txt2img 1e-4 as tests/test_pipeline.py's parity tests; SDXL 0 (bit for bit) as
tests/test_sdxl_pipeline.py's. Both run diffusers' operations in the same order on the same generators (measured
max abs diff: 0 for every case here, SD included); the SD margin is the one the SD tests already allow.
"""

from __future__ import annotations

import logging
import shutil
from functools import partial

import numpy as np
import pytest
import torch
from diffusers import (
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    TCDScheduler,
    UNet2DConditionModel,
)
from PIL import Image, PngImagePlugin

from conftest import run
from ldm.generate import main
from ldm.pipeline.a1111 import replay_values
from ldm.pipeline.guidance import guidance_scale_embedding
from ldm.pipeline.metadata import format_parameters, parse_parameters
from ldm.pipeline.pipeline import Pipeline
from ldm.pipeline.request import GenerationRequest, from_a1111

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT, NEGATIVE = "a red car", "blurry"
SIZE = 32  # px; 16x16 latents with the tiny VAE's factor of 2
TRAILING_4 = [999, 749, 499, 249]  # diffusers' "trailing" spacing of 4 steps over 1000 (= SGM Uniform's, rounded)


def _gens(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return Pipeline.from_pretrained(tiny_model, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def reference(tiny_model):
    ref = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref


# (sampler, schedule, cfg, eta) -> diffusers' scheduler from the model's config, and what its pipeline call adds
SD_CASES = {
    "lcm cfg 1": ("lcm", "", 1.0, None, lambda c: LCMScheduler.from_config(c), {}),
    "lcm cfg 2": ("lcm", "", 2.0, None, lambda c: LCMScheduler.from_config(c), {}),
    # diffusers' pipelines pass eta=0 unless told: TCD's 0.3 is our default, given to theirs explicitly
    "tcd": ("tcd", "", 1.0, None, lambda c: TCDScheduler.from_config(c), {"eta": 0.3}),
    "tcd eta 0.8": ("tcd", "", 1.0, 0.8, lambda c: TCDScheduler.from_config(c), {"eta": 0.8}),
    "euler sgm_uniform": ("euler", "sgm_uniform", 7.5, None,
                          lambda c: EulerDiscreteScheduler.from_config(c, timestep_spacing="trailing"), {}),
    "euler_a sgm_uniform": ("euler_a", "sgm_uniform", 1.0, None,
                            lambda c: EulerAncestralDiscreteScheduler.from_config(c, timestep_spacing="trailing"), {}),
    # ComfyUI's lcm + sgm_uniform: LCM on explicit trailing timesteps
    "lcm sgm_uniform": ("lcm", "sgm_uniform", 1.0, None, lambda c: LCMScheduler.from_config(c),
                        {"timesteps": TRAILING_4}),
}


@pytest.mark.parametrize("case", SD_CASES)
def test_sd_few_step_equals_diffusers(pipe, reference, case):
    sampler, schedule, cfg, eta, make_ref, extra = SD_CASES[case]
    n, seed = 2, 5
    ours = pipe(PROMPT, NEGATIVE, steps=4, cfg=cfg, sampler=sampler, schedule=schedule, eta=eta, seed=seed,
                num_images=n, batch_size=n, height=SIZE, width=SIZE, show_progress=False)
    reference.scheduler = make_ref(reference.scheduler.config)
    steps = {} if "timesteps" in extra else {"num_inference_steps": 4}
    theirs = reference(PROMPT, negative_prompt=NEGATIVE, guidance_scale=cfg, height=SIZE, width=SIZE,
                       num_images_per_prompt=n, generator=_gens(seed, n), output_type="np", **steps, **extra).images
    assert np.abs(ours.decoded - theirs).max() <= 1e-4


def test_the_schedule_and_eta_change_the_images(pipe):
    kw = {"steps": 4, "cfg": 1.0, "seed": 5, "height": SIZE, "width": SIZE, "show_progress": False}
    lcm = pipe(PROMPT, sampler="lcm", **kw).decoded
    assert np.abs(pipe(PROMPT, sampler="lcm", schedule="sgm_uniform", **kw).decoded - lcm).max() > 1e-3
    tcd = pipe(PROMPT, sampler="tcd", **kw).decoded
    assert np.abs(pipe(PROMPT, sampler="tcd", eta=0.0, **kw).decoded - tcd).max() > 1e-3


@pytest.mark.parametrize("sampler", ["lcm", "tcd"])  # both draw fresh noise at every step but the last
def test_few_step_noise_comes_from_each_images_generator(pipe, sampler):
    kw = {"steps": 2, "cfg": 1.0, "sampler": sampler, "seed": 11, "num_images": 2, "height": SIZE, "width": SIZE,
          "show_progress": False}
    one_by_one = pipe(PROMPT, batch_size=1, **kw)
    all_at_once = pipe(PROMPT, batch_size=2, **kw)
    np.testing.assert_allclose(one_by_one.decoded, all_at_once.decoded, atol=1e-5, rtol=0)
    alone = pipe(PROMPT, batch_size=1, **{**kw, "seed": 12, "num_images": 1})  # image 1 of the run
    np.testing.assert_allclose(alone.decoded[0], one_by_one.decoded[1], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------- SDXL

@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_model):
    ref = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model)
    ref.set_progress_bar_config(disable=True)
    return Pipeline.from_pretrained(tiny_sdxl_model, device="cpu", dtype="fp32"), ref


@pytest.mark.parametrize("sampler, schedule, make_ref", [
    ("lcm", "", lambda c: LCMScheduler.from_config(c)),  # an LCM-LoRA's settings
    ("euler_a", "sgm_uniform", lambda c: EulerAncestralDiscreteScheduler.from_config(c, timestep_spacing="trailing")),
])
def test_sdxl_few_step_equals_diffusers(sdxl, sampler, schedule, make_ref):
    ours, ref = sdxl
    result = ours(PROMPT, steps=4, cfg=1.0, sampler=sampler, schedule=schedule, seed=3, num_images=2, batch_size=2,
                  height=SIZE, width=SIZE, show_progress=False)
    ref.scheduler = make_ref(ref.scheduler.config)
    theirs = ref(PROMPT, num_inference_steps=4, guidance_scale=1.0, num_images_per_prompt=2, generator=_gens(3, 2),
                 height=SIZE, width=SIZE, output_type="np").images
    assert np.abs(result.decoded - theirs).max() == 0


# --------------------------------------------------------------------------------------- an LCM-distilled U-Net

@pytest.fixture(scope="module")
def lcm_model(tiny_model, tmp_path_factory):
    """`tiny_model` with an LCM-distilled-shaped U-Net: `time_cond_proj_dim` 32 (its guidance-embedding input)."""
    out = tmp_path_factory.mktemp("tiny-lcm") / "model"
    shutil.copytree(tiny_model, out)
    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_config({**UNet2DConditionModel.load_config(tiny_model / "unet"),
                                             "time_cond_proj_dim": 32})
    shutil.rmtree(out / "unet")
    unet.save_pretrained(out / "unet", safe_serialization=True)
    return out


def test_the_guidance_embedding_is_diffusers(reference):
    for w, dim in ((6.5, 256), (0.0, 32), (1.5, 33)):
        theirs = reference.get_guidance_scale_embedding(torch.tensor([w]), embedding_dim=dim)
        assert torch.equal(guidance_scale_embedding(w, dim), theirs)


def test_an_lcm_distilled_unet_runs_one_branch_with_its_guidance_embedded(lcm_model, caplog):
    pipe = Pipeline.from_pretrained(lcm_model, device="cpu", dtype="fp32")
    rows = []
    unet = pipe._unet_fn
    pipe._unet_fn = lambda x, t, **kw: rows.append((x.shape[0], kw["timestep_cond"].shape)) or unet(x, t, **kw)
    kw = {"steps": 2, "sampler": "lcm", "seed": 4, "num_images": 2, "batch_size": 2, "height": SIZE, "width": SIZE,
          "show_progress": False}
    with caplog.at_level(logging.WARNING, logger="ldm"):
        ours = pipe(PROMPT, NEGATIVE, cfg=7.5, **kw)
    assert rows == [(2, (2, 32))] * 2  # one branch: 2 rows per call, not 4, whatever the cfg
    assert "the negative prompt is not used" in caplog.text
    ref = StableDiffusionPipeline.from_pretrained(lcm_model, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = LCMScheduler.from_config(ref.scheduler.config)
    theirs = ref(PROMPT, num_inference_steps=2, guidance_scale=7.5, height=SIZE, width=SIZE, num_images_per_prompt=2,
                 generator=_gens(4, 2), output_type="np").images
    assert np.abs(ours.decoded - theirs).max() <= 1e-4
    # the cfg is the U-Net's input: another one gives another image
    assert np.abs(pipe(PROMPT, cfg=2.0, **kw).decoded - ours.decoded).max() > 1e-3


# ------------------------------------------------------------------------------------------- names, PNGs, payloads

A1111_LIGHTNING = ("a red car\nSteps: 4, Sampler: Euler, Schedule type: SGM Uniform, CFG scale: 1, Seed: 7, "
                   "Size: 32x32, Model: sdxl_lightning_4step, Version: v1.10.1")


@pytest.mark.parametrize("fields, text", [
    ({"sampler": "lcm", "cfg": 1.0}, "Steps: 4, Sampler: LCM, CFG scale: 1, Seed: 7"),
    ({"sampler": "tcd", "eta": 0.5}, "Sampler: TCD, CFG scale: 7.5, Seed: 7, Size: 32x32, Model: m, Eta: 0.5"),
    ({"sampler": "tcd"}, "Model: m, Eta: 0.3"),  # the default gamma, written: a replay does not depend on it
    ({"sampler": "euler_a", "schedule": "sgm_uniform"}, "Sampler: Euler a, Schedule type: SGM Uniform, CFG"),
    ({"sampler": "lcm", "schedule": "sgm_uniform"}, "Sampler: LCM, Schedule type: SGM Uniform, CFG"),
])
def test_few_step_settings_round_trip_through_png_text(fields, text):
    model = type("M", (), {"vae_factor": 2, "default_size": 32, "train_timesteps": 1000, "inpainting_unet": False,
                           "arch": "sd"})
    r = GenerationRequest(prompt="a red car", steps=4, seed=7, model="m", **fields).resolve(model)
    written = format_parameters(r)
    assert text in written
    assert GenerationRequest.layered(parse_parameters(written)).resolve(model) == r


def test_a1111_and_comfyui_spellings_of_few_step_settings():
    p = parse_parameters(A1111_LIGHTNING)
    assert (p["sampler"], p["schedule"], p["cfg"], p["steps"]) == ("euler", "sgm_uniform", 1.0, 4)
    # A1111 < 1.9 put the schedule into the sampler's name; its alias SGMUniform too
    assert parse_parameters(A1111_LIGHTNING.replace("Euler, Schedule type: SGM Uniform", "Euler SGMUniform")) == p
    layer = from_a1111({"sampler_name": "LCM", "scheduler": "SGM Uniform", "cfg_scale": 1, "eta": 0.9})
    assert (layer["sampler"], layer["schedule"], layer["cfg"], "eta" in layer) == ("lcm", "sgm_uniform", 1, False)
    tcd = GenerationRequest.layered(from_a1111({"sampler_name": "TCD", "scheduler": "sgm_uniform", "eta": 0.6}))
    assert (tcd.sampler, tcd.schedule, tcd.eta) == ("tcd", "sgm_uniform", 0.6)
    comfy = GenerationRequest.layered({"sampler": "euler_ancestral", "schedule": "sgm_uniform"})
    assert (comfy.sampler, comfy.schedule) == ("euler_a", "sgm_uniform")


def test_an_a1111_eta_of_another_sampler_is_named_not_used(tmp_path, caplog):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat\nSteps: 20, Sampler: Euler a, Schedule type: Exponential, CFG scale: 7, "
                                "Seed: 1, Size: 32x32, Model: m, Eta: 0.67")
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png", pnginfo=info)
    with caplog.at_level(logging.WARNING, logger="ldm"):
        values = replay_values(str(tmp_path / "a.png"))
    assert (values["sampler"], "schedule" not in values or values["schedule"] == "", "eta" in values) == (
        "euler_a", True, False)
    assert ("Schedule type (Exponential: only Karras and SGM Uniform are reproduced; the sampler's own spacing is "
            "used), Eta (only the tcd sampler takes one; 'euler_a' does not)") in caplog.text


@pytest.mark.slow  # three CLI runs, ~8 s on a loaded 2-core machine
def test_the_cli_writes_and_replays_a_few_step_image(tiny_model, tmp_path, capsys):
    generate = partial(run, main)
    common = ["--model", str(tiny_model), "--height", "32", "--width", "32", "-q"]
    code, lines, err = generate(["a red car", "--sampler", "LCM", "--schedule", "SGM Uniform", "--steps", "2",
                                 "--cfg", "1", "--seed", "3", "--outdir", str(tmp_path / "a"), *common], capsys)
    assert code == 0, err
    text = Image.open(lines[0]).info["parameters"]
    assert "Steps: 2, Sampler: LCM, Schedule type: SGM Uniform, CFG scale: 1, Seed: 3" in text
    code, replay, err = generate(["--from-png", lines[0], "--outdir", str(tmp_path / "b"), *common], capsys)
    assert code == 0, err
    np.testing.assert_array_equal(np.asarray(Image.open(replay[0])), np.asarray(Image.open(lines[0])))
    # --no-karras: the sampler's own spacing again, whatever the PNG's schedule
    code, own, err = generate(["--from-png", lines[0], "--no-karras", "--outdir", str(tmp_path / "c"), *common],
                              capsys)
    assert code == 0, err
    assert "Sampler: LCM, CFG scale: 1," in Image.open(own[0]).info["parameters"]
