"""SDXL single files (base, refiner, 9-channel inpainting): detection, exact round trips, full-size presets, diffusers
reads our files as the same model, foreign files without metadata, bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import infer_diffusers_model_type
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ldm.convert import main as convert_main
from ldm.errors import UserError
from ldm.models.spec import inspect_model
from ldm.pipeline.pipeline import Pipeline
from ldm.singlefile import keys
from ldm.singlefile.detect import detect, detect_shapes
from ldm.singlefile.load import load_unet_file, load_vae_override
from ldm.singlefile.load_sdxl import load_sdxl_modules
from ldm.singlefile.save import directory_to_file, file_to_directory
from ldm.singlefile.sdxl import BIGG, CLIP_L, SDXL_SCHEDULER
from ldm.text.sdxl import SDXLTextEncoder
from ldm.unet.presets import UNET_PRESETS
from ldm.vae.presets import preset_kwargs

pytestmark = pytest.mark.usefixtures("one_torch_thread")
KINDS = {"base": "tiny_sdxl_model", "refiner": "tiny_sdxl_refiner", "inpaint": "tiny_sdxl_inpaint_model"}


@pytest.fixture(scope="module")
def files(request, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """kind -> (the tiny diffusers directory, our single file of it)."""
    out = {}
    for kind, fixture in KINDS.items():
        directory = request.getfixturevalue(fixture)  # tests/conftest.py: once per session, read-only
        path = tmp_path_factory.mktemp("sdxl") / f"{kind}.safetensors"
        directory_to_file(directory, path)
        out[kind] = (directory, path)
    return out


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*/*.safetensors")):
        out.update({f"{f.parent.name}/{k}": v for k, v in load_file(str(f)).items()})
    return out


def _configs(directory: Path) -> dict[str, dict]:
    drop = {"_name_or_path", "_diffusers_version", "transformers_version", "dtype", "architectures"}
    return {str(f.relative_to(directory)): {k: v for k, v in json.loads(f.read_text()).items() if k not in drop}
            for f in sorted([*directory.glob("*/*.json"), directory / "model_index.json"])}


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x, y = a.state_dict(), b.state_dict()
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) and x[k].dtype == y[k].dtype for k in x)


# -------------------------------------------------------------------------------------------------------- detection
def test_each_kind_is_detected_and_described_in_one_line(files):
    base, refiner, inpaint = (detect(files[k][1]) for k in ("base", "refiner", "inpaint"))
    assert (base.family, refiner.family, inpaint.family) == ("sdxl", "sdxl-refiner", "sdxl")
    assert base.describe() == ("'base.safetensors': Stable Diffusion XL (CLIP ViT-L + OpenCLIP ViT-bigG text "
                               "encoders), an ldm-convert file (configs in its metadata); holds U-Net, VAE, 2 text "
                               "encoders (4-channel U-Net, channels [32, 64])")
    assert refiner.describe().startswith("'refiner.safetensors': Stable Diffusion XL refiner (OpenCLIP ViT-bigG text "
                                         "encoder, aesthetic-score conditioning)")
    assert "holds U-Net, VAE, text encoder (" in refiner.describe()
    assert not base.inpainting and inpaint.inpainting and "9-channel inpainting U-Net" in inpaint.describe()
    assert refiner.text_config is None and refiner.pipeline["requires_aesthetics_score"] is True
    assert base.pipeline == {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True}
    assert base.tokenizer_2["pad_token"] == "!" and base.tokenizer["pad_token"] == "<|endoftext|>"
    with safe_open(str(files["base"][1]), "pt") as f:  # Stability's names, as A1111/ComfyUI files have them
        names = set(f.keys())
    assert {"model.diffusion_model.label_emb.0.0.weight", "conditioner.embedders.1.model.text_projection",
            "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
            "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
            "first_stage_model.decoder.mid.attn_1.q.weight"} <= names
    with safe_open(str(files["refiner"][1]), "pt") as f:
        refiner_names = list(f.keys())
    assert any(k.startswith("conditioner.embedders.0.model.") for k in refiner_names)
    spec = inspect_model(str(files["refiner"][1]))
    assert (spec.family, spec.arch, spec.parts, spec.prediction_type, spec.force_zeros_for_empty_prompt) == (
        "sdxl-refiner", "sdxl-refiner", ("unet", "vae", "text_encoder_2"), "epsilon", False)
    spec = inspect_model(str(files["base"][1]))
    assert (spec.arch, spec.parts, spec.force_zeros_for_empty_prompt, spec.default_size) == (
        "sdxl", ("unet", "vae", "text_encoder", "text_encoder_2"), True, 64)
    assert spec.scheduler_config["_class_name"] == "EulerDiscreteScheduler"


# ------------------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_directory_file_directory_is_exact(files, kind, tmp_path, capsys):
    directory, path = files[kind]
    back = tmp_path / "back"
    assert run(convert_main, [str(path), str(back)], capsys)[:2] == (0, [str(back)])  # ldm-convert FILE DIR
    ours, theirs = _tensors(directory), _tensors(back)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype for k in ours)
    assert _configs(directory) == _configs(back)  # every component's config, both tokenizers and model_index.json
    again = tmp_path / "again.safetensors"
    directory_to_file(back, again)
    first, second = load_file(str(path)), load_file(str(again))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.slow  # the base's code path; only the channels and the pipeline class differ
def test_the_inpainting_model_round_trips_with_its_pipeline_class(files, tmp_path):
    directory, path = files["inpaint"]
    file_to_directory(path, tmp_path / "back")
    assert _configs(directory) == _configs(tmp_path / "back")
    assert json.loads((tmp_path / "back" / "model_index.json").read_text())["_class_name"] == \
        "StableDiffusionXLInpaintPipeline"


# --------------------------------------------------------------------------------------------- full-size presets
def _full_size(family: str, in_channels: int = 4):
    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET_PRESETS[family], cross_attention_dim=2048 if family == "sdxl" else 1280,
                                    in_channels=in_channels, out_channels=4, sample_size=128)
        vae = AutoencoderKL(**preset_kwargs("sdxl-f8"), sample_size=1024)
        clip = CLIPTextModel(CLIPTextConfig(**CLIP_L)) if family == "sdxl" else None
        bigg = CLIPTextModelWithProjection(CLIPTextConfig(**BIGG))
    return unet, vae, clip, bigg


@pytest.mark.parametrize("family", ["sdxl", "sdxl-refiner"])
def test_full_size_presets_map_every_key_both_ways(family):
    """SDXL base / refiner at full size on the meta device: every weight gets an original name (1680 U-Net, 1220 for
    the refiner; 248 VAE; 196 CLIP-L; 32 x 12 + 5 bigG), diffusers' readers map every name back, diffusers' own
    detector calls the file xl_base / xl_refiner / xl_inpaint, and detection from the shapes gives the presets."""
    unet, vae, clip, bigg = _full_size(family)
    assert sum(p.numel() for p in unet.parameters()) == (2_567_463_684 if family == "sdxl" else 2_259_526_660)
    bigg_prefix = keys.SDXL_BIGG_PREFIX if family == "sdxl" else keys.SDXL_REFINER_BIGG_PREFIX
    u = keys.unet_to_original(unet.state_dict(), unet.config)
    v = keys.vae_to_original(vae.state_dict(), vae.config)
    c = keys.clip_to_original(clip.state_dict(), keys.SDXL_CLIP_PREFIX) if clip is not None else {}
    g = keys.open_clip_to_original(bigg.state_dict(), bigg_prefix)
    assert (len(u), len(v), len(c), len(g)) == ((1680 if family == "sdxl" else 1220), 248,
                                                196 if clip is not None else 0, 32 * 12 + 5)
    assert g[bigg_prefix + "text_projection"].shape == (1280, 1280)
    assert keys.unet_from_original(u, unet.config).keys() == unet.state_dict().keys()
    assert keys.vae_from_original(v, vae.config).keys() == vae.state_dict().keys()
    if clip is not None:
        assert keys.clip_from_original(c, keys.SDXL_CLIP_PREFIX).keys() == clip.state_dict().keys()
    back = keys.open_clip_from_original(g, 1280, bigg_prefix, projection=True)
    assert back.keys() == {k.removeprefix("text_model.") for k in bigg.state_dict()}
    shapes = {k: tuple(x.shape) for k, x in {**u, **v, **c, **g}.items()}
    fake = {k: type("T", (), {"shape": torch.Size(s)})() for k, s in shapes.items()}
    assert infer_diffusers_model_type(fake) == ("xl_base" if family == "sdxl" else "xl_refiner")
    d = detect_shapes(shapes, Path("real.safetensors"))
    assert d.family == family and not d.inpainting
    for config, model in ((d.unet_config, unet), (d.vae_config, vae)):
        with torch.device("meta"):
            rebuilt = type(model).from_config(config)
        _same_config(rebuilt.config, model.config)
    assert d.vae_config["scaling_factor"] == 0.13025 and d.scheduler_config == SDXL_SCHEDULER
    assert {k: d.text_config_2[k] for k in BIGG} == BIGG
    if clip is not None:
        assert {k: d.text_config[k] for k in CLIP_L} == CLIP_L


def test_full_size_inpainting_shapes_are_sdxl_with_nine_channels():
    unet, _, clip, bigg = _full_size("sdxl", in_channels=9)
    shapes = {k: tuple(x.shape) for k, x in {**keys.unet_to_original(unet.state_dict(), unet.config),
                                             **keys.clip_to_original(clip.state_dict(), keys.SDXL_CLIP_PREFIX),
                                             **keys.open_clip_to_original(bigg.state_dict(), keys.SDXL_BIGG_PREFIX),
                                             }.items()}
    fake = {k: type("T", (), {"shape": torch.Size(s)})() for k, s in shapes.items()}
    assert infer_diffusers_model_type(fake) == "xl_inpaint"
    d = detect_shapes(shapes, Path("inpaint.safetensors"))
    assert (d.family, d.inpainting, d.pipeline["_class_name"]) == ("sdxl", True, "StableDiffusionXLInpaintPipeline")
    assert "holds U-Net, 2 text encoders (9-channel inpainting U-Net, channels [320, 640, 1280])" in d.describe()


def _same_config(a, b) -> None:
    skip = {"_use_default_values", "_class_name", "_diffusers_version"}

    def norm(c):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in c.items() if k not in skip}

    assert norm(a) == norm(b)


# ---------------------------------------------------------------------------------------- foreign files (no metadata)
def _write_foreign(directory: Path, path: Path):
    """The tiny model under Stability's names only, with what real files also carry (CLIP-L's position ids, a
    logit scale, a schedule buffer); no `ldm` metadata."""
    pipe = DiffusionPipeline.from_pretrained(str(directory))  # the class model_index.json names
    refiner = pipe.text_encoder is None
    bigg_prefix = keys.SDXL_REFINER_BIGG_PREFIX if refiner else keys.SDXL_BIGG_PREFIX
    state = {**keys.unet_to_original(pipe.unet.state_dict(), pipe.unet.config),
             **keys.vae_to_original(pipe.vae.state_dict(), pipe.vae.config),
             **keys.open_clip_to_original(pipe.text_encoder_2.state_dict(), bigg_prefix),
             bigg_prefix + "logit_scale": torch.tensor(4.6), "alphas_cumprod": torch.linspace(1, 0, 1000)}
    if not refiner:
        state.update(keys.clip_to_original(pipe.text_encoder.state_dict(), keys.SDXL_CLIP_PREFIX))
        state[keys.SDXL_CLIP_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return pipe, path


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_a_foreign_sdxl_file_is_detected_by_names_and_shapes_and_loads_the_same_weights(files, kind, tmp_path):
    pipe, path = _write_foreign(files[kind][0], tmp_path / f"{kind}.safetensors")
    d = detect(path)
    assert d.family == ("sdxl" if kind == "base" else "sdxl-refiner") and not d.from_metadata
    assert "an ldm-convert file" not in d.describe()
    # sizes read from the shapes: the micro-conditioning (6 or 5 time ids x 8 + pooled 32) and per-level depth
    assert d.unet_config["addition_time_embed_dim"] == 8
    assert d.unet_config["projection_class_embeddings_input_dim"] == (80 if kind == "base" else 72)
    assert d.unet_config["cross_attention_dim"] == (64 if kind == "base" else 32)
    assert d.vae_config["scaling_factor"] == 0.13025 and d.text_config_2["num_hidden_layers"] == 3
    m = load_sdxl_modules(d, torch.device("cpu"), torch.float32)
    assert _same_state(m.unet, pipe.unet) and _same_state(m.vae, pipe.vae)
    assert _same_state(m.text_encoder_2, pipe.text_encoder_2)
    assert (m.text_encoder is None) == (kind == "refiner")
    if m.text_encoder is not None:
        assert _same_state(m.text_encoder, pipe.text_encoder)
    assert m.scheduler_config["prediction_type"] == "epsilon" and m.tokenizer_2.pad_token == "!"
    ids = m.tokenizer_2("a red circle", padding="max_length", max_length=77).input_ids
    assert ids[-1] == 0  # bigG pads with id 0, as open_clip does
    with pytest.raises(UserError, match="is an SDXL VAE .its text encoders and U-Net. and the model is an SD 1.x/2.x"):
        load_vae_override(path, 0.18215)  # a whole SDXL checkpoint as an SD model's --vae


# ---------------------------------------------------------------------------------------------------- bad inputs
def test_bad_sdxl_inputs_are_one_clear_line(files, tiny_model, tmp_path):
    # a truncated file
    data = files["base"][1].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as e:
        detect(cut)
    assert "cut.safetensors" in str(e.value) and "\n" not in str(e.value)
    # an SDXL file without its bigG text encoder
    state = {k: v for k, v in load_file(str(files["base"][1])).items() if not k.startswith(keys.SDXL_BIGG_PREFIX)}
    save_file(state, str(tmp_path / "nobigg.safetensors"))
    with pytest.raises(UserError, match="without its OpenCLIP ViT-bigG text encoder"):
        detect(tmp_path / "nobigg.safetensors")
    # an SDXL inpainting checkpoint given as the VAE of an SD 1.x model, and SD's VAE for an SDXL model
    with pytest.raises(UserError) as e:
        load_vae_override(files["inpaint"][1], 0.18215)
    assert "is an SDXL VAE" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="is an SD 1.x/2.x VAE .its config's scaling factor. and the model is an SDXL"):
        load_vae_override(tiny_model / "vae", 0.13025)
    # a damaged micro-conditioning embedding (in-features that no number of time ids explains)
    state = load_file(str(files["refiner"][1]))
    state["model.diffusion_model.label_emb.0.0.weight"] = state["model.diffusion_model.label_emb.0.0.weight"][:, :71].clone()
    save_file(state, str(tmp_path / "adm.safetensors"))
    with pytest.raises(UserError, match="label_emb takes 71 features"):
        detect(tmp_path / "adm.safetensors")
    # stage 2's model.pretrained: an SDXL file's U-Net alone, trainable (tests/test_train_sdxl.py fine-tunes one)
    unet = load_unet_file(files["base"][1])
    assert unet.config.addition_embed_type == "text_time" and unet.dtype == torch.float32


def test_an_sdxl_vae_swap_keeps_sdxl_latent_scale(files, tmp_path):
    """A bare VAE file (original names, no family in it) is accepted and gets the model's latent scale."""
    vae_state = {k.removeprefix(keys.VAE_PREFIX): v for k, v in load_file(str(files["base"][1])).items()
                 if k.startswith(keys.VAE_PREFIX)}
    save_file(vae_state, str(tmp_path / "sdxl_vae.safetensors"))
    vae = load_vae_override(tmp_path / "sdxl_vae.safetensors", 0.13025)
    assert vae.config.scaling_factor == 0.13025
    assert load_vae_override(files["refiner"][1], 0.13025).config.scaling_factor == 0.13025  # its own, same family


