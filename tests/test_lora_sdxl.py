"""SDXL LoRAs at generation time: kohya files (original sgm U-Net names, lora_te1_/lora_te2_) and diffusers/peft
files (unet., text_encoder., text_encoder_2.) against diffusers' `StableDiffusionXLPipeline.load_lora_weights` on
the tiny SDXL model, and every bad SDXL LoRA input as one line with exit code 2.

Tolerances, measured (scale 0.7, 3 Euler a steps, decoded images in [0, 1]): ours merges each update into the weight
in fp32 and rounds once, as diffusers' `fuse_lora` does, so the merged weights equal diffusers' fused ones (measured
0 for attention and CLIP layers, 3e-8 with conv and embedding layers; asserted 1e-6 on weights of magnitude ~0.1-1)
and the images the fused pipeline's (measured 0, and 5.2e-6 where the LoRA adapts every U-Net layer and moves the
image by 0.8); peft's unmerged forward (W x + s B(A(x)), the scale through `cross_attention_kwargs`) differs by the
rounding of two products instead of one (measured 1.8e-6, 6.6e-6). Asserted: 1e-5 on images, 2e-5 for the
every-layer file. A LoRA moves these images by 0.3-0.8, and scale 0.6 instead of 0.7 or two swapped modules by
> 1e-3: far outside every bound.
"""

from __future__ import annotations

import copy
import logging
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import run
from ldm.errors import UserError
from ldm.generate import main
from ldm.lora.load import read_lora
from ldm.lora.prompt_tags import lora_hash
from ldm.models.spec import inspect_model
from ldm.pipeline.pipeline import Pipeline
from ldm.pipeline.samplers import make_scheduler
from ldm.singlefile.keys import UNET_PREFIX, unet_to_original

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT, NEGATIVE = "a red car on a hill", "blurry"  # no '!': see ldm/text/sdxl.py
RANK, SCALE = 4, 0.7
ALPHAS = {"unet": 2.0, "text_encoder": 8.0, "text_encoder_2": 1.0}  # scales 0.5, 2, 0.25: a part mix-up shows
# every kind of U-Net layer sd-scripts' LoRA/LoCon adapts: attention, feed-forward, proj_in/out, resnet convs and
# time projection, shortcut, down/upsampler convs, conv_in/out, the time and micro-conditioning embeddings
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1",
                "conv2", "time_emb_proj", "conv_shortcut", "conv", "conv_in", "conv_out", "linear_1", "linear_2"]
ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]  # CLIPAttention and CLIPMLP, as sd-scripts
KW = dict(steps=3, sampler="euler_a", seed=3, show_progress=False)
KOHYA_TEXT = {"text_encoder": "lora_te1_text_model_", "text_encoder_2": "lora_te2_text_model_"}


@pytest.fixture(scope="module")
def pipe(tiny_sdxl_model):
    return Pipeline.open(inspect_model(tiny_sdxl_model), "cpu", "fp32")


@pytest.fixture
def clean_pipe(pipe):
    yield pipe
    pipe.unload_loras()


