"""ControlNet: our images against diffusers' ControlNet pipelines on the same tiny random weights, the canny
preprocessor against OpenCV, single files in the original layout, and the CLI, PNG replay, prompt lists and the
server with their refusals.

The ControlNets are diffusers' `ControlNetModel.from_unet` of the tiny models' U-Nets (the conditioning embedding
made to downsample by 2, the tiny VAE's factor), with their zero convolutions randomised so that the residuals are
not zero (a freshly made ControlNet adds exactly nothing). Tolerances: txt2img (SD and SDXL, one or two
ControlNets, start/end, guess mode) runs exactly diffusers' operations in the same order and is compared bit for bit
(max abs diff 0). img2img allows 1e-4, as the other img2img comparisons do: the init image's uint8 -> float
conversion differs from diffusers' image processor in the last bits.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run
from ldm.controlnet.canny import canny
from ldm.controlnet.load import inspect_controlnet, load_controlnet
from ldm.controlnet.preprocess import control_map
from ldm.controlnet.unit import ControlUnit, units_from_a1111
from ldm.errors import UserError
from ldm.generate import main
from ldm.models.spec import inspect_model
from ldm.pipeline.metadata import format_parameters, parse_parameters
from ldm.pipeline.pipeline import Pipeline
from ldm.pipeline.request import GenerationRequest
from ldm.pipeline.samplers import make_scheduler
from ldm.singlefile import keys

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT, NEGATIVE = "a red car on a hill", "blurry"
SIZE = 32
generate = partial(run, main)


# the tiny SDXL U-Net's config (ldm/pipeline/tiny.py `save_tiny_sdxl_model`), as ControlNetModel.from_unet copies it:
# the SDXL ControlNet is made without writing the SDXL model, which only the slow parity test needs
TINY_SDXL = dict(block_out_channels=(32, 64), layers_per_block=2, down_block_types=("DownBlock2D",
                 "CrossAttnDownBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                 projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64, norm_num_groups=1)


def _controlnet(unet, seed: int, widths=(16, 32)):
    """A ControlNet of `unet` (a U-Net, or a config as TINY_SDXL), its zero convolutions randomised."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=widths) if not isinstance(unet, dict) \
        else ControlNetModel(**unet, conditioning_embedding_out_channels=widths)
    with torch.no_grad():  # the zero convolutions, randomised: residuals that are not zero
        for name, p in cn.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block",
                                "controlnet_cond_embedding.conv_out")):
                p.normal_(0, 0.3)
    return cn


def _original_file(cn, path: Path, prefix: str = keys.CONTROLNET_PREFIX) -> Path:
    """`cn` as a single file in the original (cldm) layout."""
    from safetensors.torch import save_file

    state = cn.state_dict()
    names = keys.controlnet_to_original(list(state), dict(cn.config))
    save_file({prefix + names[k]: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _image(seed: int, size: int = SIZE) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8))


def _gens(seed: int, n: int = 1) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.fixture(scope="module")
def cn_dir(tmp_path_factory, tiny_model) -> Path:
    """cn-a, cn-b: SD ControlNets (diffusers directories); cn-a-file.safetensors: cn-a in the original layout;
    xl: an SDXL ControlNet."""
    from diffusers import UNet2DConditionModel

    d = tmp_path_factory.mktemp("controlnets")
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    a = _controlnet(unet, 1)
    a.save_pretrained(d / "cn-a", safe_serialization=True)
    _controlnet(unet, 2).save_pretrained(d / "cn-b", safe_serialization=True)
    _original_file(a, d / "cn-a-file.safetensors")
    _controlnet(TINY_SDXL, 3).save_pretrained(d / "xl", safe_serialization=True)
    return d


@pytest.fixture(scope="module")
def pipe(tiny_model, cn_dir):
    return Pipeline.open(inspect_model(tiny_model), "cpu", "fp32", controlnet_dir=cn_dir)