# ---------------------------------------------------------------------------------------------- diffusers reads ours
def _widened(directory: Path, out: Path) -> Path:
    """The tiny base with a 48-wide first text encoder (and a U-Net of context 48 + 32). diffusers' from_single_file
    tells SDXL's two text encoders apart by width (768 vs 1280 in real files): with the tiny model's two 32-wide
    towers it loads CLIP-L's weights into text_encoder_2 as well, whoever wrote the file."""
    pipe = StableDiffusionXLPipeline.from_pretrained(str(directory))
    torch.manual_seed(1)
    config = CLIPTextConfig.from_dict({**pipe.text_encoder.config.to_dict(), "hidden_size": 48,
                                       "projection_dim": 48})
    pipe.text_encoder = CLIPTextModel(config)
    pipe.unet = UNet2DConditionModel.from_config({**pipe.unet.config, "cross_attention_dim": 80})
    pipe.register_modules(text_encoder=pipe.text_encoder, unet=pipe.unet)
    pipe.save_pretrained(str(out), safe_serialization=True)
    return out


def _realign(pipe) -> None:
    """Every weight copied to fresh memory. The same values at another address can compute differently on the CPU:
    from_pretrained's weights lie in the memory-mapped file at any byte offset (24 mod 64 for the bigG projection
    here), and a small matmul (pooled (1, 32) @ (32, 32)) with that weight differs from one with its aligned copy
    by 2.4e-7 (measured; `F.linear(x, w)` vs `F.linear(x, w.clone())`), which is the arithmetic, not the file."""
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        for tensor in getattr(pipe, name).state_dict(keep_vars=True).values():
            tensor.data = tensor.data.clone()


