"""The generation request: its defaults, the precedence of its layers (typed > PNG > default), each source's key
names, and what resolving against a model decides. Pure: no model is loaded."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from PIL import Image

from ldm.errors import UserError
from ldm.pipeline.metadata import format_parameters, parse_parameters
from ldm.pipeline.request import PROMPTS_FILE_KEYS, GenerationRequest, from_a1111

MODEL = SimpleNamespace(vae_factor=8, default_size=512, train_timesteps=1000, inpainting_unet=False, arch="sd")
PNG = ("a red car\nNegative prompt: blurry\nSteps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5, "
       "Seed: 42, Size: 640x384, Model: sd15, Clip skip: 2")
OLD_PNG = PNG.replace("DPM++ 2M, Schedule type: Karras", "DPM++ 2M Karras")  # A1111 < 1.9, and ours before


def test_defaults_are_the_documented_ones():
    r = GenerationRequest()
    assert (r.steps, r.cfg, r.sampler, r.schedule, r.eta, r.seed, r.mask_blur, r.strength, r.clip_skip) == (
        25, 7.5, "euler_a", "", None, -1, None, None, 1)
    assert (r.num_images, r.batch_size, r.guidance_rescale, r.hires_scale) == (1, 1, 0.0, None)


def test_typed_beats_png_beats_default():
    png = parse_parameters(PNG)
    r = GenerationRequest.layered({"cfg": 9.0, "model": "mine"}, png)
    assert (r.cfg, r.model, r.steps, r.seed, r.clip_skip, r.negative_prompt) == (9.0, "mine", 30, 42, 2, "blurry")
    assert (r.sampler, r.schedule) == ("dpmpp_2m", "karras")  # 'DPM++ 2M, Schedule type: Karras' from the PNG
    assert GenerationRequest.layered({"cfg": 9.0, "model": "mine"}, parse_parameters(OLD_PNG)) == r
    assert GenerationRequest.layered({}, {}).steps == 25  # nothing given: the default


def test_a_layer_that_names_a_sampler_decides_the_schedule():
    png = parse_parameters(PNG)  # DPM++ 2M Karras
    # the typed layer names a sampler: the PNG's schedule is not inherited (its Sampler field is not read then)
    png_without_sampler = parse_parameters(PNG, skip=("Sampler", "Schedule type"))
    assert GenerationRequest.layered({"sampler": "euler"}, png_without_sampler).schedule == ""
    assert GenerationRequest.layered({"sampler": "Euler"}, png).schedule == ""  # its layer's label decides
    assert GenerationRequest.layered({"schedule": "karras"}, {"sampler": "dpmpp_2m"}).schedule == "karras"
    assert GenerationRequest.layered({"sampler": "LMS Karras"}).sampler == "lms"
    # a prompts-file line naming a sampler does not take the command line's --karras
    assert GenerationRequest.layered({"sampler": "euler"}, {"sampler": "euler", "schedule": "karras"}).schedule == ""
    # a schedule by A1111's or ComfyUI's name; the sampler label's own schedule wins over the layer's, as in A1111
    assert GenerationRequest.layered({"schedule": "SGM Uniform"}).schedule == "sgm_uniform"
    assert GenerationRequest.layered({"sampler": "Euler SGMUniform", "schedule": "karras"}).schedule == "sgm_uniform"
    # ... and its eta: a PNG's TCD gamma is not kept under another sampler
    assert GenerationRequest.layered({"sampler": "euler"}, {"sampler": "tcd", "eta": 0.5}).eta is None
    with pytest.raises(TypeError, match="not GenerationRequest fields"):
        GenerationRequest.layered({"cfg_scale": 5})


def test_the_png_text_round_trips_through_a_resolved_request():
    r = GenerationRequest.layered(parse_parameters(PNG)).resolve(MODEL)
    assert format_parameters(r) == PNG
    # the old form reads to the same request, and is written in the new one (as A1111 >= 1.9 writes it)
    assert format_parameters(GenerationRequest.layered(parse_parameters(OLD_PNG)).resolve(MODEL)) == PNG


def test_resolve_decides_sizes_strength_mask_blur_and_seed():
    init = Image.new("RGB", (301, 203))
    mask = Image.new("L", (301, 203))
    txt = GenerationRequest(prompt="x").resolve(MODEL)
    assert (txt.width, txt.height, txt.strength, txt.mask_blur) == (512, 512, None, None)
    assert 0 <= txt.seed < 2**32 and txt.resolved
    img2img = GenerationRequest(prompt="x", init_image=init, mask_blur=2).resolve(MODEL)
    assert (img2img.width, img2img.height, img2img.strength, img2img.mask_blur) == (296, 200, 0.75, None)
    inpaint = GenerationRequest(prompt="x", init_image=init, mask=mask).resolve(MODEL)
    assert (inpaint.strength, inpaint.mask_blur) == (1.0, 4)
    hires = GenerationRequest(prompt="x", hires_scale=2, hires_upscaler="Lanczos", seed=3).resolve(MODEL)
    assert (hires.hires_strength, hires.hires_steps, hires.hires_upscaler, hires.seed) == (0.7, 0, "lanczos", 3)
    assert hires.resolve(MODEL) is hires  # resolved once; a second call checks nothing again


@pytest.mark.parametrize("values, message", [
    ({"mask": Image.new("L", (8, 8))}, "--mask needs --init-image"),
    ({"strength": 0.5}, "--strength only applies with --init-image"),
    ({"hires_strength": 0.5}, "--hires-strength only apply with --hires-scale"),
    ({"hires_scale": 2, "init_image": Image.new("RGB", (64, 64))}, "the hires fix is for txt2img"),
    ({"clip_skip": 0}, "--clip-skip must be at least 1"),
    ({"steps": 1001}, "steps 1001 exceeds the model's 1000 training timesteps"),
    ({"width": 100}, "width 100 is not a multiple of 8"),
    ({"sampler": "euler_a", "schedule": "karras"}, "sampler 'euler_a' takes no Karras schedule; samplers that do: "
                                                   "euler, dpmpp_2m, unipc, lms, heun"),
    ({"sampler": "lcm", "schedule": "karras"}, "sampler 'lcm' takes no Karras schedule"),
    ({"schedule": "exponential"}, "unknown schedule 'exponential'; known schedules: karras, sgm_uniform"),
    ({"sampler": "euler", "eta": 0.3}, "--eta only applies to the tcd sampler (TCD's gamma); sampler 'euler'"),
    ({"sampler": "tcd", "eta": 1.5}, "--eta (TCD's gamma) must be in "),  # [0, 1] (0 = deterministic), got 1.5
    ({"prompt": "(x:30)"}, "prompt: weight 30 in '(x:30)' is out of range"),
])
def test_bad_requests_are_one_line_each(values, message):
    with pytest.raises(UserError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        GenerationRequest(**values).resolve(MODEL)


def test_an_inpainting_unet_needs_a_mask():
    with pytest.raises(UserError, match="inpainting U-Net"):
        GenerationRequest(prompt="x").resolve(SimpleNamespace(**{**vars(MODEL), "inpainting_unet": True}))


def test_an_a1111_payload_maps_onto_the_fields():
    init = Image.new("RGB", (64, 64))
    layer = from_a1111({"prompt": "p", "cfg_scale": 5, "sampler_name": "DPM++ 2M", "scheduler": "Karras",
                        "batch_size": 2, "n_iter": 3, "seed": 7, "denoising_strength": 0.5, "mask_blur": 2,
                        "override_settings": {"CLIP_stop_at_last_layers": 2}, "init_image": init})
    r = GenerationRequest.layered(layer)
    assert (r.cfg, r.sampler, r.schedule, r.num_images, r.batch_size, r.seed, r.strength, r.mask_blur, r.clip_skip) \
        == (5, "dpmpp_2m", "karras", 6, 2, 7, 0.5, 2, 2)
    txt = GenerationRequest.layered(from_a1111({"prompt": "p", "denoising_strength": 0.5}))
    assert txt.strength is None  # img2img's field on a txt2img request does not apply
    with pytest.raises(UserError, match="^unknown scheduler 'Exponential'; known schedulers: Automatic, Karras, SGM "
                                        r"Uniform \(GET /sdapi/v1/schedulers\)$"):
        from_a1111({"scheduler": "Exponential"})
    with pytest.raises(UserError, match="n_iter must be at least 1, got 0"):
        from_a1111({"n_iter": 0})


def test_every_prompts_file_key_names_a_field():
    fields = set(GenerationRequest.__dataclass_fields__)
    assert {field for field, _ in PROMPTS_FILE_KEYS.values()} <= fields
