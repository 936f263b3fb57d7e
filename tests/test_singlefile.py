"""Single-file checkpoints: exact round trips, diffusers reads our files, SD-shaped foreign files, presets, bad files."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import infer_diffusers_model_type
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.errors import UserError
from ldm.models.spec import inspect_model
from ldm.pipeline.pipeline import Pipeline
from ldm.pipeline.samplers import make_scheduler
from ldm.singlefile import keys
from ldm.singlefile.detect import Detected, choose_prediction, detect, detect_shapes
from ldm.singlefile.load import load_unet_file, load_vae_override
from ldm.singlefile.save import directory_to_file, file_to_directory
from ldm.text.tiny import BOS_ID, EOS_ID
from ldm.unet.presets import UNET_PRESETS
from ldm.vae.presets import preset_kwargs

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPT = "a red circle"


@pytest.fixture(scope="module")
def tiny_dir(tiny_model):
    return tiny_model  # tests/conftest.py: written once per session, read-only


@pytest.fixture(scope="module")
def tiny_file(tiny_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("file") / "tiny.safetensors"
    directory_to_file(tiny_dir, path)
    return path


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*/*.safetensors")):
        out.update({f"{f.parent.name}/{k}": v for k, v in load_file(str(f)).items()})
    return out


def _configs(directory: Path) -> dict[str, dict]:
    drop = {"_name_or_path", "_diffusers_version", "transformers_version", "dtype", "architectures"}
    return {f"{f.parent.name}/{f.name}": {k: v for k, v in json.loads(f.read_text()).items() if k not in drop}
            for f in sorted(directory.glob("*/*config*.json"))}


# ------------------------------------------------------------------------------------------------------ round trips
def test_directory_file_directory_is_exact(tiny_dir, tiny_file, tmp_path):
    with safe_open(str(tiny_file), "pt") as f:
        names = list(f.keys())
    # the original layout's names, as A1111/ComfyUI files have them
    assert "model.diffusion_model.output_blocks.5.0.skip_connection.weight" in names
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in names
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in names
    back = tmp_path / "back"
    file_to_directory(tiny_file, back)
    ours, theirs = _tensors(tiny_dir), _tensors(back)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype for k in ours)
    assert _configs(tiny_dir) == _configs(back)
    # and file -> directory -> file gives the same tensors under the same names
    again = tmp_path / "again.safetensors"
    directory_to_file(back, again)
    first, second = load_file(str(tiny_file)), load_file(str(again))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def _configs_only(src: Path, dst: Path) -> Path:
    """A copy of `src` without any weights: diffusers must take every tensor from the single file."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    return dst


