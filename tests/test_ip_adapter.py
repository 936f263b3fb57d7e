"""IP-Adapter image prompts: equal to diffusers' `load_ip_adapter` + `ip_adapter_image` on the same tiny random
weights (SD and SDXL, plain and Plus, stacked), with a merged LoRA, through the CLI, prompt lists and PNG replay, and
every bad input as one line with exit code 2.

Tolerance: none (max abs diff 0). The adapters run inside diffusers' own U-Net code (its attention processors and
image projections, loaded by its own `_load_ip_adapter_weights`), the image goes through the same
`CLIPImageProcessor` and encoder calls, and the embeds are batched [uncond, cond] as its pipelines batch them: the
same operations in the same order, as for plain SD/SDXL txt2img (tests/test_sdxl_pipeline.py). The exception is the
LoRA test, whose tolerance is derived there.
"""

from __future__ import annotations

import base64
import io
import json
import re
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import run
from ldm.errors import UserError
from ldm.generate import main
from ldm.ip_adapter.format import FULL, PLAIN, PLUS, find_adapter_file, inspect_adapter, read_adapter
from ldm.ip_adapter.tiny import save_tiny_image_encoder, save_tiny_ip_adapter
from ldm.ip_adapter.unit import IPAdapterUnit
from ldm.models.ip_adapter import inspect_ip_adapters
from ldm.models.spec import inspect_model
from ldm.pipeline.metadata import format_parameters, parse_parameters, unread_fields
from ldm.pipeline.pipeline import Pipeline
from ldm.pipeline.request import GenerationRequest
from ldm.pipeline.samplers import make_scheduler
from ldm.text.conditioning import Conditioning

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT, NEGATIVE = "a red car", "blurry"
KW = dict(steps=2, cfg=7.5, sampler="euler_a", seed=3, height=32, width=32, show_progress=False)
generate = partial(run, main)  # (argv, capsys) -> (exit code, stdout lines, stderr)


def _image(seed: int, size=(48, 40)) -> Image.Image:  # not square: the processor's resize and crop both act
    return Image.fromarray((np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8))


def _unet(model: Path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(model / "unet")


@pytest.fixture(scope="module")
def files(tiny_model, tiny_sdxl_model, tmp_path_factory) -> dict[str, Path]:
    """h94/IP-Adapter's layout: models/ (SD) and sdxl_models/ (SDXL), each with its adapters and image_encoder/."""
    root = tmp_path_factory.mktemp("ip")
    sd, sdxl = _unet(tiny_model), _unet(tiny_sdxl_model)
    out = {"root": root,
           "sd_plain": save_tiny_ip_adapter(root / "models", sd, PLAIN, seed=1, name="ip-adapter_sd15.safetensors"),
           "sd_plus": save_tiny_ip_adapter(root / "models", sd, PLUS, seed=2, encoder=False,
                                           name="ip-adapter-plus_sd15.safetensors"),
           "sdxl_plus": save_tiny_ip_adapter(root / "sdxl_models", sdxl, PLUS, seed=3, tokens=6,
                                             name="ip-adapter-plus_sdxl.safetensors"),
           "sd_full": save_tiny_ip_adapter(root / "full", sd, FULL, seed=4, encoder=False)}
    out["narrow_encoder"] = save_tiny_image_encoder(root / "narrow", projection_dim=16)
    return out


@pytest.fixture(scope="module")
def sd_pipe(tiny_model, files):
    spec = inspect_model(tiny_model)
    return Pipeline.open(spec, "cpu", "fp32", ip_adapters=inspect_ip_adapters(
        [str(files["sd_plain"]), str(files["sd_plus"])], spec))


def _units(files, *scales: float, keys=("sd_plain", "sd_plus")) -> tuple[IPAdapterUnit, ...]:
    return tuple(IPAdapterUnit(str(files[k]), _image(i), s) for i, (k, s) in enumerate(zip(keys, scales)))


def _reference(cls_name: str, model: Path, files, keys, scales, sampler: str, scheduler_config):
    import diffusers

    ref = getattr(diffusers, cls_name).from_pretrained(model)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = make_scheduler(sampler, scheduler_config)
    ref.without_adapters = ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=KW["steps"], guidance_scale=7.5,
                               height=32, width=32, generator=[torch.Generator().manual_seed(KW["seed"])],
                               output_type="np").images
    ref.load_ip_adapter(str(files["root"]), subfolder=files[keys[0]].parent.name,
                        weight_name=[files[k].name for k in keys], image_encoder_folder="image_encoder")
    ref.set_ip_adapter_scale(list(scales))
    return ref


