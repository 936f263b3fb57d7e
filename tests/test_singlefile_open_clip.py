"""SD 2.x single files hold OpenCLIP's whole text tower: the last block, `text_projection` and `logit_scale` that
diffusers' 23-block text encoder drops are kept from a file (text_encoder/open_clip_extra.safetensors) or filled
neutrally, so tools reading the original layout (ComfyUI) find every weight and no image changes."""

from __future__ import annotations

import json
import logging
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import SD_2_TEXT_ENCODER_KEYS_TO_IGNORE
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.errors import UserError
from ldm.pipeline.pipeline import Pipeline
from ldm.singlefile import keys
from ldm.singlefile.detect import detect
from ldm.singlefile.load import load_single_file
from ldm.singlefile.open_clip_extra import EXTRA_FILE, neutral_extra
from ldm.singlefile.save import directory_to_file, file_to_directory
from ldm.text.encoder import FrozenTextEncoder
from ldm.text.openclip import OpenCLIPTextEncoder
from ldm.text.tiny import tiny_clip_text_config, tiny_open_clip_model
from ldm.unet.presets import UNET_PRESETS

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPT = "a red circle"
P = keys.OPEN_CLIP_PREFIX


def _text_tower(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(P):]: v for k, v in state.items() if k.startswith(P)}