@pytest.fixture(scope="module")
def reference(tiny_model, cn_dir, pipe):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    ref = StableDiffusionControlNetPipeline.from_pretrained(
        tiny_model, controlnet=ControlNetModel.from_pretrained(cn_dir / "cn-a"), safety_checker=None,
        requires_safety_checker=False)
    ref.scheduler = make_scheduler("euler_a", pipe.scheduler_config)
    ref.set_progress_bar_config(disable=True)
    return ref


def _ours(pipe, units, **settings):
    return pipe(PROMPT, NEGATIVE, steps=4, seed=3, height=SIZE, width=SIZE, sampler="euler_a", show_progress=False,
                controlnets=tuple(units), **settings)


# ------------------------------------------------------------------------------------------- parity with diffusers

def test_one_controlnet_equals_diffusers_and_does_steer(pipe, reference):
    ours = _ours(pipe, [ControlUnit("cn-a", image=_image(0), weight=0.8)])
    theirs = reference(PROMPT, image=_image(0), negative_prompt=NEGATIVE, num_inference_steps=4, height=SIZE,
                       width=SIZE, controlnet_conditioning_scale=0.8, generator=_gens(3), output_type="np").images
    plain = _ours(pipe, [])
    assert np.abs(ours.decoded - theirs).max() == 0
    assert np.abs(ours.decoded - plain.decoded).max() > 0.05  # the residuals do reach the U-Net


def test_two_controlnets_with_start_and_end_equal_diffusers_multicontrolnet(pipe, reference, cn_dir):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    units = [ControlUnit("cn-a", image=_image(0), weight=0.8, end=0.5),
             ControlUnit("cn-b", image=_image(1), weight=1.2, start=0.25)]
    ours = _ours(pipe, units, num_images=2, batch_size=2)
    multi = MultiControlNetModel([reference.controlnet, ControlNetModel.from_pretrained(cn_dir / "cn-b")])
    ref = StableDiffusionControlNetPipeline(**{**reference.components, "controlnet": multi})
    ref.set_progress_bar_config(disable=True)
    theirs = ref(PROMPT, image=[_image(0), _image(1)], negative_prompt=NEGATIVE, num_inference_steps=4,
                 height=SIZE, width=SIZE, controlnet_conditioning_scale=[0.8, 1.2], control_guidance_start=[0.0, 0.25],
                 control_guidance_end=[0.5, 1.0], num_images_per_prompt=2, generator=_gens(3, 2),
                 output_type="np").images
    assert np.abs(ours.decoded - theirs).max() == 0


def test_controlnet_is_more_important_is_diffusers_guess_mode(pipe, reference):
    ours = _ours(pipe, [ControlUnit("cn-a", image=_image(0), control_mode="ControlNet is more important")])
    theirs = reference(PROMPT, image=_image(0), negative_prompt=NEGATIVE, num_inference_steps=4, height=SIZE,
                       width=SIZE, guess_mode=True, generator=_gens(3), output_type="np").images
    assert np.abs(ours.decoded - theirs).max() == 0


def test_control_modes_scale_the_blocks_and_choose_the_branches(reference):
    """Balanced: weight x residuals on both branches; "My prompt is more important": x logspace(-1, 0) over the
    blocks (shallowest weakest); "ControlNet is more important": that, on the conditional branch only."""
    from ldm.controlnet.residuals import Steering, residual_hook

    torch.manual_seed(0)
    x, t, context = torch.randn(2, 4, 16, 16), torch.tensor(500), torch.randn(2, 77, 32)  # [uncond, cond]
    image, kwargs = torch.rand(1, 3, SIZE, SIZE), {"encoder_hidden_states": context}

    def hook(mode: str, start: float = 0.0, i: int = 0):
        with torch.no_grad():
            return residual_hook([Steering(reference.controlnet, image, 0.5, start, 1.0, mode)], batch=1)(
                x, t, i, 4, kwargs)

    balanced, prompt, control = (hook(m) for m in ("Balanced", "My prompt is more important",
                                                   "ControlNet is more important"))
    blocks = balanced["down_block_additional_residuals"] + [balanced["mid_block_additional_residual"]]
    scales = torch.logspace(-1, 0, len(blocks))
    for k, block in enumerate(prompt["down_block_additional_residuals"] + [prompt["mid_block_additional_residual"]]):
        torch.testing.assert_close(block, blocks[k] * scales[k])  # the same ControlNet output, scaled per block
    for block, soft in zip(control["down_block_additional_residuals"], prompt["down_block_additional_residuals"]):
        assert not block[:1].any()  # zeros on the unconditional branch; the conditional one's alone: another
        torch.testing.assert_close(block[1:], soft[1:])  # batch size than `soft`'s, so the last bits may differ
    assert hook("Balanced", start=0.5, i=1) == {}  # step 1 of 4 is before a start of 0.5: no residuals


