"""The inference pipeline on a tiny random model: parity with diffusers, guidance, seeds, samplers, inpainting."""

from __future__ import annotations

import logging
import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from ldm.errors import UserError
from ldm.pipeline import images as im
from ldm.pipeline.denoise import denoise
from ldm.pipeline.device import cpu_has_native_bf16, pick_dtype
from ldm.pipeline.guidance import classifier_free_guidance, rescale_guidance
from ldm.pipeline.metadata import format_parameters, parse_parameters
from ldm.pipeline.output import save_png, slug
from ldm.pipeline.pipeline import Pipeline
from ldm.pipeline.request import GenerationRequest
from ldm.pipeline.samplers import (
    SAMPLERS,
    make_scheduler,
    full_label,
    sampler_from_label,
    sampler_label,
)
from ldm.pipeline.validation import MAX_SIZE, MIN_SIZE, check_request, steps_to_run
from ldm.pixels import float_to_uint8
from ldm.text.conditioning import Conditioning
from ldm.weights import check_safetensors_file

PROMPT, NEGATIVE = "a red car", "blurry"
SIZE = 32  # px; 16x16 latents with the tiny VAE's factor of 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model  # tests/conftest.py: written once per session, read-only


@pytest.fixture(scope="module")
def inpaint_model_dir(tiny_inpaint_model):
    return tiny_inpaint_model  # tests/conftest.py: written once per session, read-only


@pytest.fixture(scope="module")
def pipe(model_dir):
    return Pipeline.from_pretrained(model_dir, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def init_image():
    rng = np.random.RandomState(0)
    return Image.fromarray((rng.rand(SIZE, SIZE, 3) * 255).astype(np.uint8))


def _generators(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


class CountingUNet:
    """Wraps the U-Net; records each call's batch size and conditioning."""

    def __init__(self, unet):
        self.unet, self.batch_sizes, self.contexts = unet, [], []

    def __call__(self, x, t, encoder_hidden_states, **kw):
        self.batch_sizes.append(x.shape[0])
        self.contexts.append(encoder_hidden_states)
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states, **kw)


@pytest.fixture
def counting(pipe):
    counter = CountingUNet(pipe.unet)
    pipe._unet_fn = counter
    yield counter
    pipe._unet_fn = pipe.unet


# ---------------------------------------------------------------------------------------------------------- guidance

def test_guidance_is_the_cfg_formula_on_every_channel():
    u, c = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert torch.equal(classifier_free_guidance(u, c, 0.0), u)
    torch.testing.assert_close(classifier_free_guidance(u, c, 1.0), c)  # u + (c - u): c up to rounding
    torch.testing.assert_close(classifier_free_guidance(u, c, 7.5), u + 7.5 * (c - u))
    guided = classifier_free_guidance(u, c, 7.5)
    assert torch.equal(rescale_guidance(guided, c, 0.0), guided)
    full = rescale_guidance(guided, c, 1.0)  # phi = 1: per-image std of the conditional prediction
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), c.std(dim=(1, 2, 3)))


def test_cfg_1_runs_one_branch_and_cfg_0_is_the_negative_prompt(pipe, counting):
    kw = {"steps": 2, "sampler": "ddim", "seed": 1, "num_images": 2, "batch_size": 2, "height": SIZE, "width": SIZE,
          "show_progress": False}
    cond_only = pipe(PROMPT, NEGATIVE, cfg=1.0, **kw)
    assert counting.batch_sizes == [2, 2]  # a single branch: batch b, not 2b
    counting.batch_sizes.clear()
    pipe(PROMPT, NEGATIVE, cfg=7.5, **kw)
    assert counting.batch_sizes == [4, 4]  # both branches in one batched call
    counting.batch_sizes.clear()
    # w = 0 is the unconditional prediction, and the negative prompt *is* the unconditional branch
    uncond_only = pipe(PROMPT, NEGATIVE, cfg=0.0, **kw)
    assert counting.batch_sizes == [2, 2]
    negative_as_prompt = pipe(NEGATIVE, "", cfg=1.0, **kw)
    np.testing.assert_array_equal(uncond_only.decoded, negative_as_prompt.decoded)
    assert np.abs(uncond_only.decoded - cond_only.decoded).max() > 1e-3