def _peft_weights(pipe: Pipeline, unet_targets: list[str], seed: int = 1):
    """peft LoRA layers injected into copies of the U-Net and both towers, random non-zero A and B:
    ({part: peft state dict}, {part: LoraConfig})."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    targets = {"unet": unet_targets, "text_encoder": TEXT_TARGETS, "text_encoder_2": TEXT_TARGETS}
    configs = {part: LoraConfig(r=RANK, lora_alpha=ALPHAS[part], target_modules=t) for part, t in targets.items()}
    towers = pipe.text_encoder.towers
    models = {"unet": pipe.unet, "text_encoder": towers[0].model, "text_encoder_2": towers[1].model}
    g = torch.Generator().manual_seed(seed)
    parts = {}
    for part, model in models.items():
        model = inject_adapter_in_model(configs[part], copy.deepcopy(model))
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = torch.randn(p.shape, generator=g) * (0.1 if "lora_B" in name else 1.0)
        parts[part] = get_peft_model_state_dict(model)
    return parts, configs


def _kohya(parts, unet_config) -> dict[str, torch.Tensor]:
    """kohya's SDXL layout as sd-scripts writes it: U-Net modules by their original (sgm) names, the towers as
    lora_te1_/lora_te2_ with transformers' names, an alpha per module."""
    out = {}
    for part, sd in parts.items():
        for key, value in sd.items():
            module, kind = key.rsplit(".lora_", 1)  # (module path, "A.weight" | "B.weight")
            if part == "unet":
                (original,) = unet_to_original({f"{module}.weight": value}, unet_config)
                name = "lora_unet_" + original.removeprefix(UNET_PREFIX).removesuffix(".weight").replace(".", "_")
            else:
                name = KOHYA_TEXT[part] + module.removeprefix("text_model.").replace(".", "_")
            out[f"{name}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = value.contiguous()
            out[f"{name}.alpha"] = torch.tensor(ALPHAS[part])
    return out


def _save_peft(directory: Path, parts, configs) -> Path:
    from diffusers import StableDiffusionXLPipeline

    StableDiffusionXLPipeline.save_lora_weights(
        directory, unet_lora_layers=parts["unet"], text_encoder_lora_layers=parts["text_encoder"],
        text_encoder_2_lora_layers=parts["text_encoder_2"],
        **{f"{part}_lora_adapter_metadata": config.to_dict() for part, config in configs.items()})
    return directory / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def loras(pipe, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sdxl-loras")
    config = dict(pipe.unet.config)
    parts, configs = _peft_weights(pipe, ATTENTION_TARGETS)
    kohya = _kohya(parts, config)
    save_file(kohya, d / "ink.safetensors")
    unet_parts, _ = _peft_weights(pipe, UNET_TARGETS, seed=2)
    unet_kohya = _kohya({"unet": unet_parts["unet"]}, config)
    save_file(unet_kohya, d / "every-layer.safetensors")
    # the same file with two same-shaped blocks' LoRAs swapped: a name mapping that confused them would pass unseen
    # if the images could not tell
    a, b = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_unet_input_blocks_4_1_proj_in"
    swapped = dict(unet_kohya)
    for suffix in ("lora_down.weight", "lora_up.weight"):
        swapped[f"{a}.{suffix}"], swapped[f"{b}.{suffix}"] = unet_kohya[f"{b}.{suffix}"], unet_kohya[f"{a}.{suffix}"]
    save_file(swapped, d / "swapped.safetensors")
    # what fits the refiner too (its bigG tower and self-attention have the base's shapes; its cross-attention not)
    save_file({k: v for k, v in kohya.items() if k.startswith("lora_te2_") or "attn1" in k}, d / "bigg.safetensors")
    # kinds not applied, added to a good file: a LyCORIS OFT module
    plus = dict(kohya)
    plus.update({"lora_unet_middle_block_1_proj_out.oft_blocks": torch.ones(4, 16, 16)})
    save_file(plus, d / "ink-plus.safetensors")
    # SD 1.x LoRAs (the tiny SD model's shapes: 32-wide text): kohya with lora_te_, and diffusers without text_encoder_2
    sd_unet = "down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    sd = {f"lora_unet_{sd_unet}.lora_down.weight": torch.ones(RANK, 32),
          f"lora_unet_{sd_unet}.lora_up.weight": torch.ones(64, RANK),
          "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(RANK, 32),
          "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(32, RANK)}
    save_file(sd, d / "sd-kohya.safetensors")
    sd_diffusers = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    save_file({f"{sd_diffusers}.lora_A.weight": torch.ones(RANK, 32), f"{sd_diffusers}.lora_B.weight": torch.ones(64, RANK)},
              d / "sd-diffusers.safetensors")
    # a full-size SD 1.x U-Net LoRA: its cross-attention reads 768-wide text
    save_file({"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight":
               torch.ones(RANK, 768),
               "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight":
               torch.ones(640, RANK)}, d / "sd15-unet.safetensors")
    return {"kohya": d / "ink.safetensors", "peft": _save_peft(d / "ink-peft", parts, configs),
            "every_layer": d / "every-layer.safetensors", "swapped": d / "swapped.safetensors",
            "plus": d / "ink-plus.safetensors", "bigg": d / "bigg.safetensors", "sd_kohya": d / "sd-kohya.safetensors",
            "sd_diffusers": d / "sd-diffusers.safetensors", "sd15_unet": d / "sd15-unet.safetensors", "dir": d}


def _reference(model_dir, pipe, lora: Path):
    from diffusers import StableDiffusionXLPipeline

    ref = StableDiffusionXLPipeline.from_pretrained(model_dir)
    ref.scheduler = make_scheduler(KW["sampler"], pipe.scheduler_config)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(lora))
    return ref


def _ref_images(ref, **kwargs) -> np.ndarray:
    return ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=KW["steps"], guidance_scale=7.5,
               generator=[torch.Generator().manual_seed(KW["seed"])], output_type="np", **kwargs).images


