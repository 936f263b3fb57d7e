"""Read a LoRA file, tell its layout from its keys, and sort its entries by part: U-Net, text encoder(s).

Two layouts are read (safetensors only; a pickle `.bin`/`.pt`/`.ckpt` is refused like any other weight file):

- diffusers/peft (`pytorch_lora_weights.safetensors`, written by diffusers' `save_lora_weights` and its training
  scripts): `unet.<module>.lora_A.weight` (rank, in) and `unet.<module>.lora_B.weight` (out, rank), `text_encoder.`
  for the text encoder. The scale alpha / rank comes from the header's `lora_adapter_metadata` JSON (peft's
  `LoraConfig` with a `unet.`/`text_encoder.` prefix: `lora_alpha`, `alpha_pattern`, `use_rslora`); without it
  alpha = rank, scale 1, as diffusers assumes. The older attention-processor spellings (`...attn1.processor.
  to_q_lora.down.weight`, `...to_q.lora.down.weight`, `...q_proj.lora_linear_layer.up.weight`) are renamed to
  these with diffusers' own state-dict converters. SDXL files add `text_encoder_2.` (the OpenCLIP ViT-bigG tower;
  `text_encoder.` is CLIP ViT-L), as `StableDiffusionXLPipeline.save_lora_weights` writes them.
- kohya (what A1111 and ComfyUI load): `lora_unet_<module path, dots as underscores>.lora_down.weight` (rank, in),
  `.lora_up.weight` (out, rank) and `.alpha` (a scalar; missing = rank), `lora_te_<path>` for the text encoder
  (SD 1 writes CLIP's module names as transformers 4 spelled them: `lora_te_text_model_encoder_layers_0_self_attn_
  q_proj`); SDXL's two towers are `lora_te1_` (CLIP ViT-L) and `lora_te2_` (bigG), and its U-Net names are the
  original (sgm) ones (`lora_unet_input_blocks_4_1_...`; mapped in ldm/lora/targets.py). Conv layers (LoCon) hold
  (rank, in, kh, kw) / (out, rank, 1, 1).

The weight update of one module is `up @ down * alpha / rank * scale` (A1111, kohya and peft agree), reshaped to
the module's weight for convolutions. kohya-layout files may also hold LyCORIS's LoHa (`hada_*`) and LoKr (`lokr_*`)
modules, and DoRA magnitudes (`dora_scale`; peft's `lora_magnitude_vector` in diffusers/peft files) beside any
module: those are read and applied too (their formulas: ldm/lora/lycoris.py). Modules of kinds this package does not
apply (LyCORIS OFT/BOFT, IA3, LoCon's CP `lora_mid`, full diffs, norms, biases, bundled embeddings) are collected by
kind so that the caller can name them in one warning. Which module each entry changes is ldm/lora/targets.py; which
family of base model a file is for, ldm/lora/family.py.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldm.errors import UserError
from ldm.lora.lycoris import Adapter, Dora, lycoris_module
from ldm.weights import PICKLE_SUFFIXES, check_safetensors_file, read_safetensors

DIFFUSERS, KOHYA = "diffusers", "kohya"
UNET, TEXT, TEXT_2 = "unet", "text_encoder", "text_encoder_2"  # TEXT_2: SDXL's OpenCLIP ViT-bigG tower
PARTS = (UNET, TEXT, TEXT_2)
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY

# kohya: the prefix of each part's module names
_KOHYA_PREFIXES = {"lora_unet_": UNET, "lora_te_": TEXT, "lora_te1_": TEXT, "lora_te2_": TEXT_2}
# suffixes of the kinds not applied, by what they are (LyCORIS's names: github.com/KohakuBlueleaf/LyCORIS)
_UNAPPLIED_KINDS = {
    "lora_mid": "LoCon CP", "oft_": "OFT", "diff": "full diff", "diff_b": "full diff", "w_norm": "norm",
    "b_norm": "norm", "on_input": "IA3", "bias": "LoRA bias", "lora_B.bias": "LoRA bias", "lokr_t1": "LoKr t1",
}


@dataclass(eq=False)
class LoraModule(Adapter):
    """One adapted weight: delta W = up @ down * scale (with a `dora` magnitude, DoRA's decomposition of W0 + delta W:
    ldm/lora/lycoris.py). LoHa and LoKr entries (ldm/lora/lycoris.py) offer the same `Adapter` methods."""

    part: str  # UNET | TEXT | TEXT_2
    name: str  # the module's dotted path (diffusers layout) or underscored path (kohya), text_model. prefix dropped
    down: torch.Tensor  # (rank, in) or (rank, in, kh, kw)
    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1)
    alpha: float | None = None  # None: alpha = rank
    rslora: bool = False  # peft's rank-stabilised scale alpha / sqrt(rank)
    dora: Dora | None = None
    kind = "LoRA"

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        alpha = self.rank if self.alpha is None else self.alpha
        return alpha / math.sqrt(self.rank) if self.rslora else alpha / self.rank

    def delta(self, weight_shape: torch.Size, device: torch.device | str = "cpu") -> torch.Tensor:
        """(up @ down) * alpha / rank in fp32 on `device`, shaped like the module's weight (out, in) or
        (out, in, kh, kw)."""
        up = self.up.to(device, torch.float32).flatten(1)  # (out, r)
        down = self.down.to(device, torch.float32).flatten(1)  # (r, in * kh * kw)
        return (up @ down * self.scale).reshape(weight_shape)

    @property
    def update_shape(self) -> tuple[int, int]:
        return self.up.shape[0], int(self.down[0].numel())

    def fit_problem(self, weight_shape: tuple[int, ...]) -> str | None:
        out, inn = self.update_shape
        if self.up.shape[1] != self.rank or (out, inn) != (weight_shape[0], math.prod(weight_shape[1:])):
            return f"the LoRA's up @ down is ({out}, {inn}) (rank {self.rank})"
        return None


@dataclass(eq=False)
class LoraFile:
    path: Path
    format: str  # DIFFUSERS | KOHYA
    modules: list[Adapter]  # LoraModule, LohaModule, LokrModule
    # what they are ("OFT modules", "unknown keys") -> the module names or keys in the file that are not applied
    unapplied: dict[str, list[str]] = field(default_factory=dict)
    keys: tuple[str, ...] = ()  # every tensor name in the file, as written


def read_lora(path: str | Path) -> LoraFile:
    """Read `path` (a .safetensors file, or a directory holding pytorch_lora_weights.safetensors) and sort its keys."""
    path = find_lora_file(path)
    check_safetensors_file(path)
    tensors, metadata = read_safetensors(path, problem=lambda reason: f"cannot read LoRA '{path}': {reason}")
    if any(k.startswith(tuple(_KOHYA_PREFIXES)) for k in tensors):
        return _read_kohya(path, tensors)
    if any(_is_diffusers_key(k) for k in tensors):
        return _read_diffusers(path, tensors, _peft_configs(path, metadata))
    families = sorted({k.split(".")[0].split("_")[0] for k in tensors})[:6]
    raise UserError(
        f"'{path}' holds no LoRA weights in a layout this package reads (diffusers/peft `unet.*.lora_A.weight` or "
        f"kohya `lora_unet_*.lora_down.weight`); its keys start with: {', '.join(families) or 'nothing'}"
    )


def find_lora_file(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        found = sorted(p.glob("*.safetensors"))
        preferred = [f for f in found if f.name == "pytorch_lora_weights.safetensors"]
        if not found:
            raise UserError(f"LoRA directory '{p}' has no .safetensors file (pytorch_lora_weights.safetensors)")
        return (preferred or found)[0]
    if not p.is_file():
        raise UserError(f"LoRA file '{p}' does not exist")
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(
            f"LoRA '{p}' is a pickle file; only .safetensors LoRAs are loaded, because unpickling can run arbitrary "
            "code. Convert it once where you trust it (safetensors.torch.save_file)"
        )
    return p


# ------------------------------------------------------------------------------------------------------------ kohya


def _read_kohya(path: Path, tensors: dict[str, torch.Tensor]) -> LoraFile:
    unapplied: dict[str, list[str]] = defaultdict(list)
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)  # lora name -> {suffix: tensor}
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        prefix = next((p for p in _KOHYA_PREFIXES if name.startswith(p)), None)
        if prefix is None:
            unapplied["keys outside any module"].append(key)
            continue
        groups[name][suffix] = value
    modules = []
    for name, entries in groups.items():
        prefix = next(p for p in _KOHYA_PREFIXES if name.startswith(p))
        part, module = _KOHYA_PREFIXES[prefix], name[len(prefix):]
        if part != UNET:
            module = module.removeprefix("text_model_")
        try:
            adapter = _kohya_adapter(part, module, entries)
        except ValueError as e:
            raise UserError(f"LoRA '{path}' is damaged: module '{name}' is {e}; the file cannot be applied") from None
        if adapter is not None:
            modules.append(adapter)
        else:
            unapplied[f"{_unapplied_kind(entries) or 'unknown'} modules"].append(name)
    return LoraFile(path, KOHYA, modules, dict(unapplied), tuple(tensors))


def _kohya_adapter(part: str, module: str, entries: dict[str, torch.Tensor]) -> Adapter | None:
    """One kohya module's tensors (suffix -> tensor) -> a LoRA, LoHa or LoKr entry, with DoRA's magnitude if it has
    `dora_scale`; None for other kinds."""
    alpha = float(entries["alpha"]) if "alpha" in entries else None
    dora = Dora(entries["dora_scale"]) if "dora_scale" in entries else None
    tensors = {k: v for k, v in entries.items() if k not in ("alpha", "dora_scale")}
    if tensors.keys() == {"lora_down.weight", "lora_up.weight"}:
        return LoraModule(part, module, tensors["lora_down.weight"], tensors["lora_up.weight"], alpha, dora=dora)
    return lycoris_module(part, module, tensors, alpha, dora)


def _unapplied_kind(entries: dict[str, torch.Tensor]) -> str | None:
    for suffix in entries:
        for marker, kind in _UNAPPLIED_KINDS.items():
            if suffix.startswith(marker) or suffix.removesuffix(".weight") == marker:
                return kind
    return None


# --------------------------------------------------------------------------------------------------- diffusers/peft

_LORA_MARKERS = (".lora_A.", ".lora_B.", ".lora.down.", ".lora.up.", "_lora.down.", "_lora.up.", ".lora_linear_layer.")


def _is_diffusers_key(key: str) -> bool:
    return any(m in key for m in _LORA_MARKERS) or "lora_magnitude_vector" in key


def _to_peft_names(part: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' older spellings -> peft's `<module>.lora_A.weight`, with diffusers' own converters."""
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    if part == UNET:
        return convert_unet_state_dict_to_peft(tensors)
    if any("lora_linear_layer" in k or "_lora." in k for k in tensors):
        return convert_state_dict_to_peft(convert_state_dict_to_diffusers(tensors))
    return tensors


