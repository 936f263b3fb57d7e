"""SDXL inference against diffusers' SDXL pipelines on the same tiny random weights (tests/conftest.py's
`tiny_sdxl_*` models, shaped as diffusers' own SDXL tests shape theirs), and SDXL through the CLI and the server.

Tolerances: txt2img and the refiner hand-over run exactly diffusers' operations in the same order, so they are
compared bit for bit (max abs diff 0). img2img and inpainting allow 1e-4 (as the SD img2img tests do): the init
image's uint8 -> float conversion differs from diffusers' image processor in the last bits (measured 3.5e-6 and
2.0e-6 on these models).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run

from ldm.generate import main as generate_main
from ldm.models.spec import inspect_model
from ldm.pipeline.metadata import format_parameters, parse_parameters
from ldm.pipeline.pipeline import Pipeline
from ldm.pipeline.request import GenerationRequest
from ldm.pipeline.samplers import make_scheduler
from ldm.text.prompt_encoding import apply_weights, encode_prompt, encode_prompt_pair

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT, NEGATIVE = "a red car on a hill", "blurry, low quality"  # no '!': see ldm/text/sdxl.py


@pytest.fixture(scope="module")
def pipe(tiny_sdxl_model, tiny_sdxl_refiner):
    return Pipeline.open(inspect_model(tiny_sdxl_model), "cpu", "fp32", refiner=inspect_model(tiny_sdxl_refiner))


def _diffusers(cls_name: str, path, sampler: str, scheduler_config):
    import diffusers

    ref = getattr(diffusers, cls_name).from_pretrained(path)
    ref.scheduler = make_scheduler(sampler, scheduler_config)
    ref.set_progress_bar_config(disable=True)
    return ref


def _gens(seed: int, n: int = 1) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.fixture(scope="module")
def base_ref(tiny_sdxl_model, pipe):
    return _diffusers("StableDiffusionXLPipeline", tiny_sdxl_model, "euler_a", pipe.scheduler_config)


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m"])
def test_txt2img_equals_diffusers(pipe, base_ref, sampler):
    base_ref.scheduler = make_scheduler(sampler, pipe.scheduler_config)
    ours = pipe(PROMPT, NEGATIVE, steps=4, sampler=sampler, seed=3, num_images=2, batch_size=2, show_progress=False)
    theirs = base_ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=7.5,
                      num_images_per_prompt=2, generator=_gens(3, 2), output_type="np").images
    assert np.abs(ours.decoded - theirs).max() == 0


def test_empty_negative_is_zeros_as_force_zeros_for_empty_prompt_says(pipe, base_ref):
    base_ref.scheduler = make_scheduler("euler_a", pipe.scheduler_config)
    cond, uncond = encode_prompt_pair(pipe.text_encoder, PROMPT, "")
    assert pipe.text_encoder.force_zeros_for_empty_prompt
    assert not uncond.context.any() and not uncond.pooled.any() and cond.pooled.shape == (1, 32)
    ours = pipe(PROMPT, steps=3, seed=5, show_progress=False)
    theirs = base_ref(PROMPT, negative_prompt=None, num_inference_steps=3, guidance_scale=7.5, generator=_gens(5),
                      output_type="np").images
    assert np.abs(ours.decoded - theirs).max() == 0


def test_micro_conditioning_equals_diffusers(pipe, base_ref):
    base_ref.scheduler = make_scheduler("euler_a", pipe.scheduler_config)
    sizes = {"original_size": (128, 96), "crop_top_left": (8, 4), "target_size": (64, 64),
             "negative_original_size": (32, 32), "negative_target_size": (64, 48)}
    ours = pipe(PROMPT, NEGATIVE, steps=3, seed=5, show_progress=False, **sizes)
    theirs = base_ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=3, guidance_scale=7.5,
                      generator=_gens(5), output_type="np", crops_coords_top_left=sizes.pop("crop_top_left"),
                      **sizes).images
    plain = pipe(PROMPT, NEGATIVE, steps=3, seed=5, show_progress=False)
    assert np.abs(ours.decoded - theirs).max() == 0
    assert np.abs(ours.decoded - plain.decoded).max() > 1e-3  # the time ids do condition the U-Net
    text = format_parameters(ours.params[0])
    assert "Original size: 96x128" in text and 'Crop top left: "8, 4"' in text
    assert parse_parameters(text)["original_size"] == (128, 96)
    assert parse_parameters(text)["crop_top_left"] == (8, 4)


@pytest.mark.parametrize("sampler", ["euler_a", "heun"])
def test_refiner_hand_over_equals_diffusers_denoising_end_and_start(pipe, tiny_sdxl_model, tiny_sdxl_refiner,
                                                                     sampler):
    ours = pipe(PROMPT, NEGATIVE, steps=5, sampler=sampler, seed=7, refiner=pipe.refiner.model_name,
                refiner_switch=0.7, show_progress=False)
    base = _diffusers("StableDiffusionXLPipeline", tiny_sdxl_model, sampler, pipe.scheduler_config)
    refiner = _diffusers("StableDiffusionXLImg2ImgPipeline", tiny_sdxl_refiner, sampler, pipe.scheduler_config)
    gens = _gens(7)  # one generator going on through both, as our per-image generators do
    latents = base(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=5, guidance_scale=7.5, generator=gens,
                   denoising_end=0.7, output_type="latent").images
    theirs = refiner(PROMPT, negative_prompt=NEGATIVE, image=latents, num_inference_steps=5, guidance_scale=7.5,
                     generator=gens, denoising_start=0.7, output_type="np").images
    assert np.abs(ours.decoded - theirs).max() == 0
    text = format_parameters(ours.params[0])
    assert f"Refiner: {pipe.refiner.model_name}, Refiner switch at: 0.7" in text
    assert parse_parameters(text)["refiner_switch"] == 0.7


@pytest.fixture(scope="module")
def init_image():
    return Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))


def test_img2img_equals_diffusers(pipe, tiny_sdxl_model, init_image):
    ours = pipe(PROMPT, NEGATIVE, steps=5, seed=3, init_image=init_image, strength=0.6, show_progress=False)
    ref = _diffusers("StableDiffusionXLImg2ImgPipeline", tiny_sdxl_model, "euler_a", pipe.scheduler_config)
    theirs = ref(PROMPT, negative_prompt=NEGATIVE, image=init_image, strength=0.6, num_inference_steps=5,
                 guidance_scale=7.5, generator=_gens(3), output_type="np").images
    assert np.abs(ours.decoded - theirs).max() <= 1e-4


@pytest.mark.parametrize("strength", [1.0, 0.75])
def test_nine_channel_inpainting_equals_diffusers(tiny_sdxl_inpaint_model, init_image, strength):
    ours_pipe = Pipeline.open(inspect_model(tiny_sdxl_inpaint_model), "cpu", "fp32")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    ours = ours_pipe(PROMPT, NEGATIVE, steps=4, seed=3, init_image=init_image, mask=mask, strength=strength,
                     show_progress=False)
    ref = _diffusers("StableDiffusionXLInpaintPipeline", tiny_sdxl_inpaint_model, "euler_a",
                     ours_pipe.scheduler_config)
    theirs = ref(PROMPT, negative_prompt=NEGATIVE, image=init_image, mask_image=mask, strength=strength,
                 num_inference_steps=4, guidance_scale=7.5, generator=_gens(3), output_type="np").images
    assert np.abs(ours.decoded - theirs).max() <= 1e-4


# ------------------------------------------------------------------------------------------------ the text towers

def test_long_prompts_chunk_both_towers_in_lockstep_and_weight_each_on_its_own(pipe):
    encoder = pipe.text_encoder
    words = " ".join(f"w{i}" for i in range(40))  # ~85 tokens: two chunks
    cond = encode_prompt(encoder, f"a (red:1.3) car, {words}")
    assert cond.context.shape == (1, 154, 64) and cond.pooled.shape == (1, 32)
    # each tower's half of the first chunk is that tower's own weighted output (mean restored per tower)
    from ldm.text.prompt_encoding import chunk_input_ids, chunk_tokens
    from ldm.text.prompt_syntax import parse_prompt

    first, last = chunk_tokens(encoder, parse_prompt(f"a (red:1.3) car, {words}"))
    weights = torch.ones(1, 77)
    weights[0, 1 : 1 + len(first.weights)] = torch.tensor(first.weights)
    halves = []
    for tower in encoder.towers:
        z, _ = tower.encode_ids(chunk_input_ids(tower, first))
        halves.append(apply_weights(z, weights))
    torch.testing.assert_close(cond.context[:, :77], torch.cat(halves, dim=-1), rtol=0, atol=0)
    # the pooled embedding is the first chunk's, unweighted
    _, pooled = encoder.towers[-1].encode_ids(chunk_input_ids(encoder.towers[-1], first))
    assert torch.equal(cond.pooled, pooled)
    # the bigG tower pads with 0 after the end token, CLIP-L with the end token
    assert chunk_input_ids(encoder.towers[-1], last)[0, -1] == 0
    assert chunk_input_ids(encoder.towers[0], last)[0, -1] == encoder.tokenizer.eos_token_id


def test_clip_skip_is_forges_rule_and_equals_diffusers_clip_skip(pipe, base_ref):
    encoder = pipe.text_encoder
    one, two, three = (encode_prompt(encoder, PROMPT, clip_skip=n).context for n in (1, 2, 3))
    assert torch.equal(one, two) and not torch.equal(two, three)  # 1 and 2: SDXL's own penultimate layer
    theirs = base_ref.encode_prompt(PROMPT, do_classifier_free_guidance=False, clip_skip=1)[0]  # hidden_states[-3]
    assert torch.equal(three, theirs)
    assert torch.equal(one, base_ref.encode_prompt(PROMPT, do_classifier_free_guidance=False)[0])


def test_exclamation_marks_tokenize_as_open_clip_does_not_as_diffusers_tokenizer_2(pipe, base_ref):
    ours = pipe.text_encoder.token_ids(["wow! a cat"])[0]
    theirs = base_ref.tokenizer_2("wow! a cat", add_special_tokens=False).input_ids  # diffusers #4153
    assert ours[1] == 256 and theirs[1] == 0  # '!</w>' vs the pad token '!'


# ------------------------------------------------------------------------------------------------- CLI and server

def test_cli_refiner_run_replays_from_its_png(tiny_sdxl_model, tiny_sdxl_refiner, tmp_path, capsys):
    code, paths, _ = run(generate_main, [PROMPT, "--model", str(tiny_sdxl_model), "--refiner",
                                             str(tiny_sdxl_refiner), "--steps", "3", "--seed", "2", "--outdir",
                                             str(tmp_path), "--original-size", "96", "128", "-q"], capsys)
    assert code == 0 and len(paths) == 1
    text = Image.open(paths[0]).text["parameters"]
    assert "Refiner switch at: 0.8" in text and "Original size: 128x96" in text
    code, again, _ = run(generate_main, ["--from-png", paths[0], "--outdir", str(tmp_path), "-q"], capsys)
    assert code == 0
    assert np.array_equal(np.asarray(Image.open(paths[0])), np.asarray(Image.open(again[0])))
    code, without, _ = run(generate_main, ["--from-png", paths[0], "--refiner", "", "--outdir", str(tmp_path), "-q"],
                           capsys)  # replay without the refiner
    assert code == 0 and "Refiner" not in Image.open(without[0]).text["parameters"]
    assert not np.array_equal(np.asarray(Image.open(paths[0])), np.asarray(Image.open(without[0])))


def test_a1111_refiner_titles_and_whole_aesthetic_scores_round_trip(pipe):
    text = "a car\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 1024x1024, Model: base, " \
           "Refiner: sd_xl_refiner_1.0 [7440042bbd], Refiner switch at: 0.8"
    assert parse_parameters(text)["refiner"] == "sd_xl_refiner_1.0"
    r = GenerationRequest(prompt="a car", refiner="r", refiner_switch=0.8, aesthetic_score=7, seed=1, width=64,
                          height=64)
    assert parse_parameters(format_parameters(r))["aesthetic_score"] == 7.0


def test_the_refiner_of_a_low_strength_img2img_starts_at_the_init_images_noise_level(pipe, init_image):
    seen = {"base": [], "refiner": []}
    unets = {"base": pipe._unet_fn, "refiner": pipe.refiner._unet_fn}

    def recording(which):
        def unet(x, t, **kw):
            seen[which].append(int(t))
            return unets[which](x, t, **kw)
        return unet

    pipe._unet_fn, pipe.refiner._unet_fn = recording("base"), recording("refiner")
    try:  # strength 0.15 of 20 steps: 3 steps, all below the 0.8 switch (timestep 200)
        pipe(PROMPT, steps=20, sampler="euler", seed=1, init_image=init_image, strength=0.15, cfg=1.0,
             refiner=pipe.refiner.model_name, show_progress=False)
    finally:
        pipe._unet_fn, pipe.refiner._unet_fn = unets["base"], unets["refiner"]
    assert seen["base"] == [] and len(seen["refiner"]) == 3 and max(seen["refiner"]) < 200


@pytest.mark.parametrize("args, message", [
    (["--model", "REFINER"], "is an SDXL refiner, which only finishes a base model's images"),
    (["--model", "BASE", "--refiner", "BASE"], "is not an SDXL refiner (it is an SDXL base model)"),
    (["--model", "SD", "--refiner", "REFINER"], "only applies to SDXL models"),
    (["--model", "SD", "--original-size", "64", "64"], "--original-size only applies to SDXL models"),
    (["--model", "BASE", "--refiner-switch", "0.5"], "--refiner-switch only applies with --refiner"),
    (["--model", "BASE", "--refiner", "REFINER", "--refiner-switch", "1.5"], "--refiner-switch must be in (0, 1)"),
    (["--model", "BASE", "--aesthetic-score", "7"], "--aesthetic-score conditions an SDXL refiner"),
    (["--model", "INPAINT"], "has an inpainting U-Net (9 input channels): pass --init-image and --mask"),
    (["--model", "BASE", "--refiner", "REFINER", "--init-image", "IMAGE", "--mask", "IMAGE"],
     "a refiner with inpainting is not supported"),
])
def test_bad_sdxl_inputs_are_one_line_and_write_nothing(args, message, tiny_sdxl_model, tiny_sdxl_refiner,
                                                        tiny_sdxl_inpaint_model, tiny_model, tmp_path, capsys):
    image = tmp_path / "image.png"
    Image.new("RGB", (64, 64)).save(image)
    names = {"BASE": tiny_sdxl_model, "REFINER": tiny_sdxl_refiner, "INPAINT": tiny_sdxl_inpaint_model,
             "SD": tiny_model, "IMAGE": image}
    argv = [PROMPT, *(str(names.get(a, a)) for a in args), "--outdir", str(tmp_path / "out"), "-q"]
    code, _, err = run(generate_main, argv, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_server_txt2img_with_refiner_checkpoint(tiny_sdxl_model, tiny_sdxl_refiner):
    import json

    from ldm.serve.api import Limits
    from ldm.serve.app import create_app
    from ldm.serve.models import list_models
    from ldm.serve.worker import Worker
    from test_serve_worker import app_server_for, request

    models = list_models([str(tiny_sdxl_model), str(tiny_sdxl_refiner)], None)
    base, refiner = list(models)
    worker = Worker(lambda name: Pipeline.open(models[name], "cpu", "fp32"), base, queue_size=2)
    worker.start()
    try:
        with app_server_for(create_app(models, worker, Limits())) as port:
            body = {"prompt": PROMPT, "steps": 3, "seed": 4, "refiner_checkpoint": refiner, "refiner_switch_at": 0.6}
            status, out = request(port, "POST", "/sdapi/v1/txt2img", body)
            assert status == 200, out
            assert "Refiner switch at: 0.6" in json.loads(out["info"])["infotexts"][0]
            status, out = request(port, "POST", "/sdapi/v1/txt2img", {**body, "refiner_checkpoint": base})
            assert status == 422 and "is not an SDXL refiner" in out["detail"]
            status, out = request(port, "POST", "/sdapi/v1/txt2img",
                                  {"prompt": PROMPT, "override_settings": {"sd_model_checkpoint": refiner}})
            assert status == 422 and "is an SDXL refiner" in out["detail"]
    finally:
        worker.stop()


def test_hires_second_pass_is_conditioned_on_its_own_size(pipe):
    seen = []
    unet = pipe._unet_fn

    def recording(x, t, **kw):
        seen.append(kw["added_cond_kwargs"]["time_ids"][0].tolist())
        return unet(x, t, **kw)

    pipe._unet_fn = recording
    try:
        result = pipe(PROMPT, NEGATIVE, steps=2, seed=1, hires_scale=1.5, show_progress=False)
    finally:
        pipe._unet_fn = unet
    assert result.images[0].size == (96, 96)
    assert seen[0] == [64, 64, 0, 0, 64, 64] and seen[-1] == [96, 96, 0, 0, 96, 96]


def test_four_channel_inpainting_keeps_the_unmasked_pixels(pipe, init_image):
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    out = pipe(PROMPT, steps=3, seed=2, init_image=init_image, mask=mask, mask_blur=0, show_progress=False)
    kept = np.asarray(mask) == 0
    assert np.array_equal(np.asarray(out.images[0])[kept], np.asarray(init_image)[kept])