@pytest.fixture(scope="module")
def sd_ref(tiny_model, files, sd_pipe):
    """diffusers' SD pipeline with both adapters at scales 0.6 and 0.4 (`without_adapters`: its image before)."""
    return _reference("StableDiffusionPipeline", tiny_model, files, ("sd_plain", "sd_plus"), (0.6, 0.4), "euler_a",
                      sd_pipe.scheduler_config)


def _ref_images(ref, images, cfg=7.5, n=1, seed=3, steps=2, size=32) -> np.ndarray:
    return ref(PROMPT, negative_prompt=NEGATIVE, ip_adapter_image=images, num_inference_steps=steps,
               guidance_scale=cfg, height=size, width=size, num_images_per_prompt=n,
               generator=[torch.Generator().manual_seed(seed + i) for i in range(n)], output_type="np").images


# --------------------------------------------------------------------------------------------- parity with diffusers

def test_sd_plain_and_plus_stacked_equal_diffusers(sd_pipe, sd_ref, files):
    """Two adapters at once (plain: image_embeds; Plus: penultimate hidden states, a zero image's for uncond), each
    with its own image and scale, with guidance and without (cfg 1: one branch, no unconditional embeds)."""
    units = _units(files, 0.6, 0.4)
    ours = sd_pipe(PROMPT, NEGATIVE, ip_adapters=units, num_images=2, batch_size=2, **KW)
    ref = sd_ref
    theirs = _ref_images(ref, [u.image for u in units], n=2)
    assert np.abs(ours.decoded - theirs).max() == 0
    one_branch = sd_pipe(PROMPT, NEGATIVE, ip_adapters=units, **{**KW, "cfg": 1.0})
    assert np.abs(one_branch.decoded - _ref_images(ref, [u.image for u in units], cfg=1.0)).max() == 0
    # the test can fail: other scales are another image
    other = sd_pipe(PROMPT, NEGATIVE, ip_adapters=_units(files, 0.6, 0.0), num_images=2, batch_size=2, **KW)
    assert np.abs(other.decoded - theirs).max() > 1e-3


@pytest.mark.slow
def test_sdxl_plus_equals_diffusers(tiny_sdxl_model, files):
    spec = inspect_model(tiny_sdxl_model)
    pipe = Pipeline.open(spec, "cpu", "fp32", ip_adapters=inspect_ip_adapters([str(files["sdxl_plus"])], spec))
    units = _units(files, 0.7, keys=("sdxl_plus",))
    ours = pipe(PROMPT, NEGATIVE, ip_adapters=units, **KW)
    ref = _reference("StableDiffusionXLPipeline", tiny_sdxl_model, files, ("sdxl_plus",), (0.7,), "euler_a",
                     pipe.scheduler_config)
    assert np.abs(ours.decoded - _ref_images(ref, [units[0].image])).max() == 0
    assert np.abs(ours.decoded - pipe(PROMPT, NEGATIVE, ip_adapters=_units(files, 0.0, keys=("sdxl_plus",)),
                                      **KW).decoded).max() > 1e-3


def test_scale_0_is_the_model_without_adapters(sd_pipe, sd_ref, files):
    """The image branch is added times its scale: at 0 the decoupled processors give the plain model's pixels."""
    ours = sd_pipe(PROMPT, NEGATIVE, ip_adapters=_units(files, 0.0, 0.0), **KW)
    assert np.abs(ours.decoded - sd_ref.without_adapters).max() == 0