def _open_clip_text_keys(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """An open_clip CLIP model's text tower, names and shapes: what SD 2's FrozenOpenCLIPEmbedder saved under
    cond_stage_model.model. (it deletes the image tower; attn_mask is not a persistent buffer)."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("visual.")}


@pytest.fixture(scope="module")
def sd2_dir(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with an SD 2-style text encoder (gelu, pads with '!'), 2 blocks: a diffusers SD 2 directory
    without open_clip_extra.safetensors, as a model trained here is."""
    root = tmp_path_factory.mktemp("sd2") / "model"
    shutil.copytree(tiny_model, root)
    shutil.rmtree(root / "text_encoder")
    config = tiny_clip_text_config(hidden_size=32)
    config.hidden_act, config.pad_token_id = "gelu", 0
    torch.manual_seed(5)
    CLIPTextModel(config).save_pretrained(root / "text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(str(root / "tokenizer"))
    tokenizer.pad_token = "!"
    tokenizer.save_pretrained(str(root / "tokenizer"))
    return root


@pytest.fixture(scope="module")
def sd2_file(sd2_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sd2file") / "sd2.safetensors"
    directory_to_file(sd2_dir, path)
    return path


# ------------------------------------------------------------------------------------------------------ (a) key set
def test_a_full_size_sd2_text_encoder_is_written_as_the_whole_open_clip_vit_h_tower():
    """diffusers' SD 2 text encoder (23 blocks) + the neutral tail, at full size on the meta device: exactly the
    names and shapes of open_clip's ViT-H-14 text tower (24 blocks, text_projection, logit_scale: 24 x 12 + 6), what
    the original SD 2 checkpoints hold and ComfyUI loads; diffusers' reader ignores exactly the keys it knows."""
    from open_clip import get_model_config
    from open_clip.model import CLIP

    with torch.device("meta"):
        vit_h = CLIP(**get_model_config("ViT-H-14"))
        text = CLIPTextModel(CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                            num_attention_heads=16, hidden_act="gelu", projection_dim=512))
    config = text.config.to_dict()
    written = {**keys.open_clip_to_original(text.state_dict()),
               **{P + k: v for k, v in neutral_extra(config, device="meta").items()}}
    want = _open_clip_text_keys(vit_h)
    assert {k[len(P):]: tuple(v.shape) for k, v in written.items()} == want and len(want) == 24 * 12 + 6
    assert want["text_projection"] == (1024, 1024) and want["logit_scale"] == ()
    assert set(SD_2_TEXT_ENCODER_KEYS_TO_IGNORE) < written.keys()  # resblocks.23.* and text_projection
    back = keys.open_clip_from_original(written, 1024, layers=23)
    assert back.keys() == text.state_dict().keys()


def test_a_written_sd2_file_holds_the_open_clip_tower_and_its_penultimate_layer_is_unchanged(sd2_dir, sd2_file):
    """The neutral tail: the file's tower loads strictly into open_clip's own model (3 blocks, the last the
    identity), whose last and penultimate layers are equal bit for bit, and whose penultimate layer is the
    directory's text encoder output (what SD 2 conditions on)."""
    tower = _text_tower(load_file(str(sd2_file)))
    open_clip_model = tiny_open_clip_model(width=32, layers=3, heads=2)
    assert {k: tuple(v.shape) for k, v in tower.items()} == _open_clip_text_keys(open_clip_model)
    missing, unexpected = open_clip_model.load_state_dict(tower, strict=False)
    assert unexpected == [] and all(k.startswith("visual.") for k in missing)
    assert torch.equal(tower["logit_scale"], torch.tensor(math.log(100)))
    assert torch.equal(tower["text_projection"], torch.eye(32))
    for name in ("attn.out_proj.weight", "attn.out_proj.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"):
        assert not tower[f"transformer.resblocks.2.{name}"].any()

    ours = FrozenTextEncoder.from_clip(CLIPTokenizer.from_pretrained(str(sd2_dir / "tokenizer")),
                                       CLIPTextModel.from_pretrained(str(sd2_dir / "text_encoder")))
    ids = ours.tokenize([PROMPT, ""])
    last, penultimate = (OpenCLIPTextEncoder(open_clip_model, layer)(ids) for layer in ("last", "penultimate"))
    assert torch.equal(last, penultimate)  # block 2 adds exactly zero to the residual stream
    # open_clip's nn.MultiheadAttention and transformers' CLIP attention round differently: a few float32 ulps of
    # O(1) layer-normed values (measured 1e-6); a wrong block or a missing layer would differ by O(1)
    assert (penultimate - ours(ids)).abs().max().item() < 1e-5
    # and in transformers' own model, 3 layers from the same file: the directory's 2-layer model, exactly
    config = CLIPTextModel.from_pretrained(str(sd2_dir / "text_encoder")).config
    config.num_hidden_layers = 3
    full = CLIPTextModel(config).eval()
    full.load_state_dict(keys.open_clip_from_original(load_file(str(sd2_file)), 32), strict=True)
    with torch.no_grad():
        out = full(ids, output_hidden_states=True)
    assert torch.equal(out.hidden_states[-1], out.hidden_states[-2])
    assert torch.equal(out.last_hidden_state, ours(ids))


# ----------------------------------------------------------------------------------------------- (b) round trip
def _sd2_shaped_foreign_file(path: Path) -> dict[str, torch.Tensor]:
    """A small file in SD 2's original layout, no metadata: linear-projection U-Net, VAE, and open_clip's own text
    tower (3 blocks, a random last block and projection, logit_scale ln(1/0.07) as open_clip initialises it)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**UNET_PRESETS["sd21"], "block_out_channels": (32, 64), "layers_per_block": 1,
                                   "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                                   "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "attention_head_dim": 1},
                                cross_attention_dim=32, sample_size=8)
    vae = AutoencoderKL(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4)
    tower = tiny_open_clip_model(seed=3, width=32, layers=3, heads=2).state_dict()
    state = {**keys.unet_to_original(unet.state_dict(), unet.config),
             **keys.vae_to_original(vae.state_dict(), vae.config),
             **{P + k: v for k, v in tower.items() if not k.startswith("visual.")}}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return state


def test_file_directory_file_keeps_the_originals_last_block_projection_and_scale(tmp_path):
    original = _sd2_shaped_foreign_file(tmp_path / "sd2.safetensors")
    assert detect(tmp_path / "sd2.safetensors").family == "sd2"
    file_to_directory(tmp_path / "sd2.safetensors", tmp_path / "dir")
    kept = load_file(str(tmp_path / "dir" / "text_encoder" / EXTRA_FILE))
    tail = {k for k in _text_tower(original) if k.startswith("transformer.resblocks.2.")} | {"text_projection",
                                                                                              "logit_scale"}
    assert kept.keys() == tail and all(torch.equal(kept[k], original[P + k]) for k in tail)
    assert kept["logit_scale"].item() == pytest.approx(math.log(1 / 0.07))
    # the directory itself is diffusers' 2-block encoder; the kept file is not part of it
    assert CLIPTextModel.from_pretrained(str(tmp_path / "dir" / "text_encoder")).config.num_hidden_layers == 2
    directory_to_file(tmp_path / "dir", tmp_path / "again.safetensors")
    again = load_file(str(tmp_path / "again.safetensors"))
    assert again.keys() == original.keys()
    assert all(torch.equal(again[k], original[k]) and again[k].dtype == original[k].dtype for k in original)
    # a kept file that is not this encoder's is refused in one line, nothing written
    save_file({"transformer.resblocks.2.ln_1.weight": torch.ones(7)}, str(tmp_path / "dir" / "text_encoder" /
                                                                          EXTRA_FILE))
    with pytest.raises(UserError, match=r"'transformer.resblocks.2.ln_1.weight' \(7,\) is not one of this text "
                                        r"encoder's \(shape \(32,\)\).*remove it"):
        directory_to_file(tmp_path / "dir", tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()


def test_a_neutral_tail_is_not_written_to_a_directory(sd2_dir, sd2_file, tmp_path):
    file_to_directory(sd2_file, tmp_path / "back")
    assert sorted(p.name for p in (tmp_path / "back" / "text_encoder").iterdir()) == ["config.json",
                                                                                      "model.safetensors"]
    directory_to_file(tmp_path / "back", tmp_path / "again.safetensors")
    first, second = load_file(str(sd2_file)), load_file(str(tmp_path / "again.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


# ----------------------------------------------------------------------------------- (c) the same image, (d) quiet
def test_the_file_loads_without_warnings_and_gives_the_directorys_image(sd2_dir, sd2_file, caplog):
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_single_file(sd2_file, torch.device("cpu"), torch.float32)
        from_file = Pipeline.from_pretrained(sd2_file, device="cpu", dtype="fp32")
    assert [r.getMessage() for r in caplog.records] == [] and [str(w.message) for w in caught] == []
    assert loaded.text_encoder.model.config.num_hidden_layers == 2
    from_dir = Pipeline.from_pretrained(sd2_dir, device="cpu", dtype="fp32")
    args = dict(steps=3, cfg=7.5, sampler="ddim", seed=4, height=32, width=32, show_progress=False)
    assert np.array_equal(from_file(PROMPT, "", **args).decoded, from_dir(PROMPT, "", **args).decoded)


def test_diffusers_from_single_file_gives_the_directorys_image(sd2_dir, sd2_file, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    configs = tmp_path / "configs"  # no weights: every tensor comes from the file
    shutil.copytree(sd2_dir, configs, ignore=shutil.ignore_patterns("*.safetensors"))
    opts = dict(safety_checker=None, requires_safety_checker=False)
    single = StableDiffusionPipeline.from_single_file(str(sd2_file), config=str(configs), local_files_only=True,
                                                      **opts)
    directory = StableDiffusionPipeline.from_pretrained(str(sd2_dir), **opts)
    images = []
    for pipe in (single, directory):
        pipe.set_progress_bar_config(disable=True)
        images.append(pipe(PROMPT, num_inference_steps=3, guidance_scale=7.5, height=32, width=32,
                           generator=torch.Generator().manual_seed(4), output_type="np").images)
    assert np.array_equal(*images)
    assert json.loads((sd2_dir / "text_encoder" / "config.json").read_text())["num_hidden_layers"] == 2