def test_img2img_equals_diffusers_controlnet_img2img(pipe, reference):
    from diffusers import StableDiffusionControlNetImg2ImgPipeline

    ref = StableDiffusionControlNetImg2ImgPipeline(**reference.components)
    ref.set_progress_bar_config(disable=True)
    ours = _ours(pipe, [ControlUnit("cn-a", image=_image(0), start=0.3)], init_image=_image(5), strength=0.6)
    theirs = ref(PROMPT, image=_image(5), control_image=_image(0), strength=0.6, negative_prompt=NEGATIVE,
                 num_inference_steps=4, control_guidance_start=0.3, controlnet_conditioning_scale=1.0,  # default 0.8
                 generator=_gens(3), output_type="np").images
    assert ours.steps_run == 2 and np.abs(ours.decoded - theirs).max() <= 1e-4


@pytest.mark.slow  # opens an SDXL model in both pipelines (~10 s on 2 shared cores)
def test_sdxl_equals_diffusers(tiny_sdxl_model, cn_dir):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    xl = Pipeline.open(inspect_model(tiny_sdxl_model), "cpu", "fp32", controlnet_dir=cn_dir)
    ours = xl(PROMPT, NEGATIVE, steps=3, seed=3, height=SIZE, width=SIZE, show_progress=False,
              controlnets=(ControlUnit("xl", image=_image(0), weight=0.7, end=0.7),))
    ref = StableDiffusionXLControlNetPipeline.from_pretrained(tiny_sdxl_model,
                                                              controlnet=ControlNetModel.from_pretrained(cn_dir / "xl"))
    ref.scheduler = make_scheduler("euler_a", xl.scheduler_config)
    ref.set_progress_bar_config(disable=True)
    theirs = ref(PROMPT, image=_image(0), negative_prompt=NEGATIVE, num_inference_steps=3, height=SIZE, width=SIZE,
                 guidance_scale=7.5, controlnet_conditioning_scale=0.7, control_guidance_end=0.7, generator=_gens(3),
                 output_type="np").images  # diffusers' SDXL default scale is 5: ours 7.5 given
    assert np.abs(ours.decoded - theirs).max() == 0
    with pytest.raises(UserError, match=r"for SD 1.x/2.x|is a ControlNet for SD"):  # an SD ControlNet on SDXL
        xl(PROMPT, steps=1, controlnets=(ControlUnit("cn-a", image=_image(0)),), show_progress=False)


@pytest.mark.parametrize("channels", [4, 9])
def test_inpainting_with_a_controlnet_keeps_the_unmasked_pixels(pipe, tiny_inpaint_model, cn_dir, channels):
    """A 9-channel U-Net's ControlNet sees the latents before the mask channels (a 4-channel ControlNet fits)."""
    p = pipe if channels == 4 else Pipeline.open(inspect_model(tiny_inpaint_model), "cpu", "fp32",
                                                 controlnet_dir=cn_dir)
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (8, 8, 24, 24))
    settings = dict(steps=2, seed=3, init_image=_image(5), mask=mask, mask_blur=0, show_progress=False)
    ours = p(PROMPT, controlnets=(ControlUnit("cn-a", image=_image(0)),), **settings)
    plain = p(PROMPT, **settings)
    kept = np.asarray(mask) == 0
    out = np.asarray(ours.images[0])
    assert np.array_equal(out[kept], np.asarray(_image(5))[kept])
    assert np.abs(out[~kept].astype(int) - np.asarray(plain.images[0])[~kept]).max() > 0  # control did act