def _weights(unet, towers) -> dict[str, torch.Tensor]:
    models = {"unet": unet, "text_encoder": towers[0], "text_encoder_2": towers[1]}
    return {f"{part}.{k.replace('base_layer.', '')}": v for part, m in models.items()
            for k, v in m.state_dict().items() if "lora_" not in k}


def _parity(pipe, model_dir, ours_file: Path, ref_file: Path) -> dict[str, float]:
    """Ours with `ours_file` at SCALE against diffusers with `ref_file`: unfused (peft layers, the scale through
    `cross_attention_kwargs`), then fused (`fuse_lora(lora_scale=SCALE)`); weights compared after the fuse."""
    applied = pipe.load_lora(ours_file, SCALE)
    ours = pipe(PROMPT, NEGATIVE, **KW).decoded
    ref = _reference(model_dir, pipe, ref_file)
    unfused = _ref_images(ref, cross_attention_kwargs={"scale": SCALE})
    ref.fuse_lora(lora_scale=SCALE)
    fused = _ref_images(ref)
    theirs = _weights(ref.unet, [ref.text_encoder, ref.text_encoder_2])
    mine = _weights(pipe.unet, [t.model for t in pipe.text_encoder.towers])
    weight_diff = max(float((mine[k] - theirs[k]).abs().max()) for k in mine)
    pipe.unload_loras()
    base = pipe(PROMPT, NEGATIVE, **KW).decoded
    return {"targets": len(applied.targets), "unfused": float(np.abs(ours - unfused).max()),
            "fused": float(np.abs(ours - fused).max()), "weights": weight_diff,
            "effect": float(np.abs(ours - base).max()), "ours": ours}


# --------------------------------------------------------------------------------------------- parity with diffusers

def test_peft_file_equals_diffusers_load_lora_weights(tiny_sdxl_model, loras, clean_pipe):
    """(b) `StableDiffusionXLPipeline.save_lora_weights` output, alphas from its adapter metadata."""
    r = _parity(clean_pipe, tiny_sdxl_model, loras["peft"], loras["peft"].parent)
    print({k: v for k, v in r.items() if k != "ours"})
    # 12 transformer blocks x 2 attentions x 4 projections; 2 towers x 3 layers x 6
    assert r["targets"] == 12 * 2 * 4 + 2 * 3 * 6
    assert r["weights"] <= 1e-6 and r["fused"] <= 1e-5 and r["unfused"] <= 1e-5
    assert r["effect"] > 1e-2  # the LoRA does change the image, by far more than the bounds


def test_kohya_file_equals_diffusers_on_the_same_weights(tiny_sdxl_model, loras, clean_pipe):
    """(a) kohya (sgm U-Net names, lora_te1_, lora_te2_, alphas per module) = diffusers with the same weights.

    diffusers 0.42.1 reads kohya text-encoder LoRAs wrongly with transformers 5 (its converter's `to_q_lora` keys are
    reported unexpected and dropped, and a file with only MLP entries fails to load at all), so the reference
    loads this file's weights in diffusers' own layout; its reading of kohya's sgm U-Net names is compared directly
    in the next test."""
    r = _parity(clean_pipe, tiny_sdxl_model, loras["kohya"], loras["peft"].parent)
    print({k: v for k, v in r.items() if k != "ours"})
    assert r["targets"] == 12 * 2 * 4 + 2 * 3 * 6
    assert r["weights"] <= 1e-6 and r["fused"] <= 1e-5 and r["unfused"] <= 1e-5
    clean_pipe.load_lora(loras["kohya"], 0.6)  # the test can fail: another scale is far outside the bound
    assert np.abs(clean_pipe(PROMPT, NEGATIVE, **KW).decoded - r["ours"]).max() > 1e-3