@pytest.mark.slow
def test_diffusers_from_single_file_reads_our_file_as_the_same_model(tiny_dir, tiny_file, tmp_path, monkeypatch):
    """The demo's case is tests/test_convert_cli.py (through both CLIs)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ref = StableDiffusionPipeline.from_single_file(str(tiny_file), config=str(_configs_only(tiny_dir, tmp_path / "c")),
                                                   local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    pipe = Pipeline.from_pretrained(tiny_file, device="cpu", dtype="fp32")
    ours = pipe(PROMPT, "", steps=3, cfg=7.5, sampler="dpmpp_2m", seed=4, height=32, width=32, show_progress=False)
    ref.scheduler = make_scheduler("dpmpp_2m", pipe.scheduler_config)
    theirs = ref(PROMPT, negative_prompt="", num_inference_steps=3, guidance_scale=7.5, height=32, width=32,
                 generator=[torch.Generator().manual_seed(4)], output_type="np").images
    assert np.abs(ours.decoded - theirs).max() <= 1e-5


# ------------------------------------------------------------------------------------- SD-shaped foreign files
def _clip(hidden: int, layers: int, act: str) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                        num_attention_heads=max(1, hidden // 64), hidden_act=act,
                                        projection_dim=hidden, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                                        pad_token_id=EOS_ID)).eval()


def _sd_shaped(family: str, in_channels: int = 4):
    """Small components in SD 1.5's (or 2.1's) exact structure: 4 levels, 2 blocks each, attention on the first
    three, 8 heads (SD 2: 64 channels per head, linear proj_in), VAE with 4 levels of 2 blocks."""
    torch.manual_seed(0)
    sd2 = family == "sd2"
    channels = (64, 64, 128, 128) if sd2 else (32, 32, 64, 64)
    unet = UNet2DConditionModel(**{**UNET_PRESETS["sd21" if sd2 else "sd15"], "block_out_channels": channels,
                                   "attention_head_dim": tuple(c // 64 for c in channels) if sd2 else 8},
                                in_channels=in_channels, out_channels=4, cross_attention_dim=64, sample_size=8)
    vae = AutoencoderKL(**{**preset_kwargs("sd-f8"), "block_out_channels": (32, 32, 32, 32)}, sample_size=64)
    # SD 2 files hold all of OpenCLIP's blocks; the model uses all but the last (the penultimate layer)
    text = _clip(64, 3 if sd2 else 2, "gelu" if sd2 else "quick_gelu")
    return unet, vae, text


def _write_foreign(path: Path, unet, vae, text, sd2: bool) -> Path:
    state = {**keys.unet_to_original(unet.state_dict(), unet.config),
             **keys.vae_to_original(vae.state_dict(), vae.config),
             **(keys.open_clip_to_original if sd2 else keys.clip_to_original)(text.state_dict())}
    # what real files also carry: EMA copies (LitEma's dot-less names), schedule buffers, CLIP's position ids
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.diffusion_modeltime_embed0weight"] = torch.zeros(3)
    state["alphas_cumprod"] = torch.linspace(1, 0, 1000)
    if not sd2:
        state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_an_sd_shaped_file_without_metadata_is_detected_and_loads_the_same_model(family, tmp_path, caplog):
    sd2 = family == "sd2"
    unet, vae, text = _sd_shaped(family)
    path = _write_foreign(tmp_path / f"{family}.safetensors", unet, vae, text, sd2)
    with caplog.at_level(logging.INFO, logger="ldm"):
        pipe = Pipeline.from_pretrained(path, device="cpu", dtype="fp32", prediction_type="epsilon")
    lines = [r.getMessage() for r in caplog.records]
    assert any(("Stable Diffusion 2.x" if sd2 else "Stable Diffusion 1.x") in m and "2 model_ema.* tensors" in m
               for m in lines)
    assert "prediction type: epsilon (--prediction-type)" in lines
    for ours, theirs in ((pipe.unet, unet), (pipe.vae, vae)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert pipe.unet.config.use_linear_projection == sd2 and pipe.vae.config.scaling_factor == 0.18215
    # native size: SD 2.x files are taken as 768-v models unless told otherwise
    spec = inspect_model(str(path))
    assert (spec.vae_factor, spec.default_size) == (8, 768 if sd2 else 512)
    assert inspect_model(str(path), prediction_type="epsilon").default_size == 512
    # the text encoder: SD 2 drops OpenCLIP's last block and pads with 0 as open_clip does
    got = pipe.text_encoder.model.state_dict()
    want = {k: v for k, v in text.state_dict().items() if not k.startswith("encoder.layers.2.")}
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    ids = pipe.text_encoder.tokenize([PROMPT])[0]
    assert ids[-1].item() == (0 if sd2 else EOS_ID)
    image = pipe(PROMPT, steps=2, cfg=7.5, sampler="ddim", seed=0, height=64, width=64, show_progress=False)
    assert image.decoded.shape == (1, 64, 64, 3) and np.isfinite(image.decoded).all()


def test_an_sd_shaped_inpainting_file_and_its_unet_for_stage_2(tmp_path):
    unet, vae, text = _sd_shaped("sd1", in_channels=9)
    path = _write_foreign(tmp_path / "inpaint.safetensors", unet, vae, text, sd2=False)
    d = detect(path)
    assert d.inpainting and "9-channel inpainting U-Net" in d.describe()
    trained = load_unet_file(path)  # model.pretrained=FILE
    assert trained.dtype == torch.float32 and all(p.requires_grad for p in trained.parameters())
    a, b = trained.state_dict(), unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------- real-sized presets
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_real_sized_presets_map_to_the_original_names_and_back(family):
    """SD 1.5 / 2.1 at full size on the meta device: every weight gets an original name (686 U-Net, 248 VAE, 196
    CLIP-L or 24 x 12 + 4 OpenCLIP-H tensors, the counts of the real files), diffusers' converters map every name
    back, diffusers' own detector calls it v1/v2, and detection from the shapes alone gives back the presets."""
    sd2 = family == "sd2"
    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET_PRESETS["sd21" if sd2 else "sd15"], cross_attention_dim=1024 if sd2
                                    else 768, sample_size=64)
        vae = AutoencoderKL(**preset_kwargs("sd-f8"))
        text = CLIPTextModel(CLIPTextConfig(hidden_size=1024 if sd2 else 768, intermediate_size=4096 if sd2 else 3072,
                                            num_hidden_layers=24 if sd2 else 12, num_attention_heads=16 if sd2 else 12,
                                            hidden_act="gelu" if sd2 else "quick_gelu"))
    u = keys.unet_to_original(unet.state_dict(), unet.config)
    v = keys.vae_to_original(vae.state_dict(), vae.config)
    t = (keys.open_clip_to_original if sd2 else keys.clip_to_original)(text.state_dict())
    assert (len(u), len(v), len(t)) == (686, 248, 24 * 12 + 4 if sd2 else 196)
    assert keys.unet_from_original(u, unet.config).keys() == unet.state_dict().keys()
    assert keys.vae_from_original(v, vae.config).keys() == vae.state_dict().keys()
    shapes = {k: tuple(x.shape) for k, x in {**u, **v, **t}.items()}
    fake = {k: type("T", (), {"shape": torch.Size(s)})() for k, s in shapes.items()}
    assert infer_diffusers_model_type(fake) == ("v2" if sd2 else "v1")
    d = detect_shapes(shapes, Path("real.safetensors"))
    for config, model in ((d.unet_config, unet), (d.vae_config, vae)):
        with torch.device("meta"):
            rebuilt = type(model).from_config(config)
        _same_config(rebuilt.config, model.config)
    assert d.text_config["num_hidden_layers"] == (23 if sd2 else 12)
    assert d.text_config["num_attention_heads"] == (16 if sd2 else 12)