def test_hires_fix_gets_the_control_map_at_each_pass_size(pipe):
    result = pipe(PROMPT, steps=2, seed=3, height=SIZE, width=SIZE, show_progress=False, hires_scale=2.0,
                  controlnets=(ControlUnit("cn-a", image=_image(0, 48), preprocess="canny"),))
    assert result.images[0].size == (2 * SIZE, 2 * SIZE)
    assert 'ControlNet 0: "Module: canny' in format_parameters(result.params[0])


# ------------------------------------------------------------------------------------------------------- files

def test_our_original_names_are_what_diffusers_reads(tiny_model):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    cn = _controlnet(unet, 4, widths=(16, 32, 96, 256))  # diffusers' reader knows only the 4-level hint block
    state = cn.state_dict()
    names = keys.controlnet_to_original(list(state), dict(cn.config))
    assert names["controlnet_cond_embedding.conv_out.weight"] == "input_hint_block.14.weight"
    back = keys.controlnet_from_original({keys.CONTROLNET_PREFIX + names[k]: v for k, v in state.items()},
                                         dict(cn.config))
    keys.check_inverse(state, back, "ControlNet")


@pytest.mark.parametrize(("name", "prefix"), [("cn-a", keys.CONTROLNET_PREFIX), ("xl", "")])
def test_single_files_load_as_their_directories(tmp_path, tiny_model, cn_dir, name, prefix):
    """SD with `control_model.` names, SDXL (label_emb) without the prefix, as files in the wild come."""
    from diffusers import ControlNetModel

    directory = ControlNetModel.from_pretrained(cn_dir / name)
    unet_config = TINY_SDXL if name == "xl" else inspect_model(tiny_model).unet_config
    spec = inspect_controlnet(_original_file(directory, tmp_path / f"{name}.safetensors", prefix))
    assert (spec.layout, spec.prefix, spec.sdxl, spec.factor) == ("original", prefix, name == "xl", 2)
    loaded = load_controlnet(spec, unet_config, torch.device("cpu"), torch.float32)
    assert loaded.config.conditioning_embedding_out_channels == (16, 32)
    for key, value in directory.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_a_file_that_is_not_a_controlnet_is_named(tmp_path, tiny_model):
    from safetensors.torch import save_file

    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "foo.safetensors"))
    with pytest.raises(UserError, match=r"is not a ControlNet \(no input_hint_block"):
        inspect_controlnet(tmp_path / "foo.safetensors")
    with pytest.raises(UserError, match="is not a ControlNet directory"):
        inspect_controlnet(tiny_model / "unet")


# ------------------------------------------------------------------------------------------------------ canny