def test_a_merged_lora_composes_with_the_adapters(sd_pipe, sd_ref, files, tmp_path):
    """A kohya LoRA on the cross-attention's to_q (which the image branch shares), to_k and to_out, merged into the
    weights, with both adapters = diffusers' peft LoRA layers with them. Tolerance, derived as in
    tests/test_lora_load.py: 4 x diffusers' own fused-vs-unfused difference (float rounding)."""
    from ldm.lora.targets import original_unet_names

    # the image projection is outside the module tree, so the original-layout names kohya SDXL files use still map
    names = original_unet_names(sd_pipe.unet)
    assert names and not any("encoder_hid_proj" in name for name, _ in names.values())
    g = torch.Generator().manual_seed(9)
    lora = {}
    for path in (p for p in sd_pipe.unet.attn_processors if p.endswith("attn2.processor")):
        attention = sd_pipe.unet.get_submodule(path.removesuffix(".processor"))
        for name in ("to_q", "to_k", "to_out.0"):
            module = attention.get_submodule(name)
            key = "lora_unet_" + f"{path.removesuffix('.processor')}.{name}".replace(".", "_")
            lora[f"{key}.lora_down.weight"] = torch.randn(4, module.in_features, generator=g)
            lora[f"{key}.lora_up.weight"] = torch.randn(module.out_features, 4, generator=g) * 0.3
            lora[f"{key}.alpha"] = torch.tensor(2.0)
    save_file(lora, tmp_path / "ink.safetensors")
    units = _units(files, 0.6, 0.4)
    try:
        sd_pipe.load_lora(tmp_path / "ink.safetensors", 0.8)
        ours = sd_pipe(PROMPT, NEGATIVE, ip_adapters=units, **KW)
    finally:
        sd_pipe.unload_loras()
    ref = sd_ref
    without = _ref_images(ref, [u.image for u in units])
    ref.load_lora_weights(str(tmp_path / "ink.safetensors"), adapter_name="ink")
    try:
        ref.set_adapters(["ink"], adapter_weights=[0.8])
        unfused = _ref_images(ref, [u.image for u in units])
        ref.fuse_lora(adapter_names=["ink"])
        fused = _ref_images(ref, [u.image for u in units])
    finally:
        ref.unfuse_lora()
        ref.unload_lora_weights()
    tolerance = 4 * max(float(np.abs(fused - unfused).max()), 1e-6)
    assert np.abs(ours.decoded - unfused).max() <= tolerance
    assert np.abs(without - unfused).max() > 100 * tolerance  # the LoRA does change the image


# ------------------------------------------------------------------------------------------ the request and the PNG

def test_request_and_conditioning_carry_the_units(sd_pipe, files, caplog):
    units = _units(files, 0.6, 0.4)
    with pytest.raises(UserError, match="has no image prompt: pass --ip-image FILE"):
        GenerationRequest(prompt=PROMPT, ip_adapters=(IPAdapterUnit("a.safetensors"),)).check()
    with pytest.raises(UserError, match="--ip-scale must be a finite number"):
        GenerationRequest(prompt=PROMPT, ip_adapters=(IPAdapterUnit("a", _image(0), float("nan")),)).check()
    with pytest.raises(UserError, match="was opened with the IP-Adapter.*needs an image prompt for each"):
        sd_pipe(PROMPT, **KW)
    with pytest.raises(UserError, match="but the model was opened with"):
        sd_pipe(PROMPT, ip_adapters=units[:1], **KW)
    # embeds: (1, 1, E) plain and (1, 1, 1 + patches, H) Plus; uncond zeros / a zero image's; batched by cat/expand
    cond, uncond = sd_pipe._encode(PROMPT, GenerationRequest(prompt=PROMPT))
    cond, uncond = sd_pipe.ip_adapters.condition(cond, uncond, units)
    assert [tuple(e.shape) for e in cond.image_embeds] == [(1, 1, 24), (1, 1, 17, 32)]
    assert not uncond.image_embeds[0].any() and uncond.image_embeds[1].abs().sum() > 0
    both = Conditioning.cat([uncond.expand(2), cond.expand(2)])
    assert [tuple(e.shape[:2]) for e in both.image_embeds] == [(4, 1), (4, 1)]
    assert torch.equal(both.unet_kwargs()["added_cond_kwargs"]["image_embeds"][1][3], cond.image_embeds[1][0])
    # a PNG's hash that is not the file's is a warning naming both
    stale = (IPAdapterUnit(units[0].model, units[0].image, 0.6, hash="0123456789"), units[1])
    sd_pipe.ip_adapters.condition(cond, None, stale)
    assert "is not the file the image was made with (hash 0123456789, now" in caplog.text


