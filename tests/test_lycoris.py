"""LyCORIS LoHa and LoKr modules and DoRA magnitudes in LoRA files (ldm/lora/lycoris.py), applied at generation time.

Each kind's merged weight, read from a kohya-named file, against peft's own implementation of the same adapter
(LoHaConfig, LoKrConfig, LoraConfig(use_dora=True)) holding the same tensors on the same layer (a Linear, a 3x3 and
a 1x1 Conv2d): peft's merged weight and its unmerged forward output. Where peft's convention is not LyCORIS's file
convention (LoKr's scale when both halves are full matrices, DoRA's input-channel norm and its multiplier), against
the LyCORIS formula written out here in float64. Then the tiny SD pipeline (images, zero deltas, unload, stacking,
unknown kinds) and SDXL's two text towers.

Tolerance: both sides compute in float32 on weights and updates of magnitude <= ~3.5 (products of a few random
factors), in another order of operations (peft's kron/einsum/forward paths against ours); float32 rounding is ~1e-7
relative. Measured: merged weights 2.4e-7 from peft's and 1e-7 from the float64 formulas; layer outputs (magnitude
up to ~30: a 3x3 conv sums 144 products) 7.6e-6 from peft's unmerged forward. Asserted 2e-6 and 3e-5. A wrong
convention is off by far more: alpha / rank on a LoKr with both halves full is a factor 2 here, DoRA's norm of W0
instead of W0 + delta W moves weights by > 2; kron(w2, w1) for kron(w1, w2) fails every LoKr case.
"""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ldm.errors import UserError
from ldm.lora.load import read_lora
from ldm.pipeline.pipeline import Pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WEIGHT_TOL, OUTPUT_TOL = 2e-6, 3e-5  # see the module docstring
LAYERS = {"lin": lambda: nn.Linear(64, 48), "conv3": lambda: nn.Conv2d(16, 24, 3, padding=1),
          "conv1": lambda: nn.Conv2d(16, 24, 1)}
EPS = float(torch.finfo(torch.float32).eps)


