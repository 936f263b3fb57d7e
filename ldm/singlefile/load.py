"""Build diffusers/transformers models from a single file, offline: configs from `detect`, weights renamed by
diffusers' own converters (ldm/singlefile/keys.py), loaded strictly (a missing or unexpected weight is an error).

Nothing is fetched: diffusers' `from_single_file` maps a detected family to a hub repository for its configs; here
they come from the file's metadata or the package's presets, and the tokenizer from open_clip's vocabulary.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ldm.errors import UserError
from ldm.models.components import Components
from ldm.singlefile import keys
from ldm.singlefile.detect import (
    SD_SCALING_FACTOR,
    Detected,
    choose_prediction,
    detect,
    read_header,
    vae_config_from_shapes,
)
from ldm.singlefile.sdxl import SDXL_SCALING_FACTOR, sdxl_family
from ldm.weights import read_safetensors

log = logging.getLogger(__name__)

# the SD 1.x scheduler (diffusers' default for single files); the prediction type is chosen per file
SD_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
                "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "clip_sample": False,
                "prediction_type": "epsilon"}


@dataclass
class LoadedFile(Components):
    detected: Detected | None = None  # what `detect` found in the file


def read_tensors(path: Path, prefixes: tuple[str, ...]) -> keys.State:
    """The tensors whose names start with one of `prefixes` (others, e.g. model_ema.*, are never read)."""
    return read_safetensors(path, lambda name: name.startswith(prefixes))[0]


def load_strict(model: torch.nn.Module, state: keys.State, what: str, path: Path) -> torch.nn.Module:
    """Load `state` into a model built on the meta device; every weight must be there and nothing else."""
    wanted = model.state_dict()
    expected = wanted.keys()
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        said = "; ".join(s for s in (f"missing {len(missing)} (first: {missing[0]})" if missing else "",
                                     f"unexpected {len(unexpected)} (first: {unexpected[0]})" if unexpected else "")
                         if s)
        raise UserError(f"'{path}': the {what} weights do not fit the detected layout ({said}); the file is "
                        "damaged or of another architecture")
    for key, value in state.items():
        if value.shape != wanted[key].shape:
            raise UserError(f"'{path}': the {what} weight '{key}' has shape {tuple(value.shape)}, the detected "
                            f"layout needs {tuple(wanted[key].shape)}")
    model.load_state_dict(state, strict=True, assign=True)
    return model


def build_unet(config: dict[str, Any], state: keys.State, path: Path):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights(include_buffers=False):
        model = UNet2DConditionModel.from_config(config)
    return load_strict(model, keys.unet_from_original(state, model.config), "U-Net", path)


def build_vae(config: dict[str, Any], state: keys.State, path: Path):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    with init_empty_weights(include_buffers=False):
        model = AutoencoderKL.from_config(config)
    return load_strict(model, keys.vae_from_original(state, model.config), "VAE", path)


def build_text_model(d: Detected, state: keys.State):
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig.from_dict(d.text_config)
    with init_empty_weights(include_buffers=False):
        model = CLIPTextModel(config)
    if d.text_layout == "clip":
        converted = keys.clip_from_original(state)
    else:
        # OpenCLIP's blocks past the ones SD 2.x uses (its last) are not part of the model
        converted = keys.open_clip_from_original(state, config.hidden_size, layers=config.num_hidden_layers)
    return load_strict(model, converted, "text encoder", d.path)


def text_encoder_from(d: Detected, model):
    from ldm.text.encoder import FrozenTextEncoder
    from ldm.text.tokenizer import offline_clip_tokenizer

    tokenizer = offline_clip_tokenizer()
    if "pad_token" in d.tokenizer and d.tokenizer["pad_token"] != tokenizer.pad_token:
        tokenizer.pad_token = d.tokenizer["pad_token"]
    if "model_max_length" in d.tokenizer:
        tokenizer.model_max_length = int(d.tokenizer["model_max_length"])
    layer = (d.text_info or {}).get("layer", "last")
    return FrozenTextEncoder.from_clip(tokenizer, model, layer=layer, pad_id=d.tokenizer.get("pad_id"))


def load_single_file(
    path: str | Path,
    device: torch.device,
    dtype: torch.dtype,
    vae: str | Path | None = None,
    prediction_type: str | None = None,
) -> LoadedFile:
    """U-Net, VAE (the file's, or `vae`: a VAE file or directory), text encoder and scheduler config; says in one
    line what was detected and in another which prediction type is used and why. SD 1.x/2.x files; SDXL files:
    load_sdxl.py."""
    d = detect(path)
    log.info("%s", d.describe())
    if d.sdxl:
        raise ValueError(f"'{path}' is an SDXL file: open it with ldm.singlefile.load_sdxl (ldm.models.load does)")
    prediction = generation_parts(d, d.text_config, "text encoder (cond_stage_model.*)", vae, prediction_type)
    unet_config = unet_config_for(d, prediction)
    prefixes = (keys.UNET_PREFIX, keys.CLIP_PREFIX if d.text_layout == "clip" else keys.OPEN_CLIP_PREFIX)
    if vae is None:
        prefixes += (keys.VAE_PREFIX,)
    # in the target dtype before loading (assign=True keeps it): diffusers warns about casting a built model
    state = cast_state(read_tensors(d.path, prefixes), dtype)
    unet = build_unet(unet_config, state, d.path)
    model_vae = build_vae(d.vae_config, state, d.path) if vae is None else load_vae_override(
        vae, (d.vae_config or {}).get("scaling_factor"), dtype)
    text = text_encoder_from(d, build_text_model(d, state))
    scheduler = dict(d.scheduler_config or SD_SCHEDULER)
    scheduler["prediction_type"] = prediction
    for module in (unet, model_vae, text):
        module.to(device).eval().requires_grad_(False)
    return LoadedFile(unet, model_vae, text, scheduler, str(path), d)


def generation_parts(d: Detected, text_config, text_what: str, vae, prediction_type: str | None) -> str:
    """Refuse a file without what generation needs (U-Net, text encoder(s), a VAE unless `vae` replaces it), in
    one line each; return the prediction type to use, logged with why."""
    if d.unet_config is None:
        raise UserError(f"'{d.path}' has no U-Net; pass a full checkpoint as --model")
    if text_config is None:
        raise UserError(f"'{d.path}' holds no {text_what}; this package needs it inside the file to generate (a "
                        "U-Net-only file can be fine-tuned with model.pretrained=FILE)")
    if d.vae_config is None and vae is None:
        raise UserError(f"'{d.path}' holds no VAE (first_stage_model.*): pass one with --vae FILE|DIR")
    prediction, source = choose_prediction(d, prediction_type)
    log.info("prediction type: %s (%s)", prediction, source)
    return prediction


def unet_config_for(d: Detected, prediction: str) -> dict[str, Any]:
    config = dict(d.unet_config or {})
    if d.family == "sd2" and prediction == "v_prediction":
        config["sample_size"] = 96  # SD 2.x 768-v models: 768 px (64 x 8 = 512 for the others)
    return config


def load_unet_file(path: str | Path):
    """Stage 2's `model.pretrained=FILE`: only the U-Net (model.diffusion_model.*), in fp32, trainable."""
    d = detect(path)
    log.info("%s", d.describe())
    if d.unet_config is None:
        raise UserError(f"model.pretrained '{path}' has no U-Net (model.diffusion_model.*)")
    return build_unet(d.unet_config, cast_state(read_tensors(d.path, (keys.UNET_PREFIX,)), torch.float32), d.path)


# ---------------------------------------------------------------------------------------------------------- --vae
def check_vae_source(source: str | Path) -> None:
    """`--vae` checked before any model is loaded: an existing directory's files, or a file's header."""
    path = Path(source).expanduser()
    if path.is_dir():
        from ldm.vae.load_vae import check_vae

        check_vae(path)
    elif path.is_file():
        read_header(path)
    else:
        raise UserError(f"--vae '{source}' does not exist: pass a VAE .safetensors file or a diffusers VAE directory")


def load_vae_override(source: str | Path, scaling_factor: float | None, dtype: torch.dtype = torch.float32,
                      sdxl: bool | None = None):
    """`--vae`: a diffusers VAE directory, or a VAE file in the original layout (`first_stage_model.*` or bare
    `encoder.*`/`decoder.*`, as `vae-ft-mse-840000-ema-pruned.safetensors`) or in diffusers' names.

    A file without our metadata keeps the model's latent scale (`scaling_factor`): a swapped VAE is a fine-tuned
    decoder of the same latent space, so the U-Net's scale stays right. SD's and SDXL's VAEs have the same
    architecture (the shapes cannot tell them apart) but different latent spaces: a VAE whose family is known (a
    diffusers config's or our metadata's scaling factor, or an SDXL checkpoint's names) and is not the model's is
    refused; a bare VAE file says nothing about its family and is accepted. `sdxl`: the model's family (None:
    from `scaling_factor`)."""
    path = Path(source).expanduser()
    if sdxl is None:
        sdxl = scaling_factor == SDXL_SCALING_FACTOR
    if path.is_dir():
        from ldm.vae.load_vae import load_vae

        vae = load_vae(path)
        _check_family(path, vae.config.scaling_factor == SDXL_SCALING_FACTOR, sdxl, "its config's scaling factor")
        return vae if dtype == torch.float32 else vae.to(dtype)
    if not path.is_file():
        raise UserError(f"--vae '{source}' does not exist: pass a VAE .safetensors file or a diffusers VAE directory")
    shapes, meta = read_header(path)
    if "ldm" in meta:  # one of our files: its own VAE and config
        d = detect(path)
        if d.vae_config is None:
            raise UserError(f"--vae '{path}' holds no VAE")
        _check_family(path, d.vae_config.get("scaling_factor") == SDXL_SCALING_FACTOR, sdxl,
                      "its metadata's scaling factor")
        return build_vae(d.vae_config, cast_state(read_tensors(path, (keys.VAE_PREFIX,)), dtype), path)
    if sdxl_family(shapes) is not None:  # a whole SDXL checkpoint given for its VAE
        _check_family(path, True, sdxl, "its text encoders and U-Net")
    prefix = keys.VAE_PREFIX if any(k.startswith(keys.VAE_PREFIX) for k in shapes) else ""
    names = [k[len(prefix):] for k in shapes if k.startswith(prefix)]
    if any(k.startswith("encoder.down_blocks.") for k in names):  # diffusers' names: rename to the original first
        levels = len({k.split(".")[2] for k in names if k.startswith("encoder.down_blocks.")})
        state = {k[len(prefix):]: v for k, v in read_tensors(path, (prefix,)).items()}
        state = keys.vae_to_original(state, {"block_out_channels": [0] * levels}, prefix="")
    elif any(k.startswith("encoder.down.") for k in names):
        state = {k[len(prefix):]: v for k, v in read_tensors(path, (prefix + "encoder.", prefix + "decoder.",
                                                                     prefix + "quant_conv.",
                                                                     prefix + "post_quant_conv.")).items()}
    else:
        families = sorted({k.split(".")[0] for k in shapes})[:6]
        raise UserError(f"--vae '{path}' is not a VAE file (no encoder.down.* or encoder.down_blocks.* weights; "
                        f"found {', '.join(families) or 'no tensors'})")
    config = vae_config_from_shapes({k: tuple(v.shape) for k, v in state.items()}, path)
    config["scaling_factor"] = scaling_factor or (SDXL_SCALING_FACTOR if sdxl else SD_SCALING_FACTOR)
    log.info("VAE from '%s' (%s layout, scaling factor %.5f)", path.name,
             "diffusers" if any(k.startswith("encoder.down_blocks.") for k in names) else "original",
             config["scaling_factor"])
    return build_vae(config, cast_state(state, dtype), path)


def _check_family(path: Path, vae_sdxl: bool, model_sdxl: bool, how: str) -> None:
    if vae_sdxl != model_sdxl:
        which = ("an SDXL VAE", "an SD 1.x/2.x model") if vae_sdxl else ("an SD 1.x/2.x VAE", "an SDXL model")
        raise UserError(f"--vae '{path}' is {which[0]} ({how}) and the model is {which[1]}: their latent spaces "
                        "differ; pass a VAE of the model's family")


def cast_state(state: keys.State, dtype: torch.dtype) -> keys.State:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