def _read_diffusers(path: Path, tensors: dict[str, torch.Tensor], configs: dict[str, dict]) -> LoraFile:
    unapplied: dict[str, list[str]] = defaultdict(list)
    by_part: dict[str, dict[str, torch.Tensor]] = {part: {} for part in PARTS}
    for key, value in tensors.items():
        head, _, rest = key.partition(".")
        if head in PARTS:
            by_part[head][rest] = value
        else:  # peft's own state dict of a bare U-Net has no prefix
            by_part[UNET][key] = value
    modules = []
    for part, entries in by_part.items():
        groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
        for key, value in _to_peft_names(part, entries).items():
            m = re.fullmatch(r"(.+?)\.(lora_A\.weight|lora_B\.weight|alpha|lora_B\.bias|lora_magnitude_vector.*)", key)
            if m is None:
                unapplied["unknown keys"].append(f"{part}.{key}")
                continue
            groups[m.group(1)][m.group(2)] = value
        config = configs.get(part, {})
        for name, group in groups.items():
            module = name.removeprefix("text_model.") if part != UNET else name
            kind = _unapplied_kind(group)
            if kind or "lora_A.weight" not in group or "lora_B.weight" not in group:
                unapplied[f"{kind or 'unknown'} modules"].append(f"{part}.{name}")
                continue
            alpha = group.get("alpha")
            magnitude = next((v for k, v in group.items() if k.startswith("lora_magnitude_vector")), None)
            modules.append(LoraModule(
                part, module, group["lora_A.weight"], group["lora_B.weight"],
                float(alpha) if alpha is not None else _config_alpha(config, name),
                rslora=bool(config.get("use_rslora", False)),
                dora=None if magnitude is None else Dora(magnitude, peft=True),
            ))
    return LoraFile(path, DIFFUSERS, modules, dict(unapplied), tuple(tensors))


def _peft_configs(path: Path, metadata: dict[str, str]) -> dict[str, dict]:
    """The header's `lora_adapter_metadata` (`{"unet.r": 4, "unet.lora_alpha": 8, ...}`) -> {part: LoraConfig dict}."""
    if METADATA_KEY not in metadata:
        return {}
    try:
        flat = json.loads(metadata[METADATA_KEY])
    except ValueError:
        raise UserError(f"LoRA '{path}' has unreadable '{METADATA_KEY}' in its header (not JSON)") from None
    configs: dict[str, dict] = defaultdict(dict)
    for key, value in flat.items():
        part, _, name = key.partition(".")
        configs[part][name] = value
    return dict(configs)


def _config_alpha(config: dict, module: str) -> float | None:
    """peft's alpha for `module`: the first `alpha_pattern` key matching its name's end, else `lora_alpha`."""
    if not config:
        return None  # no config: alpha = rank, as diffusers assumes
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):  # peft.utils.other.get_pattern_key
            return float(alpha)
    alpha = config.get("lora_alpha")
    return None if alpha is None else float(alpha)

