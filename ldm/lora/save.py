"""A trained adapter on disk, in the two formats the ecosystem loads; both in one directory, written atomically:

    lora/pytorch_lora_weights.safetensors   diffusers/peft: `unet.<module path>.lora_A.weight` (rank x in) and
                                            `.lora_B.weight` (out x rank), `text_encoder.text_model.<module path>...`
                                            for a text-encoder adapter; rank and alpha as diffusers' adapter
                                            metadata. Loads with `StableDiffusionPipeline.load_lora_weights(dir)`.
    lora/<name>.safetensors                 kohya (A1111, ComfyUI): `lora_unet_<module path, dots as _>.lora_down.weight`,
                                            `.lora_up.weight` and `.alpha`, `lora_te_text_model_<module path>...` for
                                            the text encoder; the update is up @ down * alpha / rank.
                                            `ss_network_dim` / `ss_network_alpha` in the metadata, as kohya writes.

Keys come from peft's `get_peft_model_state_dict`. The diffusers file keeps peft's key names, as diffusers'
`save_lora_adapter` does: `convert_state_dict_to_diffusers` (what its older SD scripts call) renames only the
attention projections (to `.lora.down`), so a file with feed-forward targets would mix two spellings. The kohya file
comes from diffusers' `convert_state_dict_to_kohya`, with two corrections: it writes alpha = rank whatever the
adapter's alpha was (a file trained with alpha != rank would load at the wrong strength), and it names the text
encoder `lora_te1_` (SDXL's spelling; SD 1.x/2.x files use `lora_te_`).

An SDXL adapter (an `SDXLTextEncoder` given as the text encoder) keeps SDXL's spellings: `text_encoder.` and
`text_encoder_2.` in the diffusers file (`StableDiffusionXLPipeline.load_lora_weights`), `lora_te1_` and
`lora_te2_` in the kohya file. Text-encoder module paths always start with
`text_model.` as transformers 4 spelt them (and A1111's `lora_te_text_model_*` keys do): transformers 5 dropped that
level from `CLIPTextModel`, and diffusers' loader strips it again for a model without it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
from peft import get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from ldm.files import atomic_directory
from ldm.lora.config import LoRAConfig

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"


def peft_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors, `unet.<module path>.lora_A.weight` / `.lora_B.weight`, as fp32 CPU copies."""
    return {f"unet.{k}": v.detach().to("cpu", torch.float32).contiguous()
            for k, v in get_peft_model_state_dict(unet).items()}


def text_encoder_state_dict(text_encoder: nn.Module, prefix: str = "text_encoder") -> dict[str, torch.Tensor]:
    """A `CLIPTextEncoder`'s adapter (or an SDXL tower's, `prefix` "text_encoder_2" for the second):
    `<prefix>.text_model.<module path>.lora_A.weight` / `.lora_B.weight`."""
    return {f"{prefix}.{k if k.startswith('text_model.') else 'text_model.' + k}":
            v.detach().to("cpu", torch.float32).contiguous()
            for k, v in get_peft_model_state_dict(text_encoder.model).items()}


def kohya_state_dict(peft: dict[str, torch.Tensor], alpha: float, sdxl: bool = False) -> dict[str, torch.Tensor]:
    """peft keys (with the `unet.` / `text_encoder.` [/ `text_encoder_2.`] prefix) -> kohya keys, with the
    adapter's own alpha."""
    kohya = {}
    for key, value in convert_state_dict_to_kohya(peft).items():
        if not sdxl:
            key = key.replace("lora_te1_", "lora_te_", 1)
        kohya[key] = torch.tensor(float(alpha)) if key.endswith(".alpha") else value
    return kohya


def save_lora(directory: str | Path, unet: nn.Module, cfg: LoRAConfig, base_model: str = "",
              text_encoder: nn.Module | None = None) -> Path:
    """Write both files for the adapter in `unet` (and in `text_encoder`, a `CLIPTextEncoder` or `SDXLTextEncoder`
    with adapters, if given) into `directory` (replaced as a whole, never half-written)."""
    unet_part = peft_state_dict(unet)
    towers = text_encoder.towers if text_encoder is not None else ()
    if len(towers) == 2:  # SDXL
        return _save_sdxl_lora(directory, unet, unet_part, cfg, base_model, towers)
    text_part = text_encoder_state_dict(text_encoder) if text_encoder is not None else {}
    kohya_meta = _kohya_metadata(cfg, base_model)
    if text_encoder is not None:
        kohya_meta["ldm_text_encoder_targets"] = ",".join(cfg.text_encoder_targets)
    with atomic_directory(directory) as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers={k.removeprefix("unet."): v for k, v in unet_part.items()},
            unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
            text_encoder_lora_layers={k.removeprefix("text_encoder."): v for k, v in text_part.items()} or None,
            text_encoder_lora_adapter_metadata=(text_encoder.model.peft_config["default"].to_dict()
                                                if text_encoder is not None else None),
            weight_name=DIFFUSERS_FILE, safe_serialization=True)
        save_file(kohya_state_dict({**unet_part, **text_part}, cfg.alpha), str(tmp / f"{cfg.name}.safetensors"),
                  metadata=kohya_meta)
    return Path(directory)


def _kohya_metadata(cfg: LoRAConfig, base_model: str) -> dict[str, str]:
    return {"ss_network_module": "networks.lora", "ss_network_dim": str(cfg.rank), "ss_network_alpha": f"{cfg.alpha:g}",
            "ss_sd_model_name": base_model, "ldm_targets": ",".join(cfg.targets)}


def _save_sdxl_lora(directory: str | Path, unet: nn.Module, unet_part: dict[str, torch.Tensor], cfg: LoRAConfig,
                    base_model: str, towers: tuple[nn.Module, nn.Module]) -> Path:
    """`save_lora` for an SDXL adapter with adapters in both text towers."""
    parts = [text_encoder_state_dict(tower, prefix) for tower, prefix in zip(towers, ("text_encoder", "text_encoder_2"))]
    kohya_meta = {**_kohya_metadata(cfg, base_model), "ldm_text_encoder_targets": ",".join(cfg.text_encoder_targets)}
    with atomic_directory(directory) as tmp:
        StableDiffusionXLPipeline.save_lora_weights(
            tmp, unet_lora_layers={k.removeprefix("unet."): v for k, v in unet_part.items()},
            unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
            text_encoder_lora_layers={k.removeprefix("text_encoder."): v for k, v in parts[0].items()},
            text_encoder_2_lora_layers={k.removeprefix("text_encoder_2."): v for k, v in parts[1].items()},
            text_encoder_lora_adapter_metadata=towers[0].model.peft_config["default"].to_dict(),
            text_encoder_2_lora_adapter_metadata=towers[1].model.peft_config["default"].to_dict(),
            weight_name=DIFFUSERS_FILE, safe_serialization=True)
        save_file(kohya_state_dict({**unet_part, **parts[0], **parts[1]}, cfg.alpha, sdxl=True),
                  str(tmp / f"{cfg.name}.safetensors"), metadata=kohya_meta)
    return Path(directory)
