"""LoRA loading at inference: both file layouts against diffusers' `load_lora_weights`, stacking, prompt tags,
hashes, PNG replay, and every bad LoRA input as one line with exit code 2."""

from __future__ import annotations

import hashlib
import json
import logging
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
from ldm.lora.apply import LoraStack
from ldm.lora.load import KOHYA, read_lora
from ldm.lora.prompt_tags import format_lora_hashes, lora_hash, parse_lora_hashes, parse_lora_option, split_tags
from ldm.pipeline.pipeline import Pipeline
from ldm.pipeline.samplers import make_scheduler

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT, NEGATIVE = "a red car", "blurry"
RANK, UNET_ALPHA, TEXT_ALPHA = 4, 2.0, 8.0  # scales alpha / rank = 0.5 and 2: a wrong alpha rule shows
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]  # 1x1 proj_in and the resnets' 3x3 conv1
TEXT_TARGETS = ["q_proj", "v_proj", "fc1"]
KW = dict(steps=3, cfg=7.5, sampler="ddim", seed=3, height=32, width=32, show_progress=False)


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model  # tests/conftest.py: written once per session, read-only


def _lora_weights(pipe: Pipeline, seeds: list[int]):
    """peft LoRA layers injected into copies of the tiny U-Net and CLIP text model, with random non-zero lora_A and
    lora_B, once per seed: [({part: peft state dict}, {part: LoraConfig})]."""
    import copy

    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    configs = {"unet": LoraConfig(r=RANK, lora_alpha=UNET_ALPHA, target_modules=UNET_TARGETS),
               "text_encoder": LoraConfig(r=RANK, lora_alpha=TEXT_ALPHA, target_modules=TEXT_TARGETS)}
    models = {"unet": inject_adapter_in_model(configs["unet"], copy.deepcopy(pipe.unet)),
              "text_encoder": inject_adapter_in_model(configs["text_encoder"], copy.deepcopy(pipe.text_encoder.model))}
    out = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        for model in models.values():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.data = torch.randn(p.shape, generator=g) * (0.3 if "lora_B" in name else 1.0)
        out.append(({part: get_peft_model_state_dict(m) for part, m in models.items()}, configs))
    return out


def _save_diffusers(directory: Path, parts, configs) -> Path:
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(
        directory, unet_lora_layers=parts["unet"], text_encoder_lora_layers=parts.get("text_encoder"),
        unet_lora_adapter_metadata=configs["unet"].to_dict(),
        text_encoder_lora_adapter_metadata=configs["text_encoder"].to_dict() if "text_encoder" in configs else None,
    )
    return directory / "pytorch_lora_weights.safetensors"