def _same_config(a, b) -> None:
    skip = {"_use_default_values", "_class_name", "_diffusers_version", "sample_size"}
    norm = lambda c: {k: list(v) if isinstance(v, tuple) else v for k, v in c.items() if k not in skip}  # noqa: E731
    assert norm(a) == norm(b)


# --------------------------------------------------------------------------------------------------- prediction
def test_prediction_type_comes_from_the_flag_then_the_yaml_then_the_family(tmp_path):
    path = tmp_path / "sd21.safetensors"
    d = Detected(path, "sd2", {}, unet_config={"in_channels": 4})
    assert choose_prediction(d, None)[0] == "v_prediction" and "assumed" in choose_prediction(d, None)[1]
    (tmp_path / "sd21.yaml").write_text("model:\n  params:\n    parameterization: v\n")
    assert choose_prediction(Detected(path, "sd1", {}), None) == ("v_prediction", "sd21.yaml")
    (tmp_path / "sd21.yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
    assert choose_prediction(d, None) == ("epsilon", "sd21.yaml")
    assert choose_prediction(d, "v_prediction") == ("v_prediction", "--prediction-type")
    (tmp_path / "sd21.yaml").write_text("just text")
    with pytest.raises(UserError, match="cannot read .*sd21.yaml"):
        choose_prediction(d, None)
    (tmp_path / "sd21.yaml").write_text("model:\n  params: [1, 2]\n")  # not a mapping: no AttributeError
    with pytest.raises(UserError, match="cannot read .*sd21.yaml.*model.params is a list, not a mapping"):
        choose_prediction(d, None)


# ------------------------------------------------------------------------------------------------------------ --vae
def test_vae_swap_from_a_file_in_either_layout_or_a_directory(tiny_dir, tmp_path):
    vae_dir = tiny_dir / "vae"
    diffusers_names = load_file(str(vae_dir / "diffusion_pytorch_model.safetensors"))
    config = json.loads((vae_dir / "config.json").read_text())
    files = {"diffusers": diffusers_names, "bare": keys.vae_to_original(diffusers_names, config, prefix=""),
             "first_stage_model": keys.vae_to_original(diffusers_names, config)}
    sources = [vae_dir]
    for name, state in files.items():
        save_file(state, str(tmp_path / f"{name}.safetensors"))
        sources.append(tmp_path / f"{name}.safetensors")
    for source in sources:
        vae = load_vae_override(source, scaling_factor=0.3)
        got = vae.state_dict()
        assert got.keys() == diffusers_names.keys(), source
        assert all(torch.equal(got[k], diffusers_names[k]) for k in got), source
        assert vae.config.scaling_factor == (config["scaling_factor"] if source == vae_dir else 0.3)
    pipe = Pipeline.from_pretrained(tiny_dir, device="cpu", dtype="fp32", vae=sources[2])  # how --vae gets there
    assert all(torch.equal(v, diffusers_names[k]) for k, v in pipe.vae.state_dict().items())
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(UserError, match="is not a VAE file .*found lora_unet_x"):
        Pipeline.from_pretrained(tiny_dir, device="cpu", dtype="fp32", vae=tmp_path / "lora.safetensors")


# ------------------------------------------------------------------------------------------------------ bad files
def test_bad_files_are_one_clear_line(tiny_file, tmp_path):
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(UserError, match="pickle checkpoint, which is never loaded"):
        detect(pickle)
    with pytest.raises(UserError, match="pickle checkpoint, which is never loaded"):
        detect(tmp_path / "MODEL.CKPT")  # suffixes compare case-insensitively
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(tiny_file.read_bytes()[: tiny_file.stat().st_size // 2])
    with pytest.raises(UserError, match="is truncated: it has"):
        detect(truncated)
    unknown = tmp_path / "unknown.safetensors"
    save_file({"foo.bar.weight": torch.zeros(1), "foo.baz.weight": torch.zeros(1), "head": torch.zeros(1)},
              str(unknown))
    with pytest.raises(UserError, match=r"not a Stable Diffusion 1.x/2.x .*found foo.bar.\* \(1\), foo.baz.\* \(1\)"):
        detect(unknown)
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(1),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1, 4, 1, 1)}, str(sdxl))
    with pytest.raises(UserError, match="sdxl.safetensors': the text encoder weights are incomplete"):
        detect(sdxl)  # SDXL files load (tests/test_singlefile_sdxl.py); this one is damaged
    sd3 = tmp_path / "sd3.safetensors"
    save_file({"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": torch.zeros(9216),
               "model.diffusion_model.pos_embed": torch.zeros(1, 36864, 1)}, str(sd3))
    with pytest.raises(UserError, match="is a sd3 checkpoint .*not Stable Diffusion 1.x/2.x/XL"):
        detect(sd3)
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(1)}, str(lora))
    with pytest.raises(UserError, match="is a LoRA adapter, not a model: pass it with --lora"):
        detect(lora)
    vae_only = tmp_path / "vae.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(1)}, str(vae_only))
    with pytest.raises(UserError, match="holds a VAE but no U-Net .*pass it as --vae"):
        detect(vae_only)


