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
PNG = ("a red car\nNegative prompt: blurry\nSteps: 30, Sampler: DPM++ 2M Karras, CFG scale: 5, Seed: 42, "
       "Size: 640x384, Model: sd15, Clip skip: 2")


def test_defaults_are_the_documented_ones():
    r = GenerationRequest()
    assert (r.steps, r.cfg, r.sampler, r.karras, r.seed, r.mask_blur, r.strength, r.clip_skip) == (
        25, 7.5, "euler_a", False, -1, None, None, 1)
    assert (r.num_images, r.batch_size, r.guidance_rescale, r.hires_scale) == (1, 1, 0.0, None)


def test_typed_beats_png_beats_default():
    png = parse_parameters(PNG)
    r = GenerationRequest.layered({"cfg": 9.0, "model": "mine"}, png)
    assert (r.cfg, r.model, r.steps, r.seed, r.clip_skip, r.negative_prompt) == (9.0, "mine", 30, 42, 2, "blurry")
    assert (r.sampler, r.karras) == ("dpmpp_2m", True)  # 'DPM++ 2M Karras' from the PNG
    assert GenerationRequest.layered({}, {}).steps == 25  # nothing given: the default


def test_a_layer_that_names_a_sampler_decides_karras():
    png = parse_parameters(PNG)  # DPM++ 2M Karras
    # the typed layer names a sampler: the PNG's schedule is not inherited (its Sampler field is not read then)
    png_without_sampler = parse_parameters(PNG, skip=("Sampler", "Schedule type"))
    assert GenerationRequest.layered({"sampler": "euler"}, png_without_sampler).karras is False
    assert GenerationRequest.layered({"sampler": "Euler"}, png).karras is False  # its layer's label decides
    assert GenerationRequest.layered({"karras": True}, {"sampler": "dpmpp_2m"}).karras is True
    assert GenerationRequest.layered({"sampler": "LMS Karras"}).sampler == "lms"
    # a prompts-file line naming a sampler does not take the command line's --karras
    assert GenerationRequest.layered({"sampler": "euler"}, {"sampler": "euler", "karras": True}).karras is False
    with pytest.raises(TypeError, match="not GenerationRequest fields"):
        GenerationRequest.layered({"cfg_scale": 5})


def test_the_png_text_round_trips_through_a_resolved_request():
    r = GenerationRequest.layered(parse_parameters(PNG)).resolve(MODEL)
    assert format_parameters(r) == PNG


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
    ({"sampler": "euler_a", "karras": True}, "sampler 'euler_a' has no Karras sigmas option"),
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
    assert (r.cfg, r.sampler, r.karras, r.num_images, r.batch_size, r.seed, r.strength, r.mask_blur, r.clip_skip) \
        == (5, "dpmpp_2m", True, 6, 2, 7, 0.5, 2, 2)
    txt = GenerationRequest.layered(from_a1111({"prompt": "p", "denoising_strength": 0.5}))
    assert txt.strength is None  # img2img's field on a txt2img request does not apply
    with pytest.raises(UserError, match="unknown scheduler 'Exponential'; use Automatic or Karras"):
        from_a1111({"scheduler": "Exponential"})
    with pytest.raises(UserError, match="n_iter must be at least 1, got 0"):
        from_a1111({"n_iter": 0})


def test_every_prompts_file_key_names_a_field():
    fields = set(GenerationRequest.__dataclass_fields__)
    assert {field for field, _ in PROMPTS_FILE_KEYS.values()} <= fields
