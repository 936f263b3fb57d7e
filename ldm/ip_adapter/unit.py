"""`IPAdapterUnit`: one image prompt of a generation request (`GenerationRequest.ip_adapters`), and how the PNG text
records it.

PNG fields (ours: A1111 has no core IP-Adapter field), one pair per unit, numbered from the second on:

    IP-Adapter: ip-adapter_sd15 [6a3f6166e7], IP-Adapter scale: 0.6, IP-Adapter 2: ..., IP-Adapter scale 2: 0.4

`NAME [hash]` as A1111 titles a checkpoint (the first 10 hex digits of the file's sha256). The ControlNet
extension's `ControlNet N: "Module: ip-adapter_clip_sd15, Model: ..., Weight: 0.6, ..."` form is not copied: that
extension would read it back as one of its own units with our names and its other settings defaulted, and our
ControlNet units keep that name to themselves. The image itself is not in the PNG: a replay needs --ip-image again.

The A1111 ControlNet extension sends IP-Adapters as units of its `alwayson_scripts.controlnet.args` whose `module`
is an IP-Adapter preprocessor (`units_from_a1111`; the other units are ControlNets, ldm/controlnet/unit.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ldm.errors import UserError

SCALE = 1.0  # diffusers' load_ip_adapter default, A1111 ControlNet's default weight
LABEL, SCALE_LABEL = "IP-Adapter", "IP-Adapter scale"
FIELD = re.compile(r"IP-Adapter(?: scale)?(?: (\d+))?")  # the PNG field names this module reads
_TITLE = re.compile(r"(.*?)(?: \[([0-9a-f]{8,64})\])?")
# the extension's CLIP preprocessors for IP-Adapters, by name and label (Mikubill/sd-webui-controlnet,
# scripts/preprocessor/legacy/preprocessor_compiled.py, scripts/preprocessor/ip_adapter_auto.py): ViT-H, ViT-bigG,
# the SDXL Plus ViT-H one, and "auto". Here the image encoder is the adapter's own (ldm/ip_adapter/image_encoder.py),
# whichever of them a unit names, as "auto" picks it. Its other "ip-adapter..." modules (FaceID, PuLID) are refused.
A1111_MODULES = ("ip-adapter-auto", "ip-adapter_clip_sd15", "ip-adapter_clip_h", "ip-adapter_clip_sdxl",
                 "ip-adapter_clip_g", "ip-adapter_clip_sdxl_plus_vith")


@dataclass(frozen=True)
class IPAdapterUnit:
    model: str  # the adapter as the user named it (a .safetensors file or a directory holding one): what PNGs record
    image: Image.Image | None = field(default=None, compare=False, repr=False)  # the image prompt (RGB)
    scale: float = SCALE  # weight of the image branch in every cross-attention (diffusers' set_ip_adapter_scale)
    hash: str = ""  # the file's short sha256, as the opened adapter has it or a PNG recorded it; "": not known

    def check(self) -> None:
        if self.image is None:
            raise UserError(f"IP-Adapter '{self.model}' has no image prompt: pass --ip-image FILE")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise UserError(f"--ip-scale must be a finite number, got {self.scale!r}")


def label(kind: str, i: int) -> str:
    """The PNG field name of unit i (0-based): 'IP-Adapter', 'IP-Adapter scale', then 'IP-Adapter 2', ..."""
    return kind if i == 0 else f"{kind} {i + 1}"


def png_fields(units: tuple[IPAdapterUnit, ...]) -> list[tuple[str, str]]:
    """The (field, value) pairs of `units` for the PNG text (values unquoted; the writer quotes)."""
    out = []
    for i, unit in enumerate(units):
        out.append((label(LABEL, i), f"{unit.model} [{unit.hash}]" if unit.hash else unit.model))
        out.append((label(SCALE_LABEL, i), repr(int(unit.scale)) if float(unit.scale).is_integer() else
                    repr(float(unit.scale))))
    return out


def units_from_fields(raw: dict[str, str]) -> tuple[IPAdapterUnit, ...]:
    """The units a PNG's fields (`metadata.parameter_fields`) record, without their images; () when none."""
    units = []
    i = 0
    while label(LABEL, i) in raw:
        title = _TITLE.fullmatch(raw[label(LABEL, i)].strip())
        scale = raw.get(label(SCALE_LABEL, i))
        units.append(IPAdapterUnit(title[1], scale=SCALE if scale is None else float(scale), hash=title[2] or ""))
        i += 1
    return tuple(units)


def is_a1111_unit(raw: Any) -> bool:
    """Whether an `alwayson_scripts.controlnet.args` item is an IP-Adapter unit (its module an IP-Adapter one)."""
    module = raw.get("module") if isinstance(raw, dict) else None
    return isinstance(module, str) and module.strip().lower().startswith("ip-adapter")


def units_from_a1111(args: Any, init_image: Image.Image | None = None) -> tuple[IPAdapterUnit, ...]:
    """The enabled IP-Adapter units of an A1111 request's `alwayson_scripts.controlnet.args` (images already decoded
    to PIL images): `model` 'NAME [hash]' or NAME, `weight` the scale, `image` the image prompt (img2img: the init
    image when it has none, as the extension's units take it). Messages number the units as the list does."""
    units = []
    for i, raw in enumerate(args if isinstance(args, list) else []):
        if not is_a1111_unit(raw) or not raw.get("enabled", False):
            continue
        where = f"ControlNet unit {i} (IP-Adapter)"
        module = raw["module"].strip().lower()
        if module not in A1111_MODULES:
            raise UserError(f"{where}: module '{raw['module']}' is not supported here (FaceID and PuLID take "
                            f"insightface face embeddings); use one of {', '.join(A1111_MODULES)}")
        model = raw.get("model")
        name = re.sub(r" \[[0-9a-fA-F]{8,64}\]$", "", model.strip()) if isinstance(model, str) else ""
        if name in ("", "None"):
            raise UserError(f"{where} is enabled but names no model (GET /controlnet/model_list)")
        if raw.get("ipadapter_input") is not None:
            raise UserError(f"{where}: ipadapter_input (CLIP outputs from /controlnet/detect) is not supported: send "
                            "the image prompt as 'image'")
        for key, whole in (("guidance_start", 0.0), ("guidance_end", 1.0)):  # "guidance": the old name of the end
            value = raw.get(key, raw.get("guidance", whole) if key == "guidance_end" else whole)
            if isinstance(value, bool) or value != whole:
                raise UserError(f"{where}: {key} {value!r} is not supported: an IP-Adapter acts on every step here "
                                "(send guidance_start 0 and guidance_end 1)")
        scale = raw.get("weight", SCALE)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise UserError(f"{where}: weight must be a number (the image prompt's scale), got {scale!r}")
        image = raw.get("image", raw.get("input_image"))
        image = init_image if image is None else image
        if image is None:
            raise UserError(f"{where} has no image: send the image prompt as 'image' (base64), or use img2img, "
                            "whose init image a unit without one takes")
        units.append(IPAdapterUnit(name, image, float(scale)))
    return tuple(units)