def _model(layer: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Module()
    setattr(model, layer, LAYERS[layer]())
    for p in model.parameters():
        p.data = torch.randn(p.shape) * 0.2
    return model


def _peft(config, layer: str, seed: int = 1):
    """peft's adapter on a fresh layer with random non-zero tensors -> (model, peft layer, peft state dict)."""
    from peft import inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    config = copy.deepcopy(config)
    config.target_modules = [layer]
    model = inject_adapter_in_model(config, _model(layer))
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "magnitude" in name:  # DoRA's m: positive, away from ||W0|| so that it matters
            p.data = torch.rand(p.shape, generator=g) + 0.5
        elif "base_layer" not in name:
            p.data = torch.randn(p.shape, generator=g) * 0.5
    return model, getattr(model, layer), get_peft_model_state_dict(model)


def _x(layer: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randn((3, 64) if layer == "lin" else (2, 16, 5, 5), generator=g)


def _forward(layer: str, weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight, bias) if layer == "lin" else F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2)


def _kohya_file(path, layer: str, tensors: dict[str, torch.Tensor], alpha: float | None = None):
    """peft's `<layer>.<suffix>` tensors as one kohya module `lora_unet_<layer>.<suffix>` (+ `.alpha`)."""
    out = {f"lora_unet_{k}": v.contiguous() for k, v in tensors.items()}
    if alpha is not None:
        out[f"lora_unet_{layer}.alpha"] = torch.tensor(float(alpha))
    save_file(out, path)
    return path


def _ours(path, w0: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
    (entry,) = read_lora(path).modules
    return w0 + entry.update(w0, multiplier, "cpu")


def _check_against_peft(peft_layer, layer: str, path, multiplier: float = 1.0) -> None:
    base = peft_layer.get_base_layer()
    w0, bias, x = base.weight.detach().clone(), base.bias.detach(), _x(layer)
    ours = _ours(path, w0, multiplier)
    with torch.no_grad():
        theirs_out = peft_layer(x)  # unmerged: W0 x + the adapter's own forward
        peft_layer.merge()
    theirs = base.weight.detach()
    assert not torch.allclose(ours, w0, atol=1e-2)  # the adapter does something
    torch.testing.assert_close(ours, theirs, rtol=0, atol=WEIGHT_TOL)
    torch.testing.assert_close(_forward(layer, ours, bias, x), theirs_out, rtol=0, atol=OUTPUT_TOL)


# -------------------------------------------------------------------------------------------- LoHa and LoKr vs peft

def _loha(**kw):
    from peft import LoHaConfig

    return LoHaConfig(r=4, alpha=2, init_weights=False, **kw)


def _lokr(r, alpha, **kw):
    from peft import LoKrConfig

    return LoKrConfig(r=r, alpha=alpha, init_weights=False, **kw)


# name: (peft config, layer, alpha written in the file, the file's key suffixes). Shapes: lin 64 -> 48 factorises as
# w1 (6, 8) x w2 (8, 8), the convs' 16 -> 24 as w1 (4, 4) x w2 (6, 4, kh, kw); peft makes a half full when r >= half
# its larger side
HADA = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
W1, W1_AB, W2, W2_AB = {"lokr_w1"}, {"lokr_w1_a", "lokr_w1_b"}, {"lokr_w2"}, {"lokr_w2_a", "lokr_w2_b"}
PEFT_CASES = {
    "LoHa linear": (lambda: _loha(), "lin", 2, HADA),
    "LoHa conv3x3": (lambda: _loha(), "conv3", 2, HADA),
    "LoHa conv3x3 CP": (lambda: _loha(use_effective_conv2d=True), "conv3", 2, HADA | {"hada_t1", "hada_t2"}),
    "LoHa conv1x1": (lambda: _loha(), "conv1", 2, HADA),
    "LoKr linear, w1 and w2 full": (lambda: _lokr(8, 8), "lin", 8, W1 | W2),  # LyCORIS: scale 1; peft 8 / 8
    "LoKr linear, w2 factorised": (lambda: _lokr(2, 4), "lin", 4, W1 | W2_AB),
    "LoKr linear, both factorised": (lambda: _lokr(2, 4, decompose_both=True), "lin", 4, W1_AB | W2_AB),
    "LoKr linear, both factorised, no alpha": (lambda: _lokr(2, 2, decompose_both=True), "lin", None, W1_AB | W2_AB),
    "LoKr conv3x3, w2 full (b, d, kh, kw)": (lambda: _lokr(8, 8), "conv3", 8, W1 | W2),
    "LoKr conv3x3, w2 factorised (r, d*kh*kw)": (lambda: _lokr(2, 4), "conv3", 4, W1 | W2_AB),
    "LoKr conv3x3, w2 CP": (lambda: _lokr(2, 4, use_effective_conv2d=True), "conv3", 4, W1 | W2_AB | {"lokr_t2"}),
    "LoKr conv1x1, both factorised": (lambda: _lokr(1, 3, decompose_both=True), "conv1", 3, W1_AB | W2_AB),
}


@pytest.mark.parametrize("case", PEFT_CASES)
def test_loha_and_lokr_equal_peft(case, tmp_path):
    config, layer, alpha, suffixes = PEFT_CASES[case]
    _, peft_layer, sd = _peft(config(), layer)
    assert {k.split(".", 1)[1] for k in sd} == suffixes  # the case holds the form it names
    _check_against_peft(peft_layer, layer, _kohya_file(tmp_path / "a.safetensors", layer, sd, alpha))


def test_lokr_scale_follows_lycoris_not_the_stored_alpha_when_both_halves_are_full(tmp_path):
    """LyCORIS trains a LoKr whose halves are both full matrices with scale 1, whatever alpha the file holds (peft
    would take alpha / r); a zero alpha means alpha = rank."""
    g = torch.Generator().manual_seed(3)
    w1, w2 = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(8, 8, generator=g, dtype=torch.float64)
    w0 = torch.zeros(48, 64)
    full = _kohya_file(tmp_path / "full.safetensors", "lin", {"lin.lokr_w1": w1.float(), "lin.lokr_w2": w2.float()}, 16)
    torch.testing.assert_close(_ours(full, w0).double(), torch.kron(w1, w2), rtol=0, atol=WEIGHT_TOL)
    a, b = torch.randn(8, 2, generator=g, dtype=torch.float64), torch.randn(2, 8, generator=g, dtype=torch.float64)
    zero = _kohya_file(tmp_path / "zero.safetensors", "lin", {"lin.lokr_w1": w1.float(), "lin.lokr_w2_a": a.float(),
                                                               "lin.lokr_w2_b": b.float()}, 0)
    torch.testing.assert_close(_ours(zero, w0).double(), torch.kron(w1, a @ b), rtol=0, atol=WEIGHT_TOL)


# ------------------------------------------------------------------------------------------------------------- DoRA

def _dora(**kw):
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, use_dora=True, **kw)


def _dora_file(path, layer: str, sd: dict[str, torch.Tensor], layout: str, magnitude_shape=None):
    """peft's DoRA tensors as a diffusers/peft file (`unet.<layer>.lora_magnitude_vector`, alpha in the header) or
    a kohya one (`lora_down`/`lora_up`/`alpha`/`dora_scale` (out, 1[, 1, 1]), LyCORIS's per-output shape)."""
    down, up, m = sd[f"{layer}.lora_A.weight"], sd[f"{layer}.lora_B.weight"], sd[f"{layer}.lora_magnitude_vector"]
    if layout == "peft":
        meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8})}
        save_file({f"unet.{k}": v.contiguous() for k, v in sd.items()}, path, metadata=meta)
        return path
    shape = magnitude_shape or (up.shape[0],) + (1,) * (down.dim() - 1)
    return _kohya_file(path, layer, {f"{layer}.lora_down.weight": down, f"{layer}.lora_up.weight": up,
                                     f"{layer}.dora_scale": m.reshape(shape)}, alpha=8)