def _kohya_dict(parts) -> dict[str, torch.Tensor]:
    """kohya's layout, built by hand: lora_unet_<module, dots as _>, lora_te_text_model_<module> as SD 1 LoRAs have."""
    out = {}
    for part, sd in parts.items():
        prefix, alpha = ("lora_unet_", UNET_ALPHA) if part == "unet" else ("lora_te_text_model_", TEXT_ALPHA)
        for key, value in sd.items():
            module, kind = key.rsplit(".lora_", 1)
            name = prefix + module.replace(".", "_")
            out[f"{name}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = value.contiguous()
            out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


@pytest.fixture(scope="module")
def loras(pipe, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("loras")
    (parts, configs), (other, other_configs) = _lora_weights(pipe, [1, 2])
    other, other_configs = {"unet": other["unet"]}, {"unet": other_configs["unet"]}  # a U-Net-only LoRA
    kohya = _kohya_dict(parts)
    save_file(kohya, d / "ink.safetensors")
    (d / "sub").mkdir()
    save_file(_kohya_dict(other), d / "sub" / "glow.safetensors")
    # the same file plus modules of kinds not applied: LyCORIS OFT, CLIP's text projection (SDXL towers:
    # tests/test_lora_sdxl.py; LoHa/LoKr/DoRA apply: tests/test_lycoris.py)
    extra = dict(kohya)
    extra.update({"lora_unet_mid_block_attentions_0_proj_out.oft_blocks": torch.ones(4, 8, 8),
                  "lora_unet_mid_block_attentions_0_proj_out.alpha": torch.tensor(0.0)})
    extra.update({"lora_te_text_projection.lora_down.weight": torch.ones(RANK, 32),
                  "lora_te_text_projection.lora_up.weight": torch.ones(32, RANK)})
    save_file(extra, d / "ink-plus.safetensors")
    # for another base: one module's input is 64 wide here; and a file in the CompVis naming (matches nothing)
    wrong = dict(kohya)
    wrong["lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k.lora_down.weight"] = torch.ones(RANK, 64)
    save_file(wrong, d / "wrong-base.safetensors")
    save_file({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.ones(RANK, 32),
               "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.ones(32, RANK)}, d / "no-match.safetensors")
    (d / "old.ckpt").write_bytes(b"\x80\x04pickle")
    return {"diffusers": _save_diffusers(d / "ink-diffusers", parts, configs), "kohya": d / "ink.safetensors",
            "glow": d / "sub" / "glow.safetensors",
            "glow_diffusers": _save_diffusers(d / "glow-d", other, other_configs),
            "plus": d / "ink-plus.safetensors", "wrong": d / "wrong-base.safetensors",
            "no_match": d / "no-match.safetensors", "pickle": d / "old.ckpt", "dir": d}


@pytest.fixture(scope="module")
def pipe(model_dir):
    return Pipeline.from_pretrained(model_dir, device="cpu", dtype="fp32")


@pytest.fixture
def clean_pipe(pipe):
    yield pipe
    pipe.unload_loras()


def _reference(model_dir, pipe):
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = make_scheduler(KW["sampler"], pipe.scheduler_config)
    return ref


def _ref_images(ref, prompt=PROMPT) -> np.ndarray:
    return ref(prompt, negative_prompt=NEGATIVE, num_inference_steps=KW["steps"], guidance_scale=KW["cfg"],
               height=32, width=32, generator=[torch.Generator().manual_seed(KW["seed"])], output_type="np").images


# --------------------------------------------------------------------------------------------- parity with diffusers

@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_lora_images_equal_diffusers_load_lora_weights(layout, model_dir, loras, clean_pipe):
    """Ours merges the update into the weights; diffusers' default keeps it in peft layers (W x + s B(A(x))).
    Tolerance, derived: diffusers' own fused-vs-unfused difference on the same image (float rounding, ~1e-6),
    times 4; a LoRA at all moves the image ~1e-2, and scale 0.7 vs 0.6 by far more than the tolerance.

    diffusers 0.42.1 drops a kohya file's CLIP attention LoRAs (its converter leaves `to_q_lora` keys that peft
    reports as unexpected), so for kohya the reference loads the same weights in diffusers' layout;
    diffusers' kohya reading of the U-Net part is compared in the stacking test."""
    pipe, scale = clean_pipe, 0.7
    base = pipe(PROMPT, NEGATIVE, **KW).decoded
    applied = pipe.load_lora(loras[layout], scale)
    assert {t.part for t in applied.targets} == {"unet", "text_encoder"}
    # 6 transformer blocks x 2 attentions x 4 + 6 proj_in + 12 resnets' conv1; CLIP: 2 layers x 3
    assert len(applied.targets) == 6 * 2 * 4 + 6 + 12 + 2 * 3
    ours = pipe(PROMPT, NEGATIVE, **KW)

    ref = _reference(model_dir, pipe)
    ref.load_lora_weights(str(loras["diffusers"]), adapter_name="a")
    ref.set_adapters(["a"], adapter_weights=[scale])
    unfused = _ref_images(ref)
    ref.fuse_lora(adapter_names=["a"])
    rounding = np.abs(_ref_images(ref) - unfused).max()
    tolerance = 4 * max(float(rounding), 1e-6)
    assert np.abs(ours.decoded - unfused).max() <= tolerance
    assert np.abs(ours.decoded - base).max() > 1000 * tolerance  # the LoRA does change the image
    pipe.unload_loras()
    pipe.load_lora(loras[layout], 0.6)
    assert np.abs(pipe(PROMPT, NEGATIVE, **KW).decoded - unfused).max() > 100 * tolerance  # the test can fail
    assert ours.params[0].prompt == f"{PROMPT} <lora:{'ink-diffusers' if layout == 'diffusers' else 'ink'}:0.7>"


@pytest.mark.slow
def test_stacked_loras_and_prompt_tags_equal_diffusers_set_adapters(model_dir, loras, clean_pipe, caplog):
    """--lora ink:0.7 plus <lora:glow:0.5> (kohya, U-Net only) in the prompt = diffusers with both adapters."""
    pipe = clean_pipe
    pipe.load_lora(loras["kohya"], 0.7)
    tagged = f"{PROMPT} <lora:glow:0.5>"
    ours = pipe(tagged, NEGATIVE, lora_dir=loras["dir"], **KW)
    ref = _reference(model_dir, pipe)
    ref.load_lora_weights(str(loras["diffusers"]), adapter_name="ink")
    ref.load_lora_weights(str(loras["glow"]), adapter_name="glow")
    ref.set_adapters(["ink", "glow"], adapter_weights=[0.7, 0.5])
    unfused = _ref_images(ref)
    ref.fuse_lora(adapter_names=["ink", "glow"])
    tolerance = 4 * max(float(np.abs(_ref_images(ref) - unfused).max()), 1e-6)  # as in the test above
    assert np.abs(ours.decoded - unfused).max() <= tolerance
    params = ours.params[0]
    assert params.prompt == f"{tagged} <lora:ink:0.7>"  # tags kept; the loaded LoRA added as a tag (A1111 style)
    assert params.lora_hashes == f"glow: {lora_hash(loras['glow'])}, ink: {lora_hash(loras['kohya'])}"
    # the tag is not encoded: the same text without it, with glow loaded by hand, gives the same pixels
    pipe.load_lora(loras["glow"], 0.5)
    np.testing.assert_array_equal(pipe(PROMPT, NEGATIVE, **KW).decoded, ours.decoded)
    # the same file twice adds its scales (A1111); the diffusers layout of the same weights gives the same image
    pipe.unload_loras()
    pipe.load_lora(loras["kohya"], 0.4)
    pipe.load_lora(loras["kohya"], 0.3)
    twice = pipe(tagged, NEGATIVE, lora_dir=loras["dir"], **KW).decoded
    pipe.unload_loras()
    pipe.load_lora(loras["diffusers"], 0.7)
    pipe.load_lora(loras["glow_diffusers"], 0.5)
    np.testing.assert_allclose(twice, ours.decoded, rtol=0, atol=tolerance)  # 0.4 + 0.3 rounds unlike 0.7
    np.testing.assert_allclose(pipe(PROMPT, NEGATIVE, **KW).decoded, ours.decoded, rtol=0, atol=tolerance)


def test_unload_restores_the_weights_bit_for_bit(pipe, loras):
    before = {k: v.clone() for k, v in {**pipe.unet.state_dict(), **pipe.text_encoder.state_dict()}.items()}
    pipe.load_lora(loras["kohya"], 0.9)
    pipe("x <lora:glow:-0.5>", lora_dir=loras["dir"], **KW)
    pipe("x <lora:glow:2>", lora_dir=loras["dir"], **KW)  # tags of the last prompt replace those of the one before
    assert [a.name for a in pipe.loras.applied] == ["ink", "glow"] and pipe.loras.applied[1].scale == 2
    pipe.unload_loras()
    after = {**pipe.unet.state_dict(), **pipe.text_encoder.state_dict()}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_unapplied_kinds_are_one_warning_and_the_rest_applies(loras, clean_pipe, caplog):
    pipe = clean_pipe
    with caplog.at_level(logging.WARNING, logger="ldm"):
        pipe.load_lora(loras["plus"], 0.7)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "1 OFT modules (lora_unet_mid_block_attentions_0_proj_out)" in warnings[0]
    assert "1 text-encoder modules matching no module of this model (text_projection)" in warnings[0]
    plus = pipe(PROMPT, NEGATIVE, **KW).decoded
    pipe.unload_loras()
    pipe.load_lora(loras["kohya"], 0.7)
    np.testing.assert_array_equal(plus, pipe(PROMPT, NEGATIVE, **KW).decoded)


def test_a_text_encoder_that_is_not_transformers_clip_gets_a_warning(pipe, loras, caplog):
    stack = LoraStack(pipe.unet, torch.nn.Linear(2, 2))  # stands in for an open_clip encoder
    with caplog.at_level(logging.WARNING, logger="ldm"):
        applied = stack.prepare(read_lora(loras["kohya"]), "ink", 1.0)
    assert {t.part for t in applied.targets} == {"unet"}
    assert "6 text-encoder modules (the text encoder is a Linear; LoRA applies to transformers CLIP" in caplog.text


def test_a_lora_for_another_base_names_the_module(pipe, loras):
    with pytest.raises(UserError, match=r"module 'up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k' has "
                       r"weight \(64, 32\) but the LoRA's up @ down is \(64, 64\) \(rank 4\); it was made for another"):
        pipe.load_lora(loras["wrong"])
    with pytest.raises(UserError, match="none of its 1 modules exists here .the first, unet 'input_blocks_1_1_proj_in"):
        pipe.load_lora(loras["no_match"])
    assert pipe.loras.applied == [] and pipe.loras.loaded == []


# ------------------------------------------------------------------------------------------- tags, options, hashes

def test_tags_options_and_hashes():
    text, tags = split_tags("a <lora:ink:0.8> cat<lyco:b>")  # removed before encoding, as A1111 does
    assert text == "a  cat" and [(t.name, t.scale, t.text_scale, t.text) for t in tags] == [
        ("ink", 0.8, 0.8, "<lora:ink:0.8>"), ("b", 1.0, 1.0, "<lyco:b>")]
    (tag,) = split_tags("<lora:ink:0.5:1.5>")[1]
    assert (tag.name, tag.text_scale, tag.scale) == ("ink", 0.5, 1.5)
    (tag,) = split_tags("<lora:ink:unet=0.25:te=0>")[1]
    assert (tag.text_scale, tag.scale) == (0.0, 0.25)
    for bad, message in [("<lora:ink:abc>", "the weight 'abc' is not a number"), ("<lora::1>", "has no name"),
                         ("<lora:ink:1:1:8>", "a fourth field is not supported"), ("<lora:ink:nan>", "not a number")]:
        with pytest.raises(UserError, match=message):
            split_tags(bad)
    assert parse_lora_option("a/b.safetensors:0.8") == (Path("a/b.safetensors"), 0.8)
    assert parse_lora_option("b.safetensors") == (Path("b.safetensors"), 1.0)
    assert parse_lora_option("C:\\x\\b.safetensors") == (Path("C:\\x\\b.safetensors"), 1.0)
    assert parse_lora_option("b.safetensors:-1.5") == (Path("b.safetensors"), -1.5)
    for bad in ("b.safetensors:x", "b.safetensors:", "b.safetensors:inf"):
        with pytest.raises(UserError, match="the scale after the last ':' must be a finite number"):
            parse_lora_option(bad)
    text = format_lora_hashes([("a,b:c", "0123456789ab"), ("d", "ba9876543210")])
    assert text == "abc: 0123456789ab, d: ba9876543210" and parse_lora_hashes(text) == {
        "abc": "0123456789ab", "d": "ba9876543210"}


def test_hash_is_a1111s_sha256_of_the_tensor_bytes(tmp_path):
    tensors = {"lora_unet_x.lora_down.weight": torch.arange(6.0).reshape(2, 3)}
    save_file(tensors, tmp_path / "a.safetensors", metadata={"ss_output_name": "a"})
    save_file(tensors, tmp_path / "b.safetensors", metadata={"ss_output_name": "a much longer name"})
    raw = (tmp_path / "a.safetensors").read_bytes()
    expected = hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest()[:12]
    assert lora_hash(tmp_path / "a.safetensors") == expected == lora_hash(tmp_path / "b.safetensors")
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 3)}, tmp_path / "c.safetensors")
    assert lora_hash(tmp_path / "c.safetensors") != expected


def test_read_detects_layouts_and_alphas(loras):
    kohya, diffusers = read_lora(loras["kohya"]), read_lora(loras["diffusers"])
    assert kohya.format == KOHYA and diffusers.format == "diffusers"
    scales = lambda f: {(m.part, m.scale) for m in f.modules}  # noqa: E731
    assert scales(kohya) == scales(diffusers) == {("unet", UNET_ALPHA / RANK), ("text_encoder", TEXT_ALPHA / RANK)}
    meta = json.loads(__import__("safetensors").safe_open(str(loras["diffusers"]), "pt").metadata()[
        "lora_adapter_metadata"])
    assert meta["unet.lora_alpha"] == UNET_ALPHA  # the scale comes from diffusers' header metadata


# ---------------------------------------------------------------------------------------------------------- the CLI

generate = partial(run, main)  # (argv, capsys) -> (exit code, stdout lines, stderr)


FAST = ["--steps", "2", "--height", "32", "--width", "32", "--seed", "5", "--sampler", "ddim", "-q"]


@pytest.mark.slow
def test_cli_records_loras_and_replays_them_from_the_png(model_dir, loras, tmp_path, capsys):
    argv = ["a red car <lora:glow:0.5>", "--model", str(model_dir), "--lora", f"{loras['kohya']}:0.7",
            "--lora-dir", str(loras["dir"]), "--outdir", str(tmp_path / "a"), *FAST]
    code, lines, err = generate(argv, capsys)
    assert code == 0, err
    text = Image.open(lines[0]).info["parameters"]
    assert text.startswith("a red car <lora:glow:0.5> <lora:ink:0.7>\n")
    assert f'Lora hashes: "glow: {lora_hash(loras["glow"])}, ink: {lora_hash(loras["kohya"])}"' in text
    code, replay, err = generate(["--from-png", lines[0], "--lora-dir", str(loras["dir"]), "--outdir",
                                  str(tmp_path / "b"), "-q"], capsys)
    assert code == 0, err
    np.testing.assert_array_equal(np.asarray(Image.open(replay[0])), np.asarray(Image.open(lines[0])))
    assert Image.open(replay[0]).info["parameters"] == text
    # a renamed LoRA is found by the hash the PNG recorded, as A1111 does
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    (renamed / "ink-v2.safetensors").write_bytes(loras["kohya"].read_bytes())
    (renamed / "glow.safetensors").write_bytes(loras["glow"].read_bytes())
    code, again, err = generate(["--from-png", lines[0], "--lora-dir", str(renamed), "--outdir", str(tmp_path / "c"),
                                 "-q"], capsys)
    assert code == 0, err
    np.testing.assert_array_equal(np.asarray(Image.open(again[0])), np.asarray(Image.open(lines[0])))
    # a file of the recorded name whose hash differs is used, with a warning that names both hashes
    (renamed / "glow.safetensors").write_bytes(loras["kohya"].read_bytes())
    code, _, err = generate(["--from-png", lines[0], "--lora-dir", str(renamed), "--outdir", str(tmp_path / "d"),
                             "-q"], capsys)
    expected = (f"warning: LoRA 'glow': {renamed / 'glow.safetensors'} has hash {lora_hash(loras['kohya'])}, "
                f"but the image was made with {lora_hash(loras['glow'])}")
    assert code == 0 and expected in err and err.count("\n") == 1, err


BAD_LORAS = {
    # name: (extra argv, {dir} and {file}s filled in; expected message)
    "missing file": (["--lora", "nope.safetensors:0.5"], "LoRA file 'nope.safetensors' does not exist"),
    "bad scale syntax": (["--lora", "{kohya}:strong"], "the scale after the last ':' must be a finite number"),
    "pickle lora": (["--lora", "{pickle}"], "is a pickle file; only .safetensors LoRAs are loaded"),
    "unknown name in prompt": (["--prompt-tag", "<lora:nosuch:1>", "--lora-dir", "{dir}"],
                               "LoRA 'nosuch' (<lora:nosuch:1>) is not in --lora-dir"),
    "tag without lora-dir": (["--prompt-tag", "<lora:ink:1>"], "the prompt names LoRA 'ink' (<lora:ink:1>): pass "
                             "--lora-dir DIR"),
    "bad tag weight": (["--prompt-tag", "<lora:ink:x>", "--lora-dir", "{dir}"], "the weight 'x' is not a number"),
    # a name is a stem in --lora-dir, never a path out of it (ldm-serve takes prompts from the network)
    "path as a name": (["--prompt-tag", "<lora:../ink:1>", "--lora-dir", "{dir}"], "LoRA name '../ink' "
                       "(<lora:../ink:1>) is a path: name a file in --lora-dir by its stem"),
    "wrong base": (["--lora", "{wrong}"], "does not fit this model: unet module 'up_blocks.0.attentions.1."),
    "no matching key": (["--lora", "{no_match}"], "none of its 1 modules exists here"),
}


@pytest.mark.parametrize("case", BAD_LORAS)
def test_bad_lora_input_is_one_line_exit_2_and_no_file(case, model_dir, loras, tmp_path, capsys):
    extra, expected = BAD_LORAS[case]
    extra = [a.format(**loras) for a in extra]
    prompt = PROMPT
    if "--prompt-tag" in extra:
        i = extra.index("--prompt-tag")
        prompt += " " + extra[i + 1]
        del extra[i:i + 2]
    outdir = tmp_path / "out"
    code, lines, err = generate([prompt, "--model", str(model_dir), "--outdir", str(outdir), *FAST, *extra], capsys)
    assert code == 2 and lines == []
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert not outdir.exists() or not any(outdir.iterdir())


def test_older_diffusers_spellings_read_as_peft(loras):
    """diffusers' attention-processor (`processor.to_q_lora.down`) and LoRACompatibleLinear (`to_q.lora.down`) keys."""
    from safetensors.torch import load_file

    peft = read_lora(loras["diffusers"])
    unet = {k: v for k, v in load_file(loras["diffusers"]).items() if k.startswith("unet.")}
    old = {}
    for key, value in unet.items():
        key = key.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up.")
        for proj in ("to_q", "to_k", "to_v"):
            key = key.replace(f".{proj}.lora.", f".processor.{proj}_lora.")
        old[key.replace(".to_out.0.lora.", ".processor.to_out_lora.")] = value
    path = loras["dir"] / "old-style.safetensors"
    save_file(old, path)
    read = read_lora(path)
    assert read.format == "diffusers" and not read.unapplied
    expected = {m.name: m for m in peft.modules if m.part == "unet"}
    assert sorted(m.name for m in read.modules) == sorted(expected)
    assert all(torch.equal(m.down, expected[m.name].down) and torch.equal(m.up, expected[m.name].up)
               for m in read.modules)


def test_merging_in_fp16_rounds_once_and_clear_restores(pipe, loras, caplog):
    unet = __import__("copy").deepcopy(pipe.unet).half()
    stack = LoraStack(unet, torch.nn.Linear(2, 2))  # U-Net only: the pipeline's text encoder stays untouched
    module = unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn1.to_q")
    w0 = module.weight.detach().clone()
    applied = stack.prepare(read_lora(loras["kohya"]), "ink", 0.7)
    stack.set([applied, applied])
    (entry,) = [t.lora for t in applied.targets if t.module is module]
    delta = entry.delta(w0.shape, w0.device) * 0.7  # fp32, as apply.py computes it; the same LoRA twice adds
    assert torch.equal(module.weight, (w0.float() + (delta + delta)).half())
    stack.clear()
    assert torch.equal(module.weight, w0)