def test_kohya_sgm_unet_names_equal_diffusers_reading_of_the_file(tiny_sdxl_model, loras, clean_pipe):
    """Every kind of U-Net layer, named as sd-scripts names SDXL's (input_blocks_4_1_..., middle_block_1_...,
    output_blocks_2_2_conv, label_emb_0_0, time_embed_0, input_blocks_0_0, out_2), loaded by diffusers from the
    same file (its `_maybe_map_sgm_blocks_to_diffusers` + `_convert_non_diffusers_lora_to_diffusers`)."""
    r = _parity(clean_pipe, tiny_sdxl_model, loras["every_layer"], loras["every_layer"])
    print({k: v for k, v in r.items() if k != "ours"})
    unet_layers = sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in clean_pipe.unet.modules())
    assert r["targets"] == unet_layers  # every Linear and Conv2d of the U-Net
    assert r["weights"] <= 1e-6 and r["fused"] <= 2e-5 and r["unfused"] <= 2e-5
    # a mapping that swapped two same-shaped modules would show
    clean_pipe.load_lora(loras["swapped"], SCALE)
    assert np.abs(clean_pipe(PROMPT, NEGATIVE, **KW).decoded - r["ours"]).max() > 1e-3


def test_read_sorts_the_towers_and_keeps_their_alphas(loras):
    kohya, peft = read_lora(loras["kohya"]), read_lora(loras["peft"])
    scales = lambda f: {(m.part, m.scale) for m in f.modules}  # noqa: E731
    expected = {(part, alpha / RANK) for part, alpha in ALPHAS.items()}
    assert scales(kohya) == scales(peft) == expected
    names = lambda f, part: {m.name.replace(".", "_") for m in f.modules if m.part == part}  # noqa: E731
    assert all(names(kohya, part) == names(peft, part) != set() for part in ("text_encoder", "text_encoder_2"))


def test_unapplied_kinds_are_one_warning_and_the_rest_applies(loras, clean_pipe, caplog):
    with caplog.at_level(logging.WARNING, logger="ldm"):
        applied = clean_pipe.load_lora(loras["plus"], SCALE)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1 OFT modules (lora_unet_middle_block_1_proj_out)" in warnings[0], warnings
    assert "second text encoder" not in warnings[0]  # both towers apply now
    assert {t.part for t in applied.targets} == {"unet", "text_encoder", "text_encoder_2"}


# ---------------------------------------------------------------------------------------------------------- the CLI

generate = partial(run, main)  # (argv, capsys) -> (exit code, stdout lines, stderr)
FAST = ["--dtype", "fp32", "--steps", "2", "--seed", "5", "--sampler", "euler_a", "-q"]  # fp32: as the Python API here


@pytest.mark.slow
def test_cli_lora_option_tags_and_hashes_on_sdxl(tiny_sdxl_model, loras, tmp_path, capsys, clean_pipe):
    """--lora FILE:S and a <lora:NAME:W> tag on an SDXL model: the PNG records both; the image is the Python API's."""
    from PIL import Image

    argv = [f"{PROMPT} <lora:every-layer:0.5>", "--model", str(tiny_sdxl_model), "--lora", f"{loras['kohya']}:0.7",
            "--lora-dir", str(loras["dir"]), "--outdir", str(tmp_path), *FAST]
    code, lines, err = generate(argv, capsys)
    assert code == 0, err
    text = Image.open(lines[0]).info["parameters"]
    assert text.startswith(f"{PROMPT} <lora:every-layer:0.5> <lora:ink:0.7>\n")
    assert f'Lora hashes: "every-layer: {lora_hash(loras["every_layer"])}, ink: {lora_hash(loras["kohya"])}"' in text
    clean_pipe.load_lora(loras["kohya"], 0.7)
    clean_pipe.load_lora(loras["every_layer"], 0.5)
    ours = clean_pipe(PROMPT, steps=2, seed=5, sampler="euler_a", show_progress=False).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(lines[0])), np.asarray(ours))