@pytest.mark.parametrize("layout", ["peft", "kohya"])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_dora_lora_equals_peft(layer, layout, tmp_path):
    """At multiplier 1 peft's DoRA and LyCORIS's per-output-channel one are the same merge (LyCORIS adds float32's
    eps to the norm: 1e-7 relative)."""
    _, peft_layer, sd = _peft(_dora(), layer)
    _check_against_peft(peft_layer, layer, _dora_file(tmp_path / "d.safetensors", layer, sd, layout))


@pytest.mark.parametrize("layer", ["lin", "conv3"])
def test_peft_dora_multiplier_goes_into_the_update_as_in_peft(layer, tmp_path):
    _, peft_layer, sd = _peft(_dora(), layer)
    path = _dora_file(tmp_path / "d.safetensors", layer, sd, "peft")
    peft_layer.set_scale("default", 0.6)  # what diffusers' set_adapters(weights=0.6) does
    _check_against_peft(peft_layer, layer, path, multiplier=0.6)


def _lycoris_dora64(w0, delta, m, per_output: bool, multiplier: float, norm_of_merged: bool = True):
    """LyCORIS's merge in float64: W = W0 + delta W, W' = W0 + s * (m * W / (||W|| + eps) - W0), the norm per output
    channel (over in, kh, kw) or per input channel (over out, kh, kw). norm_of_merged=False: ||W0|| instead (what
    ComfyUI takes for the output axis)."""
    w0, delta, m = w0.double(), delta.double(), m.double()
    w = w0 + delta
    dims = tuple(d for d in range(w.dim()) if d != (0 if per_output else 1))
    norm = (w if norm_of_merged else w0).pow(2).sum(dim=dims, keepdim=True).sqrt()
    return w0 + multiplier * (m * w / (norm + EPS) - w0)


