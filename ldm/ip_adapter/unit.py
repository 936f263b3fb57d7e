"""`IPAdapterUnit`: one image prompt of a generation request (`GenerationRequest.ip_adapters`), and how the PNG text
records it.

PNG fields (ours: A1111 has no core IP-Adapter field), one pair per unit, numbered from the second on:

    IP-Adapter: ip-adapter_sd15 [6a3f6166e7], IP-Adapter scale: 0.6, IP-Adapter 2: ..., IP-Adapter scale 2: 0.4

`NAME [hash]` as A1111 titles a checkpoint (the first 10 hex digits of the file's sha256). The ControlNet
extension's `ControlNet N: "Module: ip-adapter_clip_sd15, Model: ..., Weight: 0.6, ..."` form is not copied: that
extension would read it back as one of its own units with our names and its other settings defaulted, and our
ControlNet units keep that name to themselves. The image itself is not in the PNG: a replay needs --ip-image again.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from PIL import Image

from ldm.errors import UserError

SCALE = 1.0  # diffusers' load_ip_adapter default, A1111 ControlNet's default weight
LABEL, SCALE_LABEL = "IP-Adapter", "IP-Adapter scale"
FIELD = re.compile(r"IP-Adapter(?: scale)?(?: (\d+))?")  # the PNG field names this module reads
_TITLE = re.compile(r"(.*?)(?: \[([0-9a-f]{8,64})\])?")


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