def _pattern() -> np.ndarray:
    y, x = np.mgrid[:48, :40]
    return np.stack([((x * y) // 9) % 40 + (x // 10) * 45, (x * x + 2 * y * y) // 13 % 60 + (y // 12) * 40,
                     ((x // 8 + y // 6) % 2) * 70 + x], -1).astype(np.uint8)


@pytest.mark.parametrize(("low", "high", "edges", "digest"), [
    (100, 200, 551, "a7fcbd56bd2b6faa"), (20, 60, 585, "e95bc3300745a18b"), (200, 100, 551, "a7fcbd56bd2b6faa"),
    (1, 255, 529, "274255f2f73650a6")])
def test_canny_equals_opencv(low, high, edges, digest):
    """The expected maps are OpenCV 5.1's cv2.Canny(image, low, high) of this image (swapped thresholds too)."""
    out = canny(_pattern(), low, high)
    assert out.dtype == np.uint8 and set(np.unique(out)) <= {0, 255}
    assert (int(out.sum() // 255), hashlib.sha256(out.tobytes()).hexdigest()[:16]) == (edges, digest)
    assert not canny(np.full((8, 8, 3), 90, np.uint8), 1, 2).any()


def test_canny_equals_opencv_on_random_images():
    cv2 = pytest.importorskip("cv2")  # not a dependency; where it is installed, compare on many images
    rng = np.random.default_rng(0)
    for trial in range(40):
        h, w = rng.integers(3, 50, 2)
        image = rng.integers(0, 256, (h, w, 3)).astype(np.uint8) // (1 + trial % 4) * (1 + trial % 4)
        assert np.array_equal(canny(image, 50 + trial, 150), cv2.Canny(image, 50 + trial, 150))


def test_resize_modes_crop_stretch_and_fill():
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, 10:30] = 255  # a white centre square
    unit = ControlUnit("x", image=Image.fromarray(wide))
    assert (control_map(unit, 16, 16) == 255).all()  # Crop and Resize keeps the centre
    stretched = control_map(ControlUnit("x", image=Image.fromarray(wide), resize_mode="Just Resize"), 16, 16)
    filled = control_map(ControlUnit("x", image=Image.fromarray(wide), resize_mode="Resize and Fill"), 16, 16)
    assert stretched[:, 0].max() < 40 and stretched[:, 8].min() > 200
    assert filled.shape == (16, 16, 3) and (filled[:4] == 0).all()  # padded above and below with the border's 0


# ------------------------------------------------------------------------------------------- request and metadata

def test_units_write_and_read_back_as_the_a1111_extension_writes_them():
    unit = ControlUnit("cn-a [0123abcd]", weight=0.5, start=0.1, end=0.9, preprocess="canny",
                       control_mode="My prompt is more important").resolved()
    r = GenerationRequest(prompt="x", seed=1, width=32, height=32, model="m", controlnets=(unit,), resolved=True)
    text = format_parameters(r)
    assert text.endswith('ControlNet 0: "Module: canny, Model: cn-a [0123abcd], Weight: 0.5, Resize Mode: Crop and '
                         'Resize, Processor Res: 512, Threshold A: 100, Threshold B: 200, Guidance Start: 0.1, '
                         'Guidance End: 0.9, Pixel Perfect: True, Control Mode: My prompt is more important"')
    back = parse_parameters(text)["controlnets"]
    assert back == (ControlUnit("cn-a", weight=0.5, start=0.1, end=0.9, preprocess="canny", threshold_a=100,
                                threshold_b=200, control_mode="My prompt is more important"),)
    # an older extension's text (with Low Vram) and a module we lack: read, refused where it is used
    old = ('a\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, ControlNet 0: "Module: depth, '
           'Model: control_sd15_depth [fef5e48e], Weight: 1, Resize Mode: Just Resize, Low Vram: False, Processor Res: '
           '384, Threshold A: -1, Threshold B: -1, Guidance Start: 0, Guidance End: 1, Pixel Perfect: False, Control '
           'Mode: Balanced"')
    [depth] = parse_parameters(old)["controlnets"]
    assert (depth.model, depth.preprocess, depth.resize_mode, depth.threshold_a) == ("control_sd15_depth", "depth",
                                                                                     "Just Resize", None)
    with pytest.raises(UserError, match="preprocessor 'depth' is not available here"):
        GenerationRequest(prompt="a", controlnets=(depth,)).check()


@pytest.mark.parametrize(("unit", "message"), [
    (dict(weight=2.5), r"--control-weight must be in \[0, 2\], got 2.5"),
    (dict(start=0.6, end=0.5), "--control-start 0.6 must be below --control-end 0.5"),
    (dict(end=1.5), r"--control-end must be in \[0, 1\]"),
    (dict(preprocess="canny", threshold_a=0), r"--canny-low must be in \[1, 255\], got 0"),
    (dict(control_mode="louder"), "unknown control mode 'louder'"),
    (dict(image=None), "no control image: pass --control-image FILE"),
    (dict(refiner="r"), "a refiner with ControlNet is not supported"),
])
def test_bad_units_are_refused_in_one_line(unit, message):
    refiner = unit.pop("refiner", "")
    request = GenerationRequest(prompt="a", refiner=refiner,
                                controlnets=(ControlUnit("cn-a", **{"image": _image(0), **unit}),))
    with pytest.raises(UserError, match=message) as e:
        request.check()
    assert "\n" not in str(e.value)


def test_a1111_units_as_the_extension_reads_them():
    image, init = _image(0), _image(1)
    units = units_from_a1111([
        {"enabled": True, "image": image, "module": "canny", "model": "cn-a [0123abcd]", "threshold_a": -1,
         "weight": 0.5, "guidance_end": 0.8, "control_mode": 2, "resize_mode": "Just Resize"},
        {"enabled": False, "model": "cn-b"},  # disabled: skipped, as the extension does
        {"enabled": True, "model": "cn-b"},  # img2img: no image of its own, the init image
    ], init_image=init)
    assert [(u.model, u.image is image, u.image is init) for u in units] == [("cn-a", True, False),
                                                                            ("cn-b", False, True)]
    assert (units[0].resolved().thresholds(), units[0].control_mode, units[0].end) == (
        (100, 200), "ControlNet is more important", 0.8)
    with pytest.raises(UserError, match="ControlNet unit 0 has no image"):
        units_from_a1111([{"enabled": True, "model": "cn-a"}])


# ------------------------------------------------------------------------------------------- CLI and replay

@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("control-images")
    _image(0).save(d / "control.png")
    _image(1).save(d / "other.png")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return {p.stem: p for p in d.iterdir()}


FAST = ["--dtype", "fp32", "--steps", "3", "--height", str(SIZE), "--width", str(SIZE), "--seed", "7", "-q"]


def test_cli_writes_the_units_and_a_replay_needs_the_control_image(tiny_model, cn_dir, files, tmp_path, capsys):
    out = tmp_path / "out"
    code, [png], err = generate(["a house", "--model", str(tiny_model), "--controlnet", str(cn_dir / "cn-a"),
                                 "--control-image", str(files["control"]), "--control-preprocess", "canny",
                                 "--canny-low", "50", "--control-weight", "0.9", "--outdir", str(out), *FAST,
                                 "--steps", "2"], capsys)
    assert code == 0, err
    text = Image.open(png).info["parameters"]
    title = inspect_controlnet(cn_dir / "cn-a").title
    assert f'ControlNet 0: "Module: canny, Model: {title}, Weight: 0.9, Resize Mode: Crop and Resize, Processor ' \
           'Res: 512, Threshold A: 50, Threshold B: 200, Guidance Start: 0.0, Guidance End: 1.0' in text
    code, lines, err = generate(["--from-png", png, "--model", str(tiny_model), "--outdir", str(out), "-q"], capsys)
    assert code == 2 and lines == [] and "the control image is not in the PNG: pass --control-image" in err
    code, lines, err = generate(["--from-png", png, "--model", str(tiny_model), "--control-image",
                                 str(files["control"]), "--outdir", str(out), "-q"], capsys)
    assert code == 2 and "pass its path, or --controlnet-dir DIR" in err  # 'cn-a' is found by name in a directory
    code, [again], err = generate(["--from-png", png, "--model", str(tiny_model), "--control-image",
                                   str(files["control"]), "--controlnet-dir", str(cn_dir), "--outdir", str(out), "-q",
                                   "--dtype", "fp32"], capsys)  # as FAST: a PNG does not record the dtype
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(png)))
    assert Image.open(again).info["parameters"] == text


@pytest.mark.parametrize(("extra", "message"), [
    (["--controlnet", "xl", "--control-image", "{control}"], "is a ControlNet for SDXL"),
    (["--controlnet", "cn-a", "--control-image", "{broken}"], "control image '"),
    (["--control-weight", "0.5"], "--control-weight only applies with --controlnet MODEL"),
    (["--controlnet", "cn-a", "--control-image", "{control}", "--control-weight", "3"], "--control-weight must be in"),
    (["--controlnet", "cn-a", "--control-image", "{control}", "--control-start", "0.8", "--control-end", "0.2"],
     "--control-start 0.8 must be below --control-end 0.2"),
    (["--controlnet", "cn-a", "--controlnet", "cn-b", "--control-image", "{control}"],
     "--control-image was given 1 time(s) for 2 ControlNet(s)"),
    (["--controlnet", "{model}/unet/diffusion_pytorch_model.safetensors", "--control-image", "{control}"],
     "is not a ControlNet"),
    (["--controlnet", "nothing-here", "--control-image", "{control}"], "'nothing-here' is not in --controlnet-dir"),
])
def test_bad_cli_inputs_are_one_line_and_write_nothing(tiny_model, cn_dir, files, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    extra = [e.format(model=tiny_model, **files) for e in extra]
    code, lines, err = generate(["a house", "--model", str(tiny_model), "--controlnet-dir", str(cn_dir), *extra,
                                 "--outdir", str(out), *FAST], capsys)
    assert (code, lines) == (2, [])
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() or not any(out.iterdir())


def test_prompt_lists_apply_the_units_to_every_line_and_a_line_may_bring_its_image(pipe, tiny_model, cn_dir, files,
                                                                                   tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f'a house\n{{"prompt": "a tree", "control_image": "{files["other"]}"}}\n')
    code, written, err = generate(["--prompts-file", str(prompts), "--model", str(tiny_model), "--controlnet",
                                   "cn-a", "--controlnet-dir", str(cn_dir), "--control-image", str(files["control"]),
                                   "--outdir", str(tmp_path / "out"), *FAST, "--steps", "2"], capsys)
    assert code == 0, err
    house, tree = sorted(written)
    assert 'ControlNet 0: "Module: none, Model: cn-a [' in Image.open(house).info["parameters"]
    direct = pipe("a tree", steps=2, seed=7, height=SIZE, width=SIZE, show_progress=False,
                  controlnets=(ControlUnit("cn-a", image=Image.open(files["other"]).convert("RGB")),))
    assert np.array_equal(np.asarray(Image.open(tree)), np.asarray(direct.images[0]))


# ----------------------------------------------------------------------------------------------------- the server

def _b64(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def test_server_takes_the_extensions_units_by_name_only(pipe, tiny_model, cn_dir):
    from test_serve_worker import app_server_for, request

    from ldm.serve.api import Limits
    from ldm.serve.app import create_app
    from ldm.serve.worker import Worker

    spec = inspect_model(tiny_model)
    worker = Worker(lambda name: pipe, "tiny", queue_size=2)
    worker.start()
    unit = {"enabled": True, "image": _b64(_image(0)), "module": "canny", "model": "cn-a", "weight": 0.9}
    body = {"prompt": PROMPT, "steps": 2, "width": SIZE, "height": SIZE, "seed": 5,
            "alwayson_scripts": {"controlnet": {"args": [unit]}}}
    try:
        with app_server_for(create_app({"tiny": spec}, worker, Limits(), controlnet_dir=str(cn_dir))) as port:
            status, listed = request(port, "GET", "/controlnet/model_list")
            assert status == 200 and inspect_controlnet(cn_dir / "cn-a").title in listed["model_list"]
            status, modules = request(port, "GET", "/controlnet/module_list")
            assert modules["module_list"] == ["none", "canny"]
            status, answer = request(port, "POST", "/sdapi/v1/txt2img", body)
            assert status == 200, answer
            assert 'ControlNet 0: "Module: canny, Model: cn-a [' in json.loads(answer["info"])["infotexts"][0]
            for model, message in (("../cn-a", "is not one of this server's ControlNets (cn-a, cn-a-file, cn-b, "
                                                "xl; GET /controlnet/model_list)"), ("xl", "is a ControlNet for SDXL")):
                bad = {**body, "alwayson_scripts": {"controlnet": {"args": [{**unit, "model": model}]}}}
                status, answer = request(port, "POST", "/sdapi/v1/txt2img", bad)
                assert status == 422 and message in answer["detail"] and "\n" not in answer["detail"]
    finally:
        worker.stop()