@pytest.mark.parametrize("multiplier", [1.0, 0.6])
@pytest.mark.parametrize("axis", ["output", "input"])
@pytest.mark.parametrize("layer", ["lin", "conv3"])
def test_kohya_dora_equals_the_lycoris_formula(layer, axis, multiplier, tmp_path):
    _, peft_layer, sd = _peft(_dora(), layer)
    w0 = peft_layer.get_base_layer().weight.detach()
    down, up = sd[f"{layer}.lora_A.weight"], sd[f"{layer}.lora_B.weight"]
    delta = (up.double().flatten(1) @ down.double().flatten(1)).reshape(w0.shape) * 8 / 4
    g = torch.Generator().manual_seed(5)
    if axis == "output":
        shape = (w0.shape[0],) + (1,) * (w0.dim() - 1)
    else:  # older LyCORIS / A1111: one magnitude per input channel
        shape = (1, w0.shape[1]) + (1,) * (w0.dim() - 2)
    m = torch.rand(shape, generator=g) + 0.5
    path = _kohya_file(tmp_path / "d.safetensors", layer, {f"{layer}.lora_down.weight": down,
                                                           f"{layer}.lora_up.weight": up, f"{layer}.dora_scale": m}, 8)
    expected = _lycoris_dora64(w0, delta, m, axis == "output", multiplier)
    ours = _ours(path, w0, multiplier)
    torch.testing.assert_close(ours.double(), expected, rtol=0, atol=WEIGHT_TOL)
    # the conventions this tells apart: the norm of W0 + delta W, not of W0; the axis m's shape says
    wrong_norm = _lycoris_dora64(w0, delta, m, axis == "output", multiplier, norm_of_merged=False)
    assert (ours.double() - wrong_norm).abs().max() > 1e-2


def test_dora_on_a_loha_module_equals_the_lycoris_formula(tmp_path):
    _, peft_layer, sd = _peft(_loha(), "conv3")
    w0 = peft_layer.get_base_layer().weight.detach()
    h = {k.split(".")[1]: v.double() for k, v in sd.items()}
    delta = ((h["hada_w1_a"] @ h["hada_w1_b"]) * (h["hada_w2_a"] @ h["hada_w2_b"])).reshape(w0.shape) * 2 / 4
    m = torch.rand(24, 1, 1, 1, generator=torch.Generator().manual_seed(5)) + 0.5
    path = _kohya_file(tmp_path / "d.safetensors", "conv3", {**sd, "conv3.dora_scale": m}, alpha=2)
    torch.testing.assert_close(_ours(path, w0, 0.8).double(), _lycoris_dora64(w0, delta, m, True, 0.8), rtol=0,
                               atol=WEIGHT_TOL)


# ------------------------------------------------------------------------------------------ the tiny SD pipeline

KW = dict(steps=3, cfg=7.5, sampler="ddim", seed=3, height=32, width=32, show_progress=False)
PROMPT, NEGATIVE = "a red car", "blurry"
TO_Q = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"  # (64, 64)
KOHYA_TO_Q = "lora_unet_" + TO_Q.replace(".", "_")


