"""Which family of base model a LoRA was made for, read from what it holds, and the check that the model is of it.

SD 1.x/2.x and SDXL U-Nets share most of diffusers' module names, so a LoRA for the other family would otherwise
fail on the first shape that happens to differ, with a message that cannot say why (or, worse, fit in part). What
tells a file's family, in the order it is asked:

- a second text encoder (kohya `lora_te2_`, diffusers `text_encoder_2.`) or the micro-conditioning embedding
  (`label_emb` / `add_embedding`): SDXL;
- kohya's `lora_te_`: SD 1.x/2.x, whose one text encoder sd-scripts names `te`, where it names SDXL's `te1`/`te2`;
- kohya's `lora_te1_`: the SDXL base (CLIP ViT-L, which the refiner lacks); a diffusers `text_encoder.` entry: a
  model with a CLIP text model there, SD or the SDXL base, not the refiner;
- the width of the text the cross-attention reads (`attn2.to_k`/`to_v` in-features), where it is a full-size
  model's: 768 SD 1.x, 1024 SD 2.x, 2048 the SDXL base, 1280 the refiner.

The header's `ss_base_model_version` / `modelspec.architecture` are not asked: a merged or converted file may carry
another file's, and the names and shapes above are what the weights are.
"""

from __future__ import annotations

from torch import nn

from ldm.errors import UserError
from ldm.lora.load import KOHYA, TEXT, TEXT_2, UNET, LoraFile

SD, SDXL, REFINER = "sd", "sdxl", "sdxl-refiner"  # the model's family (Pipeline.arch's names)
FAMILY_NAMES = {SD: "SD 1.x/2.x", SDXL: "SDXL", REFINER: "an SDXL refiner"}
# what a set of families a LoRA fits is called in a message
_FITS_NAMES = {frozenset({SD}): "SD 1.x/2.x", frozenset({SDXL, REFINER}): "SDXL", frozenset({SDXL}): "the SDXL base",
               frozenset({REFINER}): "an SDXL refiner", frozenset({SD, SDXL}): "SD 1.x/2.x or the SDXL base"}
# full-size cross-attention context widths: SD 1.x (CLIP ViT-L), SD 2.x (OpenCLIP ViT-H), SDXL (768 + 1280), refiner
_CONTEXT_WIDTHS = {768: ({SD}, "SD 1.x"), 1024: ({SD}, "SD 2.x"), 2048: ({SDXL}, "the SDXL base"),
                   1280: ({REFINER}, "an SDXL refiner")}


def model_family(unet: nn.Module, text: dict[str, nn.Module]) -> str:
    """SD | SDXL | REFINER, from the U-Net's micro-conditioning and the text towers (ldm/lora/targets.py
    `text_models`): an SDXL U-Net without a CLIP ViT-L tower is a refiner's."""
    if getattr(getattr(unet, "config", None), "addition_embed_type", None) != "text_time":
        return SD
    return SDXL if TEXT in text else REFINER


def check_family(lora: LoraFile, family: str) -> None:
    """A `UserError` when what `lora` holds says it was made for a family other than `family` (the model's)."""
    for fits, why in _evidence(lora):
        if family not in fits:
            raise UserError(
                f"LoRA '{lora.path}' is for {_FITS_NAMES.get(frozenset(fits), 'another model')} ({why}), but the "
                f"model is {FAMILY_NAMES[family]}: use a LoRA made for {FAMILY_NAMES[family]}, or a model of the "
                "LoRA's family"
            )


def _evidence(lora: LoraFile) -> list[tuple[set[str], str]]:
    """(families the LoRA fits, why) for each thing in it that tells, most telling first."""
    found: list[tuple[set[str], str]] = []
    kohya = lora.format == KOHYA
    second = [m for m in lora.modules if m.part == TEXT_2]
    if second:
        spelt = "lora_te2_" if kohya else "text_encoder_2."
        found.append(({SDXL, REFINER}, f"it has {len(second)} modules of SDXL's second text encoder, {spelt}*"))
    micro = [m.name for m in lora.modules if m.part == UNET and m.name.startswith(("label_emb", "add_embedding"))]
    if micro:
        found.append(({SDXL, REFINER}, f"it adapts SDXL's micro-conditioning embedding, '{micro[0]}'"))
    if kohya:
        te, te1 = ({k.partition(".")[0] for k in lora.keys if k.startswith(p)} for p in ("lora_te_", "lora_te1_"))
        if te:
            why = f"it has {len(te)} lora_te_* modules: one text encoder; SDXL LoRAs have lora_te1_/lora_te2_"
            found.append(({SD}, why))
        if te1:
            why = f"it has {len(te1)} lora_te1_* modules, for SDXL's CLIP ViT-L text encoder, which a refiner lacks"
            found.append(({SDXL}, why))
    else:
        first = [m for m in lora.modules if m.part == TEXT]
        if first:
            why = f"it has {len(first)} text_encoder.* modules, for a CLIP text encoder, which a refiner does not have"
            found.append(({SD, SDXL}, why))
    for m in lora.modules:
        if m.part == UNET and m.name.replace("_", ".").endswith(("attn2.to.k", "attn2.to.v")):
            width = int(m.update_shape[1])
            if width in _CONTEXT_WIDTHS:
                fits, name = _CONTEXT_WIDTHS[width]
                found.append((fits, f"its cross-attention reads {width}-wide text features, as {name}'s does"))
            break
    return found