def test_negative_prompt_embedding_is_the_unconditional_half(pipe, counting):
    pipe(PROMPT, NEGATIVE, steps=1, cfg=5.0, sampler="euler", seed=0, height=SIZE, width=SIZE, show_progress=False)
    context = counting.contexts[0]  # (2, 77, D): [uncond, cond]
    torch.testing.assert_close(context[:1], pipe.text_encoder.encode([NEGATIVE]))
    torch.testing.assert_close(context[1:], pipe.text_encoder.encode([PROMPT]))
    counting.contexts.clear()
    pipe(PROMPT, steps=1, cfg=5.0, sampler="euler", seed=0, height=SIZE, width=SIZE, show_progress=False)
    torch.testing.assert_close(counting.contexts[0][:1], pipe.text_encoder.encode([""]))


# ------------------------------------------------------------------------------------------- parity with diffusers

@pytest.fixture(scope="module")
def reference(model_dir):
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "unipc", "ddpm"])
def test_txt2img_matches_diffusers(pipe, reference, sampler):
    n, seed = 2, 3
    ours = pipe(PROMPT, NEGATIVE, steps=4, cfg=7.5, sampler=sampler, seed=seed, num_images=n, batch_size=n,
                height=SIZE, width=SIZE, show_progress=False)
    reference.scheduler = make_scheduler(sampler, pipe.scheduler_config)
    theirs = reference(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=7.5, height=SIZE,
                       width=SIZE, num_images_per_prompt=n, generator=_generators(seed, n), output_type="np").images
    assert np.abs(ours.decoded - theirs).max() <= 1e-4


def test_v_prediction_with_guidance_rescale_matches_diffusers(pipe, reference):
    v_config = {**pipe.scheduler_config, "prediction_type": "v_prediction"}
    saved, pipe.scheduler_config = pipe.scheduler_config, v_config
    try:
        ours = pipe(PROMPT, NEGATIVE, steps=3, cfg=7.5, guidance_rescale=0.7, sampler="ddim", seed=5, height=SIZE,
                    width=SIZE, show_progress=False)
    finally:
        pipe.scheduler_config = saved
    reference.scheduler = make_scheduler("ddim", v_config)
    theirs = reference(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=3, guidance_scale=7.5,
                       guidance_rescale=0.7, height=SIZE, width=SIZE, generator=_generators(5, 1),
                       output_type="np").images
    assert np.abs(ours.decoded - theirs).max() <= 1e-4


@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "dpmpp_2m"])
def test_img2img_matches_diffusers(pipe, reference, init_image, sampler):
    from diffusers import StableDiffusionImg2ImgPipeline

    ref = StableDiffusionImg2ImgPipeline(**reference.components)
    ref.set_progress_bar_config(disable=True)
    n, seed = 2, 7
    ours = pipe(PROMPT, NEGATIVE, steps=5, cfg=7.5, sampler=sampler, seed=seed, num_images=n, batch_size=n,
                init_image=init_image, strength=0.6, show_progress=False)
    assert ours.steps_run == 3  # int(5 * 0.6)
    ref.scheduler = make_scheduler(sampler, pipe.scheduler_config)
    theirs = ref(PROMPT, image=init_image, strength=0.6, negative_prompt=NEGATIVE, num_inference_steps=5,
                 guidance_scale=7.5, num_images_per_prompt=n, generator=_generators(seed, n), output_type="np").images
    assert np.abs(ours.decoded - theirs).max() <= 1e-4


