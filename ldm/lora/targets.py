"""Which module of our models each LoRA entry changes: the names a LoRA may use for them, and the shape check.

Names by part (`LoraModule.part`, ldm/lora/load.py; LoHa/LoKr entries use the same names):

- unet: diffusers' module names (`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`). A kohya file may
  also use the original (sgm/CompVis) names, as sd-scripts writes every SDXL LoRA (it trains SDXL on its own copy of
  Stability's U-Net): `input_blocks_4_1_transformer_blocks_0_attn1_to_q`, `middle_block_1_proj_in`,
  `output_blocks_2_2_conv`, `input_blocks_1_0_in_layers_2`, `label_emb_0_0`, `time_embed_0`, `out_2`. Those names
  are not a second table: they are the single-file key mapping (ldm/singlefile/keys.py `unet_to_original`, which
  diffusers' own reader inverts exactly) applied to this U-Net's `<module>.weight` names for its config, so the
  block arithmetic (input block i = level, layer) is the one the checkpoint converter checks. A U-Net that has no
  original layout takes diffusers' names only.
- text_encoder: SD's CLIP text model, or SDXL's first tower (CLIP ViT-L); text_encoder_2: SDXL's OpenCLIP ViT-bigG
  tower (`CLIPTextModelWithProjection`), the refiner's only one. transformers' names without the `text_model.`
  level (`encoder.layers.0.self_attn.q_proj`): CLIPTextModelWithProjection has that level, transformers 5's
  CLIPTextModel has not, and LoRA files spell it either way.

kohya names are the module path with every '.' as '_'; no two modules of a U-Net or a CLIP model spell the same that
way, and the original and diffusers spellings start with different words, so one lookup table holds both.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ldm.errors import UserError
from ldm.lora.load import KOHYA, TEXT, TEXT_2, UNET, LoraFile
from ldm.lora.lycoris import Adapter

Table = dict[str, tuple[str, nn.Module]]  # name as a LoRA spells it -> (dotted name in the model, module)


@dataclass(eq=False)
class Target:
    """A LoRA entry (LoRA, LoHa or LoKr) and the module it changes."""

    part: str
    name: str  # the module's dotted name in its model
    module: nn.Module  # nn.Linear or nn.Conv2d
    lora: Adapter


@dataclass
class Mapping:
    targets: list[Target]
    unmatched: dict[str, list[str]]  # part -> LoRA module names that match no module


def text_models(text_encoder: nn.Module) -> dict[str, nn.Module]:
    """part -> the transformers CLIP model a LoRA's text entries change: SD's encoder (TEXT), SDXL's CLIP ViT-L
    (TEXT) and bigG (TEXT_2) towers, a refiner's bigG alone (TEXT_2). Empty for other encoders (open_clip)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from ldm.text.sdxl import SDXLTextEncoder

    if isinstance(text_encoder, SDXLTextEncoder):
        towers = text_encoder.towers  # (CLIP-L, bigG) or (bigG,)
        return {TEXT_2: towers[-1].model, **({TEXT: towers[0].model} if len(towers) == 2 else {})}
    model = getattr(text_encoder, "model", None)
    return {TEXT: model} if isinstance(model, (CLIPTextModel, CLIPTextModelWithProjection)) else {}


def module_table(model: nn.Module, part: str, kohya: bool) -> Table:
    """Name as a LoRA file spells it -> (dotted name, module), for every Linear and Conv2d of `model`; a kohya U-Net
    table also holds the original (sgm) spellings."""
    table = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            spelt = name.removeprefix("text_model.") if part != UNET else name
            table[spelt.replace(".", "_") if kohya else spelt] = (name, module)
    if kohya and part == UNET:
        table.update({original.replace(".", "_"): found for original, found in original_unet_names(model).items()})
    return table


def original_unet_names(unet: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """Original (sgm) module name -> (diffusers name, module) for the U-Net's Linear and Conv2d layers, by the
    single-file key mapping of `<name>.weight` (values are passed through untouched; no tensor is copied)."""
    from ldm.singlefile.keys import UNET_PREFIX, unet_to_original

    if getattr(unet, "config", None) is None:  # not a diffusers U-Net
        return {}
    config = dict(unet.config)
    out = {}
    for name, module in unet.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        try:
            (original,) = unet_to_original({f"{name}.weight": module.weight}, config)
        except UserError:  # a U-Net without an original layout (or a layer it has no name for): diffusers names only
            return {}
        out[original.removeprefix(UNET_PREFIX).removesuffix(".weight")] = (name, module)
    return out


def map_modules(lora: LoraFile, unet: nn.Module, text: dict[str, nn.Module], family: str) -> Mapping:
    """Find each LoRA entry's module and check its shape; a LoRA for another base is a `UserError` naming the module.

    `text`: part -> transformers CLIP model (`text_models`); entries of a part with no model are all unmatched.
    `family`: the model's family as a message names it ("SDXL").
    """
    kohya = lora.format == KOHYA
    tables = {UNET: module_table(unet, UNET, kohya), **{p: module_table(m, p, kohya) for p, m in text.items()}}
    targets: list[Target] = []
    unmatched: dict[str, list[str]] = {}
    for entry in lora.modules:
        found = tables.get(entry.part, {}).get(entry.name)
        if found is None:
            unmatched.setdefault(entry.part, []).append(entry.name)
            continue
        name, module = found
        _check_shape(lora, entry, name, module, family)
        targets.append(Target(entry.part, name, module, entry))
    if not targets and any(m.part in tables for m in lora.modules):
        first = next(m for m in lora.modules if m.part in tables)
        raise UserError(
            f"LoRA '{lora.path}' does not fit this model: none of its {len(lora.modules)} modules exists here (the "
            f"first, {first.part} '{first.name}', does not); it was made for another base model (this one is "
            f"{family})"
        )
    return Mapping(targets, unmatched)


def _check_shape(lora: LoraFile, entry: Adapter, name: str, module: nn.Module, family: str) -> None:
    weight_shape = tuple(module.weight.shape)  # (out, in) or (out, in, kh, kw)
    problem = entry.problem(weight_shape)
    if problem is not None:
        raise UserError(
            f"LoRA '{lora.path}' does not fit this model: {entry.part} module '{name}' has weight {weight_shape} but "
            f"{problem}; it was made for another base model (this one is {family})"
        )