def test_png_fields_round_trip(sd_pipe, files):
    result = sd_pipe(PROMPT, NEGATIVE, ip_adapters=_units(files, 0.6, 1.0), **KW)
    params = result.params[0]
    hashes = [a.hash for a in sd_pipe.ip_adapters.adapters]
    assert all(len(h) == 10 for h in hashes) and params.ip_adapters[0].image is None
    text = format_parameters(params)
    assert (f"IP-Adapter: {files['sd_plain']} [{hashes[0]}], IP-Adapter scale: 0.6, "
            f"IP-Adapter 2: {files['sd_plus']} [{hashes[1]}], IP-Adapter scale 2: 1") in text
    back = parse_parameters(text)["ip_adapters"]
    assert back == params.ip_adapters and back[0].hash == hashes[0] and unread_fields(text) == []


# ---------------------------------------------------------------------------------------------------- bad inputs

def _lora_like(path: Path) -> Path:
    save_file({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.ones(2, 2)}, path)
    return path


def _face_id(path: Path) -> Path:
    save_file({"image_proj.proj.0.weight": torch.ones(8, 4), "image_proj.proj.2.weight": torch.ones(16, 8),
               "image_proj.norm.weight": torch.ones(4), "ip_adapter.1.to_k_ip.weight": torch.ones(4, 4),
               "ip_adapter.1.to_v_ip.weight": torch.ones(4, 4)}, path)
    return path


BAD = {
    # name: (argv after the prompt, {placeholders} from `files`; the message)
    "options without an adapter": (["--ip-image", "{image}", "--ip-scale", "0.5"],
                                   "--ip-image, --ip-scale only apply with --ip-adapter MODEL"),
    "adapter without an image": (["--ip-adapter", "{sd_plain}"], "--ip-adapter needs --ip-image FILE"),
    "unreadable image": (["--ip-adapter", "{sd_plain}", "--ip-image", "{root}/models/image_encoder/config.json"],
                         "--ip-image '"),
    "missing image": (["--ip-adapter", "{sd_plain}", "--ip-image", "{root}/nope.png"], "nope.png"),
    "other family": (["--model", "{sdxl}", "--ip-adapter", "{sd_plain}", "--ip-image", "{image}"],
                     "is for models with a 32-dim text context but '{sdxl}' is an SDXL base model (64-dim text "
                     "context): use an IP-Adapter made for this model's family"),
    "encoder that does not fit": (["--ip-adapter", "{sd_plain}", "--ip-image", "{image}", "--ip-image-encoder",
                                   "{narrow_encoder}"], "gives 16-dim image embeddings but IP-Adapter '{sd_plain}' "
                                  "(plain) takes 24-dim image embeddings: pass --ip-image-encoder DIR"),
    "no encoder found": (["--ip-adapter", "{sd_full}", "--ip-image", "{image}"], "no image encoder for IP-Adapter"),
    "not an ip-adapter": (["--ip-adapter", "{lora}", "--ip-image", "{image}"], "is not an IP-Adapter: it has no "
                          "image_proj.* and ip_adapter.N.to_k_ip weights (its first tensor is 'lora_unet_mid"),
    "pickle with code": (["--ip-adapter", "{pickle}", "--ip-image", "{image}"], "needs test_ip_adapter._Global to "
                         "load, which a weights-only load refuses"),
    "faceid": (["--ip-adapter", "{faceid}", "--ip-image", "{image}"], "is a FaceID adapter"),
    "missing adapter": (["--ip-adapter", "{root}/nope.safetensors", "--ip-image", "{image}"], "does not exist"),
    "too many images": (["--ip-adapter", "{sd_plain}", "--ip-image", "{image}", "--ip-image", "{image}",
                         "--ip-image", "{image}"], "--ip-image was given 3 times for 1 IP-Adapter(s)"),
}


class _Global:  # a pickle that needs a class to load
    pass