@pytest.mark.slow
def test_stage2_export_loads_with_its_text_layer_and_matches_diffusers(pipe, tmp_path):
    """A model written by stage 2's exporter, with a penultimate-layer CLIP (recorded in its ldm_model.json)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from ldm.text.config import TextEncoderConfig
    from ldm.text.tiny import tiny_clip_text_encoder
    from ldm.unet.export import export_model

    training = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    directory = export_model(tmp_path / "stage2", unet=pipe.unet, vae=pipe.vae, noise_scheduler=training,
                             text_encoder=tiny_clip_text_encoder(hidden_size=32, layers=3),
                             text_cfg=TextEncoderConfig(layer="penultimate"))
    ours = Pipeline.from_pretrained(directory, device="cpu", dtype="fp32")
    assert ours.text_encoder.layer == "penultimate"
    result = ours(PROMPT, NEGATIVE, steps=3, sampler="ddim", seed=1, height=SIZE, width=SIZE, show_progress=False)
    ref = StableDiffusionPipeline.from_pretrained(directory, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = make_scheduler("ddim", ours.scheduler_config)
    # diffusers' own clip_skip breaks on transformers 5 (no .text_model): give it the penultimate embeddings, whose
    # equality with clip_skip=1 tests/test_text_encoder.py checks
    encode = ours.text_encoder.encode
    theirs = ref(prompt_embeds=encode([PROMPT]), negative_prompt_embeds=encode([NEGATIVE]), num_inference_steps=3,
                 height=SIZE, width=SIZE, generator=_generators(1, 1), output_type="np").images
    assert np.abs(result.decoded - theirs).max() <= 1e-4


# ---------------------------------------------------------------------------------------------------- seeds/batches

@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["euler_a", "ddpm"])  # both draw fresh noise at every step
def test_images_do_not_depend_on_batch_size(pipe, sampler):
    kw = {"steps": 3, "cfg": 7.5, "sampler": sampler, "seed": 11, "num_images": 4, "height": SIZE, "width": SIZE,
          "show_progress": False}
    one_by_one = pipe(PROMPT, NEGATIVE, batch_size=1, **kw)
    all_at_once = pipe(PROMPT, NEGATIVE, batch_size=4, **kw)
    three_and_one = pipe(PROMPT, NEGATIVE, batch_size=3, **kw)
    np.testing.assert_allclose(one_by_one.decoded, all_at_once.decoded, atol=1e-5, rtol=0)
    np.testing.assert_allclose(one_by_one.decoded, three_and_one.decoded, atol=1e-5, rtol=0)
    assert [p.seed for p in one_by_one.params] == [11, 12, 13, 14]
    # image 2 of the run is the first image of a run started at seed 13
    alone = pipe(PROMPT, NEGATIVE, batch_size=1, **{**kw, "seed": 13, "num_images": 1})
    np.testing.assert_allclose(alone.decoded[0], one_by_one.decoded[2], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------------- samplers

HOSTILE_CONFIG = {  # a scheduler config that asks for clipping in every way diffusers offers
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon", "clip_sample": True, "clip_sample_range": 1.0, "thresholding": True,
    "sample_max_value": 1.0, "steps_offset": 1, "set_alpha_to_one": False,
}
X0 = 5.0  # far outside [-1, 1], where SD latents often are


def _constant_x0_unet():
    """An eps-prediction "model" whose implied x0 is X0 everywhere, whatever the sampler's parameterisation.

    Every sampler hands the U-Net x_in = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps (sigma-based ones after
    `scale_model_input`), i.e. x_in * sqrt(1 + sigma^2) = x0 + sigma * eps with sigma^2 = (1 - alpha_bar) / alpha_bar.
    """
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)
    train_sigmas = ((1 - alpha_bar) / alpha_bar).sqrt().numpy()

    def unet(x, t, encoder_hidden_states, return_dict=False):
        # samplers with fractional timesteps interpolate sigma(t) the same way (exact up to Karras' log-interp)
        sigma = float(np.interp(float(t), np.arange(1000), train_sigmas))
        return ((x * math.sqrt(1 + sigma**2) - X0) / sigma,)

    return unet


def _run_to_the_end(scheduler) -> torch.Tensor:
    scheduler.set_timesteps(4)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    return denoise(_constant_x0_unet(), scheduler, latents, scheduler.timesteps, Conditioning(torch.zeros(1, 77, 8)), None, 1.0,
                   generators=_generators(0, 1))


@pytest.mark.parametrize("sampler, schedule", [*((s, "") for s in SAMPLERS), ("euler", "karras"),
                                               ("euler", "sgm_uniform"), ("lcm", "sgm_uniform")])
def test_samplers_never_clip_latents(sampler, schedule):
    out = _run_to_the_end(make_scheduler(sampler, HOSTILE_CONFIG, schedule))
    # every sampler ends at (within a hair of) the model's x0 when nothing clamps it
    assert out.mean().item() == pytest.approx(X0, rel=0.05), f"{sampler} clipped the latents: {out.mean():.3f}"


@pytest.mark.parametrize("option", [{"clip_sample": True, "thresholding": False}, {"thresholding": True}])
def test_the_clipping_test_catches_a_clipping_sampler(option):
    from diffusers import DDIMScheduler

    out = _run_to_the_end(DDIMScheduler.from_config({**HOSTILE_CONFIG, **option}))  # not via make_scheduler
    assert out.max().item() <= 1.1


def test_sampler_names_and_labels():
    assert sampler_label("dpmpp_2m_karras") == "DPM++ 2M" and full_label("dpmpp_2m_karras") == "DPM++ 2M Karras"
    assert sampler_from_label("DPM++ 2M Karras") == ("dpmpp_2m", "karras")
    assert sampler_from_label("Euler a") == ("euler_a", "")
    for name in SAMPLERS:
        assert sampler_from_label(sampler_label(name))[0] in (name, name.removesuffix("_karras"))
        assert sampler_from_label(full_label(name)) in ((name, ""), (name.removesuffix("_karras"), "karras"))
    with pytest.raises(UserError, match="known samplers: ddim, ddpm, euler, euler_a, dpmpp_2m"):
        make_scheduler("k_lms", HOSTILE_CONFIG)
    assert make_scheduler("dpmpp_2m", HOSTILE_CONFIG, "karras").config.use_karras_sigmas
    # a model saved with a Karras config does not turn plain 'euler' into Karras
    assert not make_scheduler("euler", {**HOSTILE_CONFIG, "use_karras_sigmas": True}).config.use_karras_sigmas


# ---------------------------------------------------------------------------------------------------- inpainting

def _half_mask(size: int = SIZE) -> Image.Image:
    mask = np.zeros((size, size), np.uint8)
    mask[:, size // 2:] = 255  # repaint the right half
    return Image.fromarray(mask)


@pytest.mark.parametrize("channels", [4, 9])
@pytest.mark.parametrize("blur", [0, 4])
def test_inpainting_keeps_unmasked_pixels_bit_for_bit(pipe, inpaint_model_dir, init_image, channels, blur):
    p = pipe if channels == 4 else Pipeline.from_pretrained(inpaint_model_dir, device="cpu", dtype="fp32")
    assert p.inpainting_unet == (channels == 9)
    if channels == 9:
        with pytest.raises(UserError, match="inpainting U-Net .9 input channels.: pass --init-image and --mask"):
            p(PROMPT, steps=1, init_image=init_image, show_progress=False)
    result = p(PROMPT, NEGATIVE, steps=3, cfg=7.5, sampler="euler_a", seed=2, init_image=init_image,
               mask=_half_mask(), mask_blur=blur, show_progress=False)
    out, original = np.asarray(result.images[0]), np.asarray(init_image)
    np.testing.assert_array_equal(out[:, : SIZE // 2], original[:, : SIZE // 2])
    # the masked half was repainted (and, past the feathered band, is the generated image itself)
    assert np.abs(out[:, SIZE // 2 + blur + 1:].astype(int) - original[:, SIZE // 2 + blur + 1:]).mean() > 5
    generated = float_to_uint8(result.decoded)[0]
    np.testing.assert_array_equal(out[:, SIZE // 2 + blur + 1:], generated[:, SIZE // 2 + blur + 1:])


def test_inpainting_an_odd_sized_image_with_a_mask_of_another_size(pipe, caplog):
    rng = np.random.RandomState(1)
    original = Image.fromarray((rng.rand(SIZE + 3, SIZE + 1, 3) * 255).astype(np.uint8))  # W 33, H 35
    with caplog.at_level(logging.WARNING, logger="ldm"):
        result = pipe(PROMPT, steps=2, seed=0, init_image=original, mask=_half_mask(64), show_progress=False)
    assert "mask is 64x64 but the init image is 33x35" in caplog.text
    assert result.params[0].width == 32 and result.params[0].height == 34  # generated at a multiple of the factor
    out = np.asarray(result.images[0])
    assert out.shape == (35, 33, 3)  # pasted back at the init image's own size
    keep = np.asarray(im.fit_mask(_half_mask(64), original.size)) == 0
    np.testing.assert_array_equal(out[keep], np.asarray(original)[keep])


def test_feather_ramps_inward_and_never_leaves_the_mask():
    mask = torch.zeros(1, 1, 20, 20)
    mask[..., 5:15, 5:15] = 1
    mask[..., 0, :] = 1  # a one-pixel line along the border
    alpha = im.feather(mask, 3)
    assert torch.all(alpha[mask == 0] == 0)
    assert alpha[0, 0, 10, 10] == 1  # 5 px inside
    assert alpha[0, 0, 5, 10] == pytest.approx(0.25)  # the edge ring: 1 / (blur + 1)
    assert torch.all(alpha[0, 0, 0, :] > 0)  # a thin mask is feathered, not erased
    assert torch.equal(im.feather(mask, 0), mask)


# -------------------------------------------------------------------------------------------- precision, decoding

def test_fp16_vae_nan_is_decoded_again_in_fp32(pipe, caplog):
    latents = torch.randn(1, 4, 16, 16).half()
    expected = pipe.vae.decode(latents.float() / pipe.vae.config.scaling_factor, return_dict=False)[0]
    calls = []
    real_decode = pipe.vae.decode

    def nan_in_half(z, **kw):
        calls.append(z.dtype)
        out = real_decode(z.float(), **kw)
        return (out[0] * float("nan"),) if z.dtype == torch.float16 else out

    pipe.vae.decode, pipe.codec.dtype = nan_in_half, torch.float16  # pretend the pipeline runs in fp16
    try:
        with caplog.at_level(logging.WARNING, logger="ldm"):
            decoded = pipe.codec.decode(latents)
    finally:
        del pipe.vae.decode
        pipe.codec.dtype = torch.float32
    assert calls == [torch.float16, torch.float32]
    assert "decoding again in fp32" in caplog.text
    torch.testing.assert_close(decoded, expected, atol=1e-3, rtol=0)


def test_vae_tiling_and_sdpa_attention(model_dir):
    tiled = Pipeline.from_pretrained(model_dir, device="cpu", dtype="fp32", vae_tiling=True)
    assert tiled.vae.use_tiling
    assert {type(p).__name__ for p in tiled.unet.attn_processors.values()} == {"AttnProcessor2_0"}  # torch SDPA
    # 64 px is twice the tiny VAE's tile size, so this decode really goes tile by tile
    result = tiled(PROMPT, steps=2, seed=0, height=64, width=64, show_progress=False)
    assert result.images[0].size == (64, 64) and np.isfinite(result.decoded).all()


def test_fp16_on_cpu_falls_back_to_fp32(caplog):
    with caplog.at_level(logging.WARNING, logger="ldm"):
        assert pick_dtype("fp16", torch.device("cpu")) == torch.float32
    assert "fp16 is not supported on the CPU" in caplog.text
    assert pick_dtype("fp32", torch.device("cpu")) == torch.float32


@pytest.mark.parametrize("caps, native", [({"avx512_bf16": True}, True), ({"amx_bf16": True}, True),
                                          ({"avx2": True, "avx512_bf16": False}, False), ({}, False)])
def test_auto_dtype_on_cpu_is_bf16_only_with_native_bf16(monkeypatch, caplog, caps, native):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    cpu = torch.device("cpu")
    assert cpu_has_native_bf16() is native
    assert pick_dtype("auto", cpu) == pick_dtype(None, cpu) == (torch.bfloat16 if native else torch.float32)
    assert pick_dtype("fp32", cpu) == torch.float32  # exactness on request, whatever the CPU
    with caplog.at_level(logging.WARNING, logger="ldm"):
        assert pick_dtype("bf16", cpu) == torch.bfloat16  # honoured either way; said out loud where it is slow
    assert ("no native bf16" in caplog.text) is not native


def test_native_bf16_from_proc_cpuinfo_on_a_torch_without_get_capabilities(monkeypatch, tmp_path):
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    real_open = open
    for flags, native in (("fpu avx2 avx512f avx512_bf16 amx_tile", True), ("fpu avx2 amx_bf16", True),
                          ("fpu avx2 avx512f", False)):
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(
            cpuinfo if path == "/proc/cpuinfo" else path, *a, **k))
        assert cpu_has_native_bf16() is native


# ------------------------------------------------------------------------------------------- metadata and output

def test_parameters_text_round_trips():
    p = GenerationRequest(
        prompt="a red car, at night: rainy\nsecond line", negative_prompt="blurry, low quality", steps=30,
        sampler="dpmpp_2m", schedule="karras", cfg=7.5, seed=4242, width=640, height=384, model="models/sd, v1",
        strength=0.6, guidance_rescale=0.7, mask_blur=4,
    )
    text = format_parameters(p)
    assert text.splitlines()[-1].startswith("Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, "
                                            "Seed: 4242, Size: 640x384")
    assert GenerationRequest(**parse_parameters(text)) == p
    plain = GenerationRequest(prompt="cat", cfg=7.0, seed=1)
    assert "Negative prompt" not in format_parameters(plain)
    assert GenerationRequest(**parse_parameters(format_parameters(plain))) == plain
    # A1111's own text, with keys we do not use
    a1111 = "cat\nNegative prompt: dog\nSteps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, " \
            "Seed: 1, Size: 512x768, Model hash: abc, Model: v1-5, Version: v1.9"
    parsed = parse_parameters(a1111)
    assert (parsed["sampler"], parsed["width"], parsed["height"], parsed["negative_prompt"]) == ("euler_a", 512, 768, "dog")


def test_png_names_count_up_and_never_overwrite(tmp_path, monkeypatch):
    image = Image.new("RGB", (8, 8))
    (tmp_path / "00012-1-old.png").write_bytes(b"not ours")
    params = GenerationRequest(prompt="A red car, at night!", seed=42)
    assert slug(params.prompt) == "a-red-car-at-night"
    first = save_png(image, params, tmp_path)
    assert first.name == "00013-42-a-red-car-at-night.png"
    # the name the counter would pick is taken by someone else: the next one is used, the file is untouched
    (tmp_path / "00014-42-a-red-car-at-night.png").write_bytes(b"taken")
    monkeypatch.setattr("ldm.pipeline.output.next_counter", lambda d: 14)
    second = save_png(image, params, tmp_path)
    assert second.name == "00015-42-a-red-car-at-night.png"
    assert (tmp_path / "00014-42-a-red-car-at-night.png").read_bytes() == b"taken"
    assert not list(tmp_path.glob(".tmp-*"))  # no temporary file left behind
    assert Image.open(first).info["parameters"].startswith("A red car, at night!\nSteps: 25")


# ---------------------------------------------------------------------------------------------------- weight files

def test_safetensors_checks_name_the_file(tmp_path, model_dir):
    good = model_dir / "vae" / "diffusion_pytorch_model.safetensors"
    check_safetensors_file(good)
    pointer = tmp_path / "pointer.safetensors"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 3438167534\n")
    with pytest.raises(UserError, match="pointer.safetensors' is a git-lfs pointer"):
        check_safetensors_file(pointer)
    data = good.read_bytes()
    for name, content in [("short.safetensors", data[: len(data) // 2]), ("header.safetensors", data[:100]),
                          ("tiny.safetensors", data[:5])]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UserError, match=f"{name}' is truncated"):
            check_safetensors_file(tmp_path / name)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{]" + b"\0" * 64)
    with pytest.raises(UserError, match="garbage.safetensors' is corrupted"):
        check_safetensors_file(garbage)


# ------------------------------------------------------------------------------------------------------ validation

@settings(max_examples=300, deadline=None)
@given(
    steps=st.integers(-5, 1100),
    cfg=st.one_of(st.floats(-5, 40), st.sampled_from([math.nan, math.inf, -math.inf])),
    height=st.integers(-16, 9000),
    width=st.integers(-16, 9000),
    factor=st.sampled_from([1, 2, 4, 8]),
    strength=st.one_of(st.none(), st.floats(-0.5, 1.5), st.just(math.nan)),
    rescale=st.floats(-0.5, 1.5),
    num_images=st.integers(-1, 5),
    batch_size=st.integers(-1, 5),
)
def test_validation_accepts_exactly_the_valid_arguments(
    steps, cfg, height, width, factor, strength, rescale, num_images, batch_size
):
    valid = (
        1 <= steps <= 1000
        and math.isfinite(cfg) and cfg >= 0
        and 0 <= rescale <= 1
        and all(MIN_SIZE <= v <= MAX_SIZE and v % factor == 0 for v in (height, width))
        and (strength is None or (0 < strength <= 1 and steps_to_run(steps, strength) >= 1))
        and num_images >= 1 and batch_size >= 1
    )
    kwargs = {"steps": steps, "cfg": cfg, "height": height, "width": width, "vae_factor": factor,
              "strength": strength, "guidance_rescale": rescale, "num_images": num_images, "batch_size": batch_size}
    if valid:
        check_request(**kwargs)
    else:
        with pytest.raises(UserError):
            check_request(**kwargs)


def test_strength_sets_the_number_of_steps():
    assert steps_to_run(25, 0.6) == 15
    assert steps_to_run(25, 1.0) == 25
    assert steps_to_run(25, 0.03) == 0  # and check_request refuses it:
    with pytest.raises(UserError, match="runs no denoising step"):
        check_request(steps=25, cfg=7.5, height=64, width=64, vae_factor=8, strength=0.03)
