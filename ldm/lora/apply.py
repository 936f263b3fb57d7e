"""Apply LoRAs to a U-Net and a text encoder by merging their updates into the weights, and take them off again.

Merging (W <- W0 + sum_i scale_i * up_i @ down_i * alpha_i / rank_i; LoHa, LoKr and DoRA updates, ldm/lora/
lycoris.py, are added the same way, each DoRA one taken against W0) rather than peft's injected layers, which
compute W0 x + scale * B(A(x)) at every call: after the merge a LoRA costs nothing per step, torch.compile and
fp16 see plain Linear/Conv2d layers, and the result equals diffusers' unfused `load_lora_weights` within float
rounding (tests/test_lora_load.py measures it against diffusers' own fused-vs-unfused difference). Every change
recomputes each touched weight from its saved original in fp32 and rounds once to the model's dtype, so loading,
stacking and removing LoRAs in any order never accumulates rounding, and `clear()` restores the original bits.
Several LoRAs stack by adding their updates, as A1111 does; the same file twice adds its scales.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ldm.errors import UserError
from ldm.lora.family import FAMILY_NAMES, check_family, model_family
from ldm.lora.load import TEXT_2, UNET, LoraFile, find_lora_file, read_lora
from ldm.lora.prompt_tags import DIFFUSERS_FILE, find_in_dir, format_lora_hashes, lora_hash, split_tags, tag_text
from ldm.lora.targets import Target, map_modules, text_models

log = logging.getLogger(__name__)

_SHOWN = 3  # names per kind in the warning


@dataclass(eq=False)  # compared by identity: it holds tensors
class AppliedLora:
    name: str  # how prompts and PNG metadata name it (the file's stem, or the <lora:NAME> tag)
    lora: LoraFile
    scale: float  # the U-Net's multiplier
    text_scale: float  # the text encoder's (A1111's te multiplier; equal to `scale` unless a tag says otherwise)
    targets: list[Target]


class LoraStack:
    """The LoRAs merged into one U-Net + text encoder (SD's, or SDXL's towers), and the original weights of every
    module they touch.

    `load()` adds a LoRA for every later call (`Pipeline.load_lora`, `--lora`); `use_prompt()` adds the prompt's
    `<lora:...>` tags to those for one generation, and they stay merged until a prompt asks for other ones.
    """

    def __init__(self, unet: nn.Module, text_encoder: nn.Module) -> None:
        self.unet, self.text_encoder = unet, text_encoder
        self.text_models = text_models(text_encoder)  # part -> transformers CLIP model (ldm/lora/targets.py)
        self.family = model_family(unet, self.text_models)  # SD | SDXL | REFINER (ldm/lora/family.py)
        self.loaded: list[AppliedLora] = []  # by load(): in every generation
        self.applied: list[AppliedLora] = []  # merged now: loaded + the last prompt's tags
        self._originals: dict[int, tuple[nn.Module, torch.Tensor]] = {}  # id(module) -> (module, W0 on the CPU)
        self._files: dict[tuple[str, float], LoraFile] = {}  # read files by (path, mtime), for tags used again

    def read(self, path: str | Path) -> LoraFile:
        path = find_lora_file(path)
        key = (str(path.resolve()), path.stat().st_mtime)
        if key not in self._files:
            self._files[key] = read_lora(path)
        return self._files[key]

    def load(self, path: str | Path, scale: float = 1.0, name: str | None = None) -> AppliedLora:
        """Merge the LoRA at `path` for every later generation, on top of those already loaded."""
        path = find_lora_file(path)
        name = name or (path.parent.name if path.name == DIFFUSERS_FILE else path.stem)
        applied = self.prepare(self.read(path), name, scale)
        self.loaded.append(applied)
        self.set(self.loaded + [a for a in self.applied if a not in self.loaded])
        return applied

    def unload(self) -> None:
        """Take every LoRA off: the weights are the original ones again, bit for bit."""
        self.loaded = []
        self.clear()

    def use_prompt(self, prompt: str, lora_dir: str | Path | None = None,
                   expected_hashes: dict[str, str] | None = None) -> tuple[str, str, str]:
        """Merge the loaded LoRAs plus the prompt's tags -> (text to encode, prompt to record, 'Lora hashes' value).

        The recorded prompt keeps its tags and gains one per loaded LoRA, so that replaying it brings them back.
        """
        text, tags = split_tags(prompt)
        from_tags: list[AppliedLora] = []
        for tag in tags:
            expected = (expected_hashes or {}).get(tag.name.replace(":", "").replace(",", ""))
            path = find_in_dir(tag.name, lora_dir, tag.text, expected)
            same = [a for a in self.applied if a.name == tag.name and a.lora.path == find_lora_file(path)
                    and (a.scale, a.text_scale) == (tag.scale, tag.text_scale) and a not in from_tags
                    and a not in self.loaded]
            from_tags.append(same[0] if same else self.prepare(self.read(path), tag.name, tag.scale, tag.text_scale))
        wanted = self.loaded + from_tags
        if [id(a) for a in wanted] != [id(a) for a in self.applied]:
            self.set(wanted)
        recorded = prompt + "".join(f" {tag_text(a.name, a.scale, a.text_scale)}" for a in self.loaded)
        # in the recorded prompt's order, so that a replay writes the same text
        hashes = format_lora_hashes([(a.name, lora_hash(a.lora.path)) for a in from_tags + self.loaded])
        return text, recorded, hashes

    def prepare(self, lora: LoraFile, name: str, scale: float, text_scale: float | None = None) -> AppliedLora:
        """Map `lora` onto the models (a `UserError` if it does not fit) and warn once about what is not applied."""
        check_scale(scale, name)
        text_scale = scale if text_scale is None else text_scale
        check_scale(text_scale, name)
        check_family(lora, self.family)
        mapping = map_modules(lora, self.unet, self.text_models, FAMILY_NAMES[self.family])
        skipped = dict(lora.unapplied)  # "OFT modules" -> names
        for part, names in mapping.unmatched.items():
            if part != UNET and part not in self.text_models:  # not transformers CLIP (check_family took SDXL's)
                kind = type(self.text_encoder).__name__
                skipped[f"text-encoder modules (the text encoder is a {kind}; LoRA applies to transformers CLIP "
                        "text encoders only)"] = names
            else:
                what = {UNET: "U-Net", TEXT_2: "second text-encoder"}.get(part, "text-encoder")
                skipped[f"{what} modules matching no module of this model"] = names
        if not mapping.targets:
            found = "; ".join(f"{len(v)} {k}" for k, v in skipped.items()) or "no keys"
            raise UserError(f"LoRA '{lora.path}' has nothing this package can apply ({found})")
        if skipped:
            listed = "; ".join(f"{len(keys)} {kind} ({', '.join(keys[:_SHOWN])}{', ...' if len(keys) > _SHOWN else ''})"
                               for kind, keys in skipped.items())
            log.warning("LoRA %s: not applied: %s; the other %d modules are applied", name, listed,
                        len(mapping.targets))
        unet_count = sum(1 for t in mapping.targets if t.part == UNET)
        kinds = Counter(t.lora.label for t in mapping.targets)
        log.info("LoRA %s: %s layout, %d U-Net + %d text-encoder modules (%s), scale %s%s", name, lora.format,
                 unet_count, len(mapping.targets) - unet_count, ", ".join(f"{n} {k}" for k, n in kinds.items()),
                 scale, "" if text_scale == scale else f" (text encoder {text_scale})")
        return AppliedLora(name, lora, scale, text_scale, mapping.targets)

    @torch.no_grad()
    def set(self, loras: list[AppliedLora]) -> None:
        """Make exactly `loras` the merged ones: each touched weight = W0 + the sum of their updates, each update
        computed from W0 (a DoRA update depends on it)."""
        touched = {id(t.module): t.module for applied in loras for t in applied.targets}
        for key, (module, original) in list(self._originals.items()):
            if key not in touched:  # no longer touched: back to the original bits
                module.weight.copy_(original)
                del self._originals[key]
        for key, module in touched.items():
            if key not in self._originals:
                self._originals[key] = (module, module.weight.detach().to("cpu", copy=True))
        updates: dict[int, torch.Tensor] = {}
        for applied in loras:
            for t in applied.targets:
                scale = applied.scale if t.part == UNET else applied.text_scale
                key = id(t.module)
                update = t.lora.update(self._originals[key][1], scale, t.module.weight.device)  # fp32
                updates[key] = updates[key] + update if key in updates else update
        for key, update in updates.items():
            module, original = self._originals[key]
            module.weight.copy_((original.to(module.weight.device).float() + update).to(module.weight.dtype))
        self.applied = list(loras)
        # keep read files only while merged (a tag used again in the next prompt is not read again)
        self._files = {k: f for k, f in self._files.items() if any(a.lora is f for a in self.applied)}
        for module in self.text_encoder.modules():  # encoders cache the empty prompt's embedding, which LoRAs change
            getattr(module, "_empty_cache", {}).clear()

    def clear(self) -> None:
        self.set([])


def check_scale(scale: float, name: str) -> None:
    if not isinstance(scale, (int, float)) or scale != scale or abs(scale) == float("inf"):
        raise UserError(f"LoRA {name}: the scale must be a finite number, got {scale!r}")
