"""Load what a `ModelSpec` describes, safetensors only (never unpickle): the parts for inference, or the U-Net alone
for training (`model.pretrained`), with the same checks either way."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from ldm.errors import UserError
from ldm.models.components import Components
from ldm.models.spec import ModelSpec
from ldm.singlefile.load import load_single_file, load_unet_file, load_vae_override
from ldm.vae.load_vae import vae_factor

log = logging.getLogger(__name__)


def load_components(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> Components:
    """U-Net, VAE (the spec's `vae` when given), text encoder and scheduler config, on `device` in `dtype`."""
    if spec.single_file and spec.arch != "sd":
        from ldm.singlefile.load_sdxl import load_sdxl_modules, sdxl_components

        d = spec.detected
        log.info("%s", d.describe())
        modules = load_sdxl_modules(d, device, dtype, spec.vae, spec.prediction_override)
        return sdxl_components(modules, spec.name, d)
    if spec.single_file:
        loaded = load_single_file(spec.root, device, dtype, vae=spec.vae, prediction_type=spec.prediction_override)
        loaded.name = spec.name
        return loaded
    components = _load_directory(spec, device, dtype)
    if spec.vae is not None:
        scale = components.vae.config.scaling_factor
        components.vae = load_vae_override(spec.vae, scale, dtype).to(device).eval().requires_grad_(False)
    log.info("prediction type: %s (%s)", spec.prediction_type, spec.prediction_source)
    return components


def load_vae_for(own, source: str | Path, name: str, device: torch.device, dtype: torch.dtype) -> AutoencoderKL:
    """The VAE `source` (as --vae: a VAE .safetensors file or a diffusers VAE directory, `load_vae_override`) for
    the model whose VAE is `own`, on `device` in `dtype`, called `name` in messages; checked by `check_latent_space`
    (a file that does not say its scale takes `own`'s, as with --vae)."""
    vae = load_vae_override(source, own.config.scaling_factor, dtype)
    check_latent_space(vae.config, own.config, name)
    return vae.to(device).eval().requires_grad_(False)


def check_latent_space(vae_config: Mapping[str, Any], model_vae_config: Mapping[str, Any], name: str) -> None:
    """A VAE replacing a model's must share its latent space (channels, pixels per latent pixel, scaling and shift
    factor: the U-Net's latents are in it), else a one-line `UserError` naming `name`. Configs as diffusers'
    AutoencoderKL has them (a config.json's dict, or a loaded VAE's `config`)."""
    theirs, mine = _latent_space(vae_config), _latent_space(model_vae_config)
    if theirs != mine:
        raise UserError(f"VAE '{name}' does not fit this model: its latents are {_describe(theirs)}, the model's "
                        f"are {_describe(mine)}; pick a VAE made for this model's family")


def _latent_space(config: Mapping[str, Any]) -> tuple[int, int, float, float]:
    # diffusers' AutoencoderKL defaults for keys a config leaves out
    scale, shift = float(config.get("scaling_factor") or 0.18215), float(config.get("shift_factor") or 0.0)
    return int(config.get("latent_channels", 4)), vae_factor(config), round(scale, 6), round(shift, 6)


def _describe(space: tuple[int, int, float, float]) -> str:
    channels, factor, scale, shift = space
    return f"{channels} channels at 1/{factor} size, scaling factor {scale:g}" + (f", shift {shift:g}" if shift else "")


def load_unet(spec: ModelSpec) -> UNet2DConditionModel:
    """Training's `model.pretrained`: the U-Net alone, fp32 and trainable (a single file may hold only a U-Net)."""
    if spec.single_file:
        return load_unet_file(spec.root)
    return _load(spec, "unet", lambda: UNet2DConditionModel.from_pretrained(
        spec.root, subfolder="unet", use_safetensors=True, variant=spec.variants.get("unet")))


def load_sdxl_text_encoder(spec: ModelSpec, dtype: torch.dtype = torch.float32):
    """Training's SDXL text towers (`text_encoder.kind=sdxl`): an SDXL base model's `SDXLTextEncoder`, frozen, in
    `dtype` on the CPU, with the model's `force_zeros_for_empty_prompt`."""
    if spec.arch != "sdxl":
        raise UserError(f"'{spec.name}' is {spec.kind}, not an SDXL base model: text_encoder.kind=sdxl takes the two "
                        "text towers of an SDXL base model (a diffusers directory with text_encoder_2/)")
    if spec.single_file:  # its towers come with the rest of the file
        return load_components(spec, torch.device("cpu"), dtype).text_encoder
    return _sdxl_text_encoder(spec, dtype)


def _load(spec: ModelSpec, what: str, fn):
    try:
        return fn()
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load {what} from '{spec.root / what}': {first}") from None


def _load_directory(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> Components:
    root, variants = spec.root, spec.variants
    unet = _load(spec, "unet", lambda: UNet2DConditionModel.from_pretrained(
        root, subfolder="unet", use_safetensors=True, variant=variants["unet"], torch_dtype=dtype))
    vae = _load(spec, "vae", lambda: AutoencoderKL.from_pretrained(
        root, subfolder="vae", use_safetensors=True, variant=variants["vae"], torch_dtype=dtype))
    if spec.arch != "sd":
        text_encoder = _sdxl_text_encoder(spec, dtype)
        for module in (unet, vae, text_encoder):
            module.to(device).eval().requires_grad_(False)
        return Components(unet, vae, text_encoder, dict(spec.scheduler_config), spec.name)
    info = spec.text_info or {}
    layer = info.get("layer", "last")
    if info.get("kind", "clip") == "clip":
        from transformers import CLIPTextModel, CLIPTokenizer

        from ldm.text.encoder import FrozenTextEncoder

        tokenizer = _load(spec, "tokenizer", lambda: CLIPTokenizer.from_pretrained(root / "tokenizer"))
        clip = _load(spec, "text_encoder", lambda: CLIPTextModel.from_pretrained(
            root / "text_encoder", use_safetensors=True, variant=variants["text_encoder"], dtype=dtype))
        text_encoder = FrozenTextEncoder.from_clip(tokenizer, clip, layer=layer)
    else:
        from ldm.text.config import TextEncoderConfig
        from ldm.text.load_encoder import load_text_encoder

        cfg = TextEncoderConfig(kind=info["kind"], path=info.get("path", ""), pretrained=info.get("pretrained"),
                                layer=layer)
        text_encoder = load_text_encoder(cfg, dtype=dtype, device=device)
    for module in (unet, vae, text_encoder):
        module.to(device).eval().requires_grad_(False)
    return Components(unet, vae, text_encoder, dict(spec.scheduler_config), spec.name)


def _sdxl_text_encoder(spec: ModelSpec, dtype: torch.dtype):
    """SDXL's towers from text_encoder/ (absent in a refiner) and text_encoder_2/, tokenized with the ordinary CLIP
    tokenizer (ldm/text/sdxl.py says why not tokenizer_2/): the model's tokenizer/, or for a refiner (which has only
    tokenizer_2/) open_clip's bundled vocabulary, the same one."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from ldm.text.sdxl import SDXLTextEncoder
    from ldm.text.tokenizer import offline_clip_tokenizer

    root, variants = spec.root, spec.variants
    if spec.arch == "sdxl":
        tokenizer = _load(spec, "tokenizer", lambda: CLIPTokenizer.from_pretrained(root / "tokenizer"))
        clip_l = _load(spec, "text_encoder", lambda: CLIPTextModel.from_pretrained(
            root / "text_encoder", use_safetensors=True, variant=variants["text_encoder"], dtype=dtype))
    else:
        tokenizer, clip_l = offline_clip_tokenizer(), None
    clip_g = _load(spec, "text_encoder_2", lambda: CLIPTextModelWithProjection.from_pretrained(
        root / "text_encoder_2", use_safetensors=True, variant=variants["text_encoder_2"], dtype=dtype))
    return SDXLTextEncoder.from_models(tokenizer, clip_l, clip_g,
                                       force_zeros_for_empty_prompt=spec.force_zeros_for_empty_prompt)