def _lycoris_tensors(zero: bool = False, seed: int = 11) -> dict[str, torch.Tensor]:
    """kohya names: LoHa on an attention projection (linear 64 -> 64) and on the 1x1 proj_in, LoKr on a resnet's 3x3
    conv1 (w1 full, w2 in the CP form) and on the text encoder's q_proj (both halves full). `zero`: one factor of
    each is zero, so every update is 0."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(shape, generator=g) * 0.3  # noqa: E731
    first = (lambda *shape: torch.zeros(shape)) if zero else rand
    out = {}
    for name in (KOHYA_TO_Q, "lora_unet_mid_block_attentions_0_proj_in"):  # both (64, 64[, 1, 1])
        out |= {f"{name}.hada_w1_a": first(64, 4), f"{name}.hada_w1_b": rand(4, 64), f"{name}.hada_w2_a": rand(64, 4),
                f"{name}.hada_w2_b": rand(4, 64), f"{name}.alpha": torch.tensor(2.0)}
    conv = "lora_unet_mid_block_resnets_0_conv1"  # (64, 64, 3, 3): 64 = 8 * 8
    out |= {f"{conv}.lokr_w1": first(8, 8), f"{conv}.lokr_w2_a": rand(2, 8), f"{conv}.lokr_w2_b": rand(2, 8),
            f"{conv}.lokr_t2": rand(2, 2, 3, 3), f"{conv}.alpha": torch.tensor(1.0)}
    text = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"  # (32, 32) = (4 * 8, 4 * 8)
    out |= {f"{text}.lokr_w1": first(4, 4), f"{text}.lokr_w2": rand(8, 8)}
    return out


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return Pipeline.from_pretrained(tiny_model, device="cpu", dtype="fp32")


@pytest.fixture
def clean_pipe(pipe):
    yield pipe
    pipe.unload_loras()


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in {**pipe.unet.state_dict(), **pipe.text_encoder.state_dict()}.items()}


def test_a_loha_lokr_file_changes_the_image_zero_deltas_do_not_and_unload_restores(clean_pipe, tmp_path, caplog):
    pipe = clean_pipe
    before, base = _weights(pipe), pipe(PROMPT, NEGATIVE, **KW).decoded
    save_file(_lycoris_tensors(), tmp_path / "lyco.safetensors")
    with caplog.at_level(logging.INFO, logger="ldm"):
        applied = pipe.load_lora(tmp_path / "lyco.safetensors")
    assert sorted(t.lora.kind for t in applied.targets) == ["LoHa", "LoHa", "LoKr", "LoKr"]
    assert "3 U-Net + 1 text-encoder modules" in caplog.text and not any(
        r.levelno >= logging.WARNING for r in caplog.records)
    assert np.abs(pipe(PROMPT, NEGATIVE, **KW).decoded - base).max() > 1e-2
    pipe.unload_loras()
    after = _weights(pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)
    save_file(_lycoris_tensors(zero=True), tmp_path / "zero.safetensors")
    pipe.load_lora(tmp_path / "zero.safetensors")
    np.testing.assert_array_equal(pipe(PROMPT, NEGATIVE, **KW).decoded, base)


def test_adapters_stack_each_against_the_original_weight(clean_pipe, tmp_path):
    """A LoHa at 0.7 and a DoRA-LoRA at 0.5 on the same layer: W0 + both updates, the DoRA one from W0 (A1111's
    rule), as the float64 formulas give them."""
    pipe = clean_pipe
    layer = pipe.unet.get_submodule(TO_Q)
    w0 = layer.weight.detach().clone().double()
    lyco = _lycoris_tensors()
    save_file(lyco, tmp_path / "lyco.safetensors")
    g = torch.Generator().manual_seed(4)
    down, up, m = torch.randn(4, 64, generator=g) * 0.3, torch.randn(64, 4, generator=g) * 0.3, torch.rand(64, 1) + 0.5
    save_file({f"{KOHYA_TO_Q}.lora_down.weight": down, f"{KOHYA_TO_Q}.lora_up.weight": up,
               f"{KOHYA_TO_Q}.alpha": torch.tensor(2.0), f"{KOHYA_TO_Q}.dora_scale": m}, tmp_path / "dora.safetensors")
    pipe.load_lora(tmp_path / "lyco.safetensors", 0.7)
    applied = pipe.load_lora(tmp_path / "dora.safetensors", 0.5)
    assert [t.lora.label for t in applied.targets] == ["LoRA+DoRA"]
    h = {k.rsplit(".", 1)[1]: v.double() for k, v in lyco.items() if k.startswith(KOHYA_TO_Q)}
    loha = (h["hada_w1_a"] @ h["hada_w1_b"]) * (h["hada_w2_a"] @ h["hada_w2_b"]) * 2 / 4
    dora = _lycoris_dora64(w0, up.double() @ down.double() * 2 / 4, m, True, 0.5) - w0
    torch.testing.assert_close(layer.weight.double(), w0 + 0.7 * loha + dora, rtol=0, atol=WEIGHT_TOL)


def test_unknown_kinds_are_one_warning_and_a_file_of_nothing_else_is_one_line(clean_pipe, tmp_path, caplog):
    pipe = clean_pipe
    before = _weights(pipe)
    oft = {f"lora_unet_mid_block_resnets_{i}_conv2.oft_blocks": torch.ones(4, 16, 16) for i in (0, 1)}
    save_file({**_lycoris_tensors(), **oft}, tmp_path / "plus.safetensors")
    with caplog.at_level(logging.WARNING, logger="ldm"):
        applied = pipe.load_lora(tmp_path / "plus.safetensors")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["LoRA plus: not applied: 2 OFT modules (lora_unet_mid_block_resnets_0_conv2, "
                        "lora_unet_mid_block_resnets_1_conv2); the other 4 modules are applied"]
    assert len(applied.targets) == 4
    pipe.unload_loras()
    save_file(oft, tmp_path / "oft.safetensors")
    with pytest.raises(UserError, match=r"has nothing this package can apply \(2 OFT modules\)$"):
        pipe.load_lora(tmp_path / "oft.safetensors")
    damaged = {k: v for k, v in _lycoris_tensors().items() if k != f"{KOHYA_TO_Q}.hada_w2_b"}
    save_file(damaged, tmp_path / "damaged.safetensors")
    with pytest.raises(UserError, match=f"is damaged: module '{KOHYA_TO_Q}' is a LoHa module without hada_w2_b;"):
        pipe.load_lora(tmp_path / "damaged.safetensors")
    wrong = {**_lycoris_tensors(), f"{KOHYA_TO_Q}.dora_scale": torch.ones(1, 32)}  # neither 64 outputs nor 64 inputs
    save_file(wrong, tmp_path / "wrong.safetensors")
    with pytest.raises(UserError, match=r"has weight \(64, 64\) but its DoRA magnitude has shape \(1, 32\)"):
        pipe.load_lora(tmp_path / "wrong.safetensors")
    after = _weights(pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_sdxl_lokr_applies_to_both_text_towers(tiny_sdxl_model, tmp_path):
    from ldm.models.spec import inspect_model

    pipe = Pipeline.open(inspect_model(tiny_sdxl_model), "cpu", "fp32")
    towers = [tower.model for tower in pipe.text_encoder.towers]  # CLIP ViT-L, bigG
    q = next(m for n, m in towers[0].named_modules() if n.endswith("encoder.layers.0.self_attn.q_proj"))  # (32, 32)
    fc1 = next(m for n, m in towers[1].named_modules() if n.endswith("encoder.layers.0.mlp.fc1"))  # (128, 32)
    w0 = {"q": q.weight.detach().clone(), "fc1": fc1.weight.detach().clone()}
    g = torch.Generator().manual_seed(6)
    rand = lambda *shape: torch.randn(shape, generator=g) * 0.3  # noqa: E731
    te1, te2 = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_0_mlp_fc1"
    t = {f"{te1}.lokr_w1": rand(4, 4), f"{te1}.lokr_w2_a": rand(8, 2), f"{te1}.lokr_w2_b": rand(2, 8),
         f"{te1}.alpha": torch.tensor(1.0), f"{te2}.lokr_w1": rand(8, 4), f"{te2}.lokr_w2": rand(16, 8),
         f"{te2}.alpha": torch.tensor(5.0)}  # both halves full: scale 1, the alpha unused
    save_file(t, tmp_path / "te.safetensors")
    applied = pipe.load_lora(tmp_path / "te.safetensors", 0.8)
    assert {t.part for t in applied.targets} == {"text_encoder", "text_encoder_2"}
    d = {k: v.double() for k, v in t.items()}
    expected_q = torch.kron(d[f"{te1}.lokr_w1"], d[f"{te1}.lokr_w2_a"] @ d[f"{te1}.lokr_w2_b"]) * 1 / 2
    torch.testing.assert_close(q.weight.double(), w0["q"].double() + 0.8 * expected_q, rtol=0, atol=WEIGHT_TOL)
    expected_fc1 = torch.kron(d[f"{te2}.lokr_w1"], d[f"{te2}.lokr_w2"])
    torch.testing.assert_close(fc1.weight.double(), w0["fc1"].double() + 0.8 * expected_fc1, rtol=0, atol=WEIGHT_TOL)
    pipe.unload_loras()
    assert torch.equal(q.weight, w0["q"]) and torch.equal(fc1.weight, w0["fc1"])