@pytest.fixture(scope="module")
def bad_inputs(files, tiny_sdxl_model, tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("bad")
    _image(0).save(d / "cat.png")
    torch.save({**read_adapter(files["sd_plain"]), "extra": _Global()}, d / "old.bin")
    return {**{k: str(v) for k, v in files.items()}, "image": str(d / "cat.png"), "sdxl": str(tiny_sdxl_model),
            "lora": str(_lora_like(d / "lora.safetensors")), "pickle": str(d / "old.bin"),
            "faceid": str(_face_id(d / "faceid.safetensors"))}


@pytest.mark.parametrize("case", BAD)
def test_bad_ip_adapter_input_is_one_line_exit_2_and_no_file(case, tiny_model, bad_inputs, tmp_path, capsys):
    extra, expected = BAD[case]
    extra = [a.format(**bad_inputs) for a in extra]
    model = [] if "--model" in extra else ["--model", str(tiny_model)]
    outdir = tmp_path / "out"
    code, lines, err = generate([PROMPT, *model, "--outdir", str(outdir), "--steps", "1", "-q", *extra], capsys)
    assert code == 2 and lines == []
    assert err.count("\n") == 1 and err.startswith("error: ") and expected.format(**bad_inputs) in err, err
    assert not outdir.exists() or not any(outdir.iterdir())


def test_a_bin_file_reads_as_its_safetensors_twin(files, tmp_path):
    """h94's .bin layout (a dict of the two groups, read weights-only) = the .safetensors file's tensors and facts;
    a directory holding only the .bin finds it."""
    groups = read_adapter(files["sd_plus"])
    (tmp_path / "bin").mkdir()
    torch.save(groups, tmp_path / "bin" / "ip-adapter-plus_sd15.bin")
    found = find_adapter_file(tmp_path / "bin")
    assert found.name == "ip-adapter-plus_sd15.bin"
    back = read_adapter(found)
    assert back.keys() == groups.keys() and all(
        back[g].keys() == groups[g].keys() and all(torch.equal(back[g][k], v) for k, v in groups[g].items())
        for g in groups)
    facts, twin = inspect_adapter(found), inspect_adapter(files["sd_plus"])
    assert (facts.variant, facts.cross_attention_dim, facts.image_embed_dim, facts.layers) == (
        twin.variant, twin.cross_attention_dim, twin.image_embed_dim, twin.layers) == (PLUS, 32, 32, twin.layers)


def test_an_adapter_for_another_u_net_of_the_same_width_is_named(sd_pipe, files, tmp_path):
    """Same text width, other layers: found against the opened U-Net before diffusers would fail on a key."""
    from safetensors.torch import load_file

    from ldm.ip_adapter.adapters import check_fits

    tensors = load_file(files["sd_plain"])
    del tensors["ip_adapter.1.to_k_ip.weight"], tensors["ip_adapter.1.to_v_ip.weight"]
    save_file(tensors, tmp_path / "short.safetensors")
    with pytest.raises(UserError, match="has weights for 5 cross-attention layers, the U-Net has 6"):
        check_fits(sd_pipe.unet, inspect_adapter(tmp_path / "short.safetensors"), "short")
    assert inspect_adapter(files["sd_full"]).variant == FULL


# ------------------------------------------------------------------------------------- CLI, replay and prompt lists

@pytest.mark.slow
def test_cli_writes_the_fields_and_a_replay_needs_the_image_again(tiny_model, files, bad_inputs, tmp_path, capsys):
    fast = ["--steps", "2", "--height", "32", "--width", "32", "--seed", "5", "-q"]
    argv = [PROMPT, "--model", str(tiny_model), "--ip-adapter", str(files["sd_plain"]), "--ip-image",
            bad_inputs["image"], "--ip-scale", "0.5", "--outdir", str(tmp_path / "a"), *fast]
    code, lines, err = generate(argv, capsys)
    assert code == 0, err
    text = Image.open(lines[0]).info["parameters"]
    assert f"IP-Adapter: {files['sd_plain']} [" in text and "IP-Adapter scale: 0.5" in text
    code, replay, err = generate(["--from-png", lines[0], "--outdir", str(tmp_path / "b"), "-q"], capsys)
    assert code == 2 and replay == [] and err.count("\n") == 1
    assert f"was made with the IP-Adapter(s) '{files['sd_plain']}': pass --ip-image FILE to replay it" in err
    code, replay, err = generate(["--from-png", lines[0], "--ip-image", bad_inputs["image"], "--outdir",
                                  str(tmp_path / "c"), "-q"], capsys)
    assert code == 0, err
    np.testing.assert_array_equal(np.asarray(Image.open(replay[0])), np.asarray(Image.open(lines[0])))
    assert Image.open(replay[0]).info["parameters"] == text
    # prompt lists: the typed adapter, image and scale apply to every line
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n{{\"prompt\": \"a blue door\", \"seed\": 5}}\n")
    code, written, err = generate(["--prompts-file", str(prompts), "--model", str(tiny_model), "--ip-adapter",
                                   str(files["sd_plain"]), "--ip-image", bad_inputs["image"], "--ip-scale", "0.5",
                                   "--outdir", str(tmp_path / "d"), "--steps", "2", "--height", "32", "--width", "32",
                                   "-q"], capsys)
    assert code == 0 and len(written) == 2, err
    assert all("IP-Adapter scale: 0.5" in Image.open(p).info["parameters"] for p in written)



# ------------------------------------------------------------------------------ the server (A1111 ControlNet form)

def _b64(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def test_a1111_ip_adapter_units_are_split_from_the_controlnet_ones():
    from ldm.controlnet.unit import units_from_a1111 as control_units
    from ldm.ip_adapter.unit import units_from_a1111

    init = _image(9)
    args = [{"enabled": True, "module": "canny", "model": "cn-a [d14c016b]", "image": _image(0)},
            {"enabled": True, "module": "ip-adapter_clip_sd15", "model": "ip-adapter_sd15 [6a3f6166]",
             "weight": 0.6, "image": _image(1), "guidance_start": 0.0, "guidance_end": 1.0},
            {"enabled": False, "module": "ip-adapter_clip_h", "model": "x"},
            {"enabled": True, "module": "ip-adapter-auto", "model": "plus"}]  # no image: img2img's init image
    units = units_from_a1111(args, init)
    assert [(u.model, u.scale) for u in units] == [("ip-adapter_sd15", 0.6), ("plus", 1.0)]
    assert units[1].image is init and [u.model for u in control_units(args, init)] == ["cn-a"]
    for change, message in (
            ({"guidance_end": 0.5}, "ControlNet unit 0 (IP-Adapter): guidance_end 0.5 is not supported: an "
                                    "IP-Adapter acts on every step here"),
            ({"guidance_start": 0.2}, "guidance_start 0.2 is not supported"),
            ({"module": "ip-adapter_face_id_plus"}, "module 'ip-adapter_face_id_plus' is not supported here "
                                                    "(FaceID and PuLID take insightface face embeddings)"),
            ({"model": "None"}, "is enabled but names no model"),
            ({"weight": "high"}, "weight must be a number"),
            ({"image": None}, "has no image: send the image prompt as 'image'")):
        with pytest.raises(UserError, match=re.escape(message)):
            units_from_a1111([{**args[1], **change}])


def test_server_takes_the_extensions_ip_adapter_units_and_switches_them_per_request(tiny_model, tiny_sdxl_model,
                                                                                     files, sd_pipe, sd_ref):
    """The server runs on `sd_pipe` (opened with the two adapters by path): a request naming them by name (from
    --ip-adapter-dir) switches to those and gives sd_pipe's image with the same scales and images (which equals
    diffusers', above), exactly; the next request, without units, takes them off and gives diffusers' image of the
    model without adapters (`without_adapters`, which `Pipeline` gives too: test_scale_0_...), exactly."""
    from test_serve_worker import app_server_for, request

    from ldm.files import a1111_model_hash
    from ldm.pixels import float_to_uint8
    from ldm.serve.api import IPAdapterDirs, Limits
    from ldm.serve.app import create_app
    from ldm.serve.worker import Worker

    spec, xl = inspect_model(tiny_model), inspect_model(tiny_sdxl_model)
    with_adapters = sd_pipe(PROMPT, NEGATIVE, ip_adapters=_units(files, 0.6, 0.4), **KW).images[0]
    units = [{"enabled": True, "module": "ip-adapter_clip_sd15", "model": "ip-adapter_sd15 [0123abcd]", "weight": 0.6,
              "image": _b64(_image(0))},
             {"enabled": False, "module": "canny", "model": "not-a-controlnet"},
             {"enabled": True, "module": "ip-adapter-auto", "model": "ip-adapter-plus_sd15", "weight": 0.4,
              "image": _b64(_image(1))}]
    body = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "steps": 2, "cfg_scale": 7.5, "sampler_name": "Euler a",
            "seed": 3, "width": 32, "height": 32, "alwayson_scripts": {"controlnet": {"args": units}}}
    opened = sd_pipe.ip_adapters.specs
    worker = Worker(lambda name: sd_pipe, "tiny", queue_size=2)
    worker.start()
    try:
        app = create_app({"tiny": spec, "xl": xl}, worker, Limits(), ip=IPAdapterDirs(str(files["root"])))
        with app_server_for(app) as port:
            status, listed = request(port, "GET", "/controlnet/model_list")
            assert status == 200 and listed["model_list"] == [
                f"{p.stem} [{a1111_model_hash(p)}]" for p in (files["sd_full"], files["sd_plus"], files["sd_plain"],
                                                             files["sdxl_plus"])]  # not narrow/'s CLIP weights
            status, modules = request(port, "GET", "/controlnet/module_list")
            assert {"ip-adapter_clip_sd15", "ip-adapter-auto"} <= set(modules["module_list"])

            status, answer = request(port, "POST", "/sdapi/v1/txt2img", body)
            assert status == 200, answer
            served = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))))
            np.testing.assert_array_equal(served, np.asarray(with_adapters))
            info = json.loads(answer["info"])["infotexts"][0]
            assert "IP-Adapter: ip-adapter_sd15 [" in info and "IP-Adapter 2: ip-adapter-plus_sd15 [" in info

            status, answer = request(port, "POST", "/sdapi/v1/txt2img", {**body, "alwayson_scripts": {}})
            assert status == 200, answer
            served_plain = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))))
            np.testing.assert_array_equal(served_plain, float_to_uint8(sd_ref.without_adapters)[0])
            assert np.abs(served.astype(int) - served_plain).max() > 0  # the test can fail
            assert sd_pipe.ip_adapters.names == [] and sd_pipe.unet.encoder_hid_proj is None

            for change, message in (
                    ({"args": [{**units[0], "model": "nope"}]},
                     "IP-Adapter 'nope' is not one of this server's IP-Adapters (ip-adapter, ip-adapter-plus_sd15, "
                     "ip-adapter_sd15, ip-adapter-plus_sdxl; GET /controlnet/model_list)"),
                    ({"args": [{**units[0], "model": str(files["sd_plain"])}]}, "is not one of this server's"),
                    ({"args": [{**units[0], "guidance_end": 0.8}]}, "guidance_end 0.8 is not supported")):
                status, answer = request(port, "POST", "/sdapi/v1/txt2img",
                                         {**body, "alwayson_scripts": {"controlnet": change}})
                assert status == 422 and message in answer["detail"] and "\n" not in answer["detail"], answer
            status, answer = request(port, "POST", "/sdapi/v1/txt2img",  # refused before the SDXL model is loaded
                                     {**body, "override_settings": {"sd_model_checkpoint": "xl"}})
            assert status == 422 and "\n" not in answer["detail"], answer
            assert answer["detail"].startswith("IP-Adapter 'ip-adapter_sd15' is for models with a 32-dim text "
                                               "context but "), answer
            assert "is an SDXL base model (64-dim text context): use an IP-Adapter made for" in answer["detail"]
    finally:
        worker.stop()
        sd_pipe.use_ip_adapters(opened)  # as the other tests have it
    kept = sd_pipe.ip_adapters  # the same adapters again are kept, not loaded again
    sd_pipe.use_ip_adapters(inspect_ip_adapters([str(files["sd_plain"]), str(files["sd_plus"])], inspect_model(
        tiny_model)))
    assert sd_pipe.ip_adapters is kept and kept.names == [str(files["sd_plain"]), str(files["sd_plus"])]