def test_a_unet_only_file_needs_a_text_encoder_and_a_vae_to_generate(tmp_path):
    unet, _, _ = _sd_shaped("sd1")
    path = tmp_path / "unet.safetensors"
    save_file(keys.unet_to_original(unet.state_dict(), unet.config), str(path))
    with pytest.raises(UserError, match="holds no text encoder"):
        Pipeline.from_pretrained(path, device="cpu", dtype="fp32")
    assert load_unet_file(path).config.block_out_channels == (32, 32, 64, 64)
    state = load_file(str(path))
    del state["model.diffusion_model.middle_block.1.proj_out.weight"]
    save_file(state, str(path))
    with pytest.raises(UserError, match=r"the U-Net weights do not fit the detected layout \(missing 1 \(first: "
                                        r"mid_block.attentions.0.proj_out.weight\)\)"):
        load_unet_file(path)


# ---------------------------------------------------------------------------------------------------------- stage 2
@pytest.mark.slow
def test_stage_2_fine_tunes_the_unet_of_a_single_file(tmp_path, fresh_accelerate, capfd):
    import sys

    from ldm.unet.presets import build_unet
    from ldm.unet.tiny import write_tiny_stage2_inputs

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "train"))
    import train_ldm

    parts = write_tiny_stage2_inputs(tmp_path / "parts", num_images=16)
    torch.manual_seed(3)
    unet = build_unet("tiny", sample_size=16, latent_channels=4, cross_attention_dim=32)
    path = tmp_path / "base.safetensors"  # a foreign file: original names, no metadata
    save_file(keys.unet_to_original(unet.state_dict(), unet.config), str(path))
    out = tmp_path / "run"
    if True:  # the run's own log handlers write to stderr
        train_ldm.main(["--config", str(root / "configs/ldm/tiny.yaml"), f"train.output_dir={out}",
                        f"data.path={parts['data']}", f"cache.vae={parts['vae']}", f"text_encoder.path={parts['text']}",
                        "train.report_to=none", "sample.every=0", "train.max_steps=1", "train.batch_size=4",
                        "train.ema_decay=0", "optim.lr=1e-5", f"model.pretrained={path}"])
    assert "'base.safetensors': Stable Diffusion 1.x" in capfd.readouterr().err
    trained = load_file(str(out / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    start = unet.state_dict()
    # one AdamW step moves every weight by about lr (1e-5) at most: the run started from the file, not at random
    assert trained.keys() == start.keys()
    assert max((trained[k] - start[k]).abs().max().item() for k in start) < 1e-4