BAD_LORAS = {
    # name: (model fixture, LoRA, expected message)
    "SDXL LoRA on SD 1.x": ("tiny_model", "kohya", "is for SDXL (it has 18 modules of SDXL's second text encoder, "
                            "lora_te2_*), but the model is SD 1.x/2.x: use a LoRA made for SD 1.x/2.x"),
    "SDXL peft LoRA on SD 1.x": ("tiny_model", "peft", "is for SDXL (it has 18 modules of SDXL's second text encoder, "
                                 "text_encoder_2.*), but the model is SD 1.x/2.x"),
    "SD kohya LoRA on SDXL": ("tiny_sdxl_model", "sd_kohya", "is for SD 1.x/2.x (it has 1 lora_te_* modules: one text "
                              "encoder; SDXL LoRAs have lora_te1_/lora_te2_), but the model is SDXL"),
    "SD diffusers LoRA on SDXL": ("tiny_sdxl_model", "sd_diffusers", "does not fit this model: unet module "
                                  "'down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k' has weight (64, 64) "
                                  "but the LoRA's up @ down is (64, 32) (rank 4); it was made for another base model "
                                  "(this one is SDXL)"),
    "SD 1.5 U-Net LoRA on SDXL": ("tiny_sdxl_model", "sd15_unet", "is for SD 1.x/2.x (its cross-attention reads "
                                  "768-wide text features, as SD 1.x's does), but the model is SDXL"),
}


@pytest.mark.parametrize("case", BAD_LORAS)
def test_bad_sdxl_lora_input_is_one_line_exit_2_and_no_file(case, loras, tmp_path, capsys, request):
    model, lora, expected = BAD_LORAS[case]
    model_dir = request.getfixturevalue(model)
    capsys.readouterr()  # what writing a session's model printed
    outdir = tmp_path / "out"
    argv = [PROMPT, "--model", str(model_dir), "--lora", str(loras[lora]), "--outdir",
            str(outdir), "--height", "32", "--width", "32", *FAST]
    code, lines, err = generate(argv, capsys)
    assert code == 2 and lines == []
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert not outdir.exists() or not any(outdir.iterdir())


def test_a_refused_lora_leaves_the_weights_untouched(pipe, loras):
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(UserError, match="is for SD 1.x/2.x"):
        pipe.load_lora(loras["sd_kohya"])
    assert pipe.loras.applied == [] and all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in before.items())


def test_a_lora_for_the_base_is_refused_on_the_refiner(tiny_sdxl_model, tiny_sdxl_refiner, loras):
    """Refused, not skipped: CLIP ViT-L entries (lora_te1_ / text_encoder.) exist only in LoRAs made on the base
    (the refiner has no such tower), and such a LoRA's U-Net part is for the base's U-Net, which the refiner's is
    not (other widths, cross-attention on bigG alone), so applying the rest would at best fail on a shape and at
    worst fit in part. The CLI gives --lora and tags to the base only; this is `pipe.refiner.load_lora`."""
    pipe = Pipeline.open(inspect_model(tiny_sdxl_model), "cpu", "fp32", refiner=inspect_model(tiny_sdxl_refiner))
    refiner = pipe.refiner
    with pytest.raises(UserError, match=r"is for the SDXL base \(it has 18 lora_te1_\* modules, for SDXL's CLIP ViT-L "
                       r"text encoder, which a refiner lacks\), but the model is an SDXL refiner"):
        refiner.load_lora(loras["kohya"])
    with pytest.raises(UserError, match=r"is for SD 1.x/2.x or the SDXL base \(it has 18 text_encoder.\* modules"):
        refiner.load_lora(loras["peft"])
    assert refiner.loras.applied == []
    applied = refiner.load_lora(loras["bigg"])  # bigG and U-Net entries that fit: applied to the refiner's
    assert {t.part for t in applied.targets} == {"unet", "text_encoder_2"} and len(applied.targets) == 12 * 4 + 18