@pytest.mark.slow
def test_diffusers_from_single_file_reads_our_file_as_the_same_model(files, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    directory = _widened(files["base"][0], tmp_path / "wide")
    path = tmp_path / "wide.safetensors"
    directory_to_file(directory, path)
    configs = tmp_path / "configs"  # no weights: diffusers must take every tensor from the single file
    shutil.copytree(directory, configs, ignore=shutil.ignore_patterns("*.safetensors"))
    ref = StableDiffusionXLPipeline.from_pretrained(str(directory))
    got = StableDiffusionXLPipeline.from_single_file(str(path), config=str(configs), local_files_only=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert _same_state(getattr(got, name), getattr(ref, name)), name
    call = {"prompt": "a red circle", "num_inference_steps": 2, "height": 64, "width": 64, "output_type": "np"}
    for pipe in (ref, got):
        pipe.set_progress_bar_config(disable=True)
        _realign(pipe)
    a = ref(**call, generator=torch.Generator().manual_seed(0)).images
    b = got(**call, generator=torch.Generator().manual_seed(0)).images
    assert a.shape == (1, 64, 64, 3) and np.abs(a - b).max() == 0


# ---------------------------------------------------------------------------------------------- our pipeline opens it
def _open(files, which: int) -> Pipeline:
    """The base with its refiner, from our files (which=1) or from the diffusers directories (which=0)."""
    base, refiner = inspect_model(str(files["base"][which])), inspect_model(str(files["refiner"][which]))
    return Pipeline.open(base, "cpu", "fp32", refiner=refiner)


def test_our_pipeline_opens_the_files_as_the_same_models_as_the_directories(files, caplog):
    with caplog.at_level("INFO", logger="ldm"):
        ours = _open(files, 1)
    assert any("Stable Diffusion XL refiner" in r.getMessage() for r in caplog.records)
    theirs = _open(files, 0)
    assert (ours.arch, ours.refiner.arch) == (theirs.arch, theirs.refiner.arch) == ("sdxl", "sdxl-refiner")
    for a, b in ((ours, theirs), (ours.refiner, theirs.refiner)):
        assert isinstance(a.text_encoder, SDXLTextEncoder)
        assert a.text_encoder.force_zeros_for_empty_prompt == b.text_encoder.force_zeros_for_empty_prompt
        assert a.scheduler_config == {**b.scheduler_config, "prediction_type": "epsilon"}
        for name in ("unet", "vae", "text_encoder"):
            assert _same_state(getattr(a, name), getattr(b, name)), name
    images = []  # the same images, bit for bit, base then refiner (weights realigned: see _realign)
    for pipe in (ours, theirs):
        for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.refiner.unet, pipe.refiner.text_encoder):
            for tensor in module.state_dict(keep_vars=True).values():
                tensor.data = tensor.data.clone()
        result = pipe("a red circle", steps=4, cfg=5.0, sampler="euler", seed=3, refiner=pipe.refiner.model_name,
                      show_progress=False)
        assert result.params[0].refiner == pipe.refiner.model_name
        images.append(result.decoded)
    assert images[0].shape == (1, 64, 64, 3) and np.abs(images[0] - images[1]).max() == 0
