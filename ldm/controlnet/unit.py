"""A ControlNet unit of a generation request: which ControlNet, its control image, and how it steers the U-Net.

Fields, ranges and defaults are those of the A1111 ControlNet extension's `ControlNetUnit`
(Mikubill/sd-webui-controlnet, internal_controlnet/args.py; enums in scripts/enums.py), so that its API requests
and PNG infotext map one to one:
- `weight` in [0, 2] scales the unit's residuals; several units add up (diffusers' MultiControlNet);
- `start`/`end` in [0, 1], start < end: the unit acts at step i of n when not (i / n < start or (i + 1) / n > end),
  diffusers' `control_guidance_start/end`;
- `preprocess` ('module'): 'none' (the image is the control map) or 'canny' (ldm/controlnet/canny.py) with
  `threshold_a`/`threshold_b` its low/high thresholds (A1111's sliders, 1..255, defaults 100/200);
- `control_mode`: "Balanced"; "My prompt is more important" (residuals scaled down towards the shallow blocks);
  "ControlNet is more important" (the same, on the conditional branch only: diffusers' guess mode);
- `resize_mode`: how a control image of another aspect ratio meets the generation size (ldm/controlnet/preprocess.py).

Three sources build units: the command line (`units_from_options`), a PNG's `ControlNet N` fields
(ldm/pipeline/metadata.py) and an A1111 API request's `alwayson_scripts.controlnet.args` (`units_from_a1111`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from PIL import Image

from ldm.errors import UserError
from ldm.ip_adapter.unit import is_a1111_unit as is_ip_adapter_unit

PREPROCESSORS = ("none", "canny")
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
RESIZE_MODES = ("Crop and Resize", "Just Resize", "Resize and Fill")  # the first is the default
MAX_WEIGHT = 2.0  # A1111's ControlNetUnit.weight: [0, 2]
# A1111's slider defaults: canny's low/high thresholds; 'none' has no sliders and writes their default 0.5
THRESHOLDS: dict[str, tuple[float, float]] = {"canny": (100, 200), "none": (0.5, 0.5)}
CANNY_RANGE = (1, 255)
# short names for the command line, and A1111's API ints (ResizeMode.int_value: Just Resize 0, Crop 1, Fill 2)
MODE_ALIASES = {"balanced": CONTROL_MODES[0], "prompt": CONTROL_MODES[1], "control": CONTROL_MODES[2],
                0: CONTROL_MODES[0], 1: CONTROL_MODES[1], 2: CONTROL_MODES[2]}
RESIZE_ALIASES = {"crop": RESIZE_MODES[0], "just": RESIZE_MODES[1], "fill": RESIZE_MODES[2],
                  "inner fit (scale to fit)": RESIZE_MODES[0], "outer fit (shrink to fit)": RESIZE_MODES[2],
                  0: RESIZE_MODES[1], 1: RESIZE_MODES[0], 2: RESIZE_MODES[2], 3: RESIZE_MODES[1]}
_HASH = re.compile(r" \[[0-9a-fA-F]{8,10}\]$")  # A1111's model titles: "control_v11p_sd15_canny [d14c016b]"


@dataclass(frozen=True)
class ControlUnit:
    model: str  # as named: a path or a name in --controlnet-dir; what PNGs record is its title "NAME [hash]"
    image: Image.Image | None = field(default=None, compare=False, repr=False)  # RGB, before preprocessing
    weight: float = 1.0
    start: float = 0.0  # share of the steps before the unit acts
    end: float = 1.0  # share of the steps after which it stops
    preprocess: str = "none"  # PREPROCESSORS
    threshold_a: float | None = None  # canny's low threshold; None: 100
    threshold_b: float | None = None  # canny's high threshold; None: 200
    control_mode: str = CONTROL_MODES[0]
    resize_mode: str = RESIZE_MODES[0]

    def thresholds(self) -> tuple[float, float]:
        """(a, b) with the preprocessor's defaults filled in."""
        a, b = THRESHOLDS.get(self.preprocess, (-1, -1))
        return (a if self.threshold_a is None else self.threshold_a), (b if self.threshold_b is None else
                                                                        self.threshold_b)

    def check(self, where: str) -> None:
        """Refuse a bad value, naming the option and `where` (which unit), in one line."""
        if not self.model:
            raise UserError(f"{where}: no ControlNet model named")
        if self.preprocess not in PREPROCESSORS:
            raise UserError(f"{where}: preprocessor '{self.preprocess}' is not available here (only "
                            f"{', '.join(PREPROCESSORS)}); for a ready control map use --control-preprocess none")
        if not _finite(self.weight) or not 0.0 <= self.weight <= MAX_WEIGHT:
            raise UserError(f"{where}: --control-weight must be in [0, {MAX_WEIGHT:g}], got {self.weight}")
        for name, value in (("start", self.start), ("end", self.end)):
            if not _finite(value) or not 0.0 <= value <= 1.0:
                raise UserError(f"{where}: --control-{name} must be in [0, 1] (a share of the steps), got {value}")
        if self.start >= self.end:
            raise UserError(f"{where}: --control-start {self.start} must be below --control-end {self.end} (the "
                            "ControlNet acts between them)")
        if self.preprocess == "canny":
            for name, value in zip(("--canny-low", "--canny-high"), self.thresholds()):
                if not _finite(value) or not CANNY_RANGE[0] <= value <= CANNY_RANGE[1]:
                    raise UserError(f"{where}: {name} must be in [{CANNY_RANGE[0]}, {CANNY_RANGE[1]}], got {value}")
        if self.control_mode not in CONTROL_MODES:
            raise UserError(f"{where}: unknown control mode '{self.control_mode}'; use one of "
                            f"{', '.join(repr(m) for m in CONTROL_MODES)}")
        if self.resize_mode not in RESIZE_MODES:
            raise UserError(f"{where}: unknown resize mode '{self.resize_mode}'; use one of "
                            f"{', '.join(repr(m) for m in RESIZE_MODES)}")
        if self.image is None:
            raise UserError(f"{where}: no control image: pass --control-image FILE (one per --controlnet)")

    def resolved(self) -> ControlUnit:
        """Thresholds filled in (canny's as the integers OpenCV takes), as the PNG records them."""
        a, b = self.thresholds()
        if self.preprocess == "canny":
            a, b = int(a), int(b)
        return replace(self, threshold_a=a, threshold_b=b)


def check_units(units: Sequence[ControlUnit]) -> None:
    for i, unit in enumerate(units):
        unit.check(where(units, i))


def where(units: Sequence[ControlUnit], i: int) -> str:
    """How messages name unit i: by its model alone, or with its number among several."""
    return f"ControlNet '{units[i].model}'" if len(units) == 1 else f"ControlNet unit {i} ('{units[i].model}')"


def model_name(title: str) -> str:
    """A1111's model title 'NAME [hash]' -> NAME."""
    return _HASH.sub("", title.strip())


def label(value: Any, labels: tuple[str, ...], aliases: Mapping[Any, str]) -> Any:
    """A mode given as its label (any case), a short name or A1111's int -> the label; anything else unchanged (for
    `check` to refuse by name)."""
    if isinstance(value, str):
        lowered = value.strip().lower()
        return next((l for l in labels if l.lower() == lowered), aliases.get(lowered, value))
    return aliases.get(value, value) if isinstance(value, int) and not isinstance(value, bool) else value


# the command line's per-unit options (dests) -> unit fields
OPTION_FIELDS = {"control_weight": "weight", "control_start": "start", "control_end": "end",
                 "control_preprocess": "preprocess", "canny_low": "threshold_a", "canny_high": "threshold_b",
                 "control_mode": "control_mode", "control_resize": "resize_mode"}


def units_from_options(models: list[str], images: list[Image.Image], options: Mapping[str, list | None],
                       base: Sequence[ControlUnit] = (), base_source: str = "") -> tuple[ControlUnit, ...]:
    """The command line's units: one per --controlnet MODEL or, without any, those of a --from-png (`base`, read
    from `base_source`); each option in `options` (OPTION_FIELDS' dests) given once for every unit or once per unit;
    one image per unit."""
    given = [f"--{k.replace('_', '-')}" for k, v in options.items() if v] + (["--control-image"] if images else [])
    units = [ControlUnit(m) for m in models] or list(base)
    if not units:
        if given:
            raise UserError(f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} with --controlnet MODEL")
        return ()
    n = len(units)
    if not models and not images:
        names = ", ".join(f"'{u.model}'" for u in units)
        raise UserError(f"'{base_source}' was made with {n} ControlNet unit(s) ({names}); the control image is not "
                        "in the PNG: pass --control-image FILE (one per unit) to replay it, like --init-image")
    if len(images) != n:
        raise UserError(f"--control-image was given {len(images)} time(s) for {n} ControlNet(s): give one per "
                        "--controlnet, in the same order")
    changes: list[dict[str, Any]] = [{} for _ in units]
    for option, values in options.items():
        if not values:
            continue
        if len(values) not in (1, n):
            raise UserError(f"--{option.replace('_', '-')} was given {len(values)} times for {n} ControlNets: give "
                            "it once (for all) or once per --controlnet")
        for i in range(n):
            changes[i][OPTION_FIELDS[option]] = values[0] if len(values) == 1 else values[i]
    out = []
    for unit, image, change in zip(units, images, changes):
        if "control_mode" in change:
            change["control_mode"] = label(change["control_mode"], CONTROL_MODES, MODE_ALIASES)
        if "resize_mode" in change:
            change["resize_mode"] = label(change["resize_mode"], RESIZE_MODES, RESIZE_ALIASES)
        if change.get("preprocess") is not None:
            change["preprocess"] = change["preprocess"].lower()
            if change["preprocess"] != unit.preprocess:  # the PNG's thresholds were another preprocessor's
                change = {"threshold_a": None, "threshold_b": None, **change}
        out.append(replace(unit, image=image, **change))
    return tuple(out)


def units_from_a1111(args: Any, init_image: Image.Image | None = None) -> tuple[ControlUnit, ...]:
    """`alwayson_scripts.controlnet.args` of an A1111 API request (images already decoded to PIL images) -> the
    enabled ControlNet units (not the IP-Adapter ones: `ldm.ip_adapter.unit.units_from_a1111`). As the extension
    does: a unit is used only with `"enabled": true`; -1 (or no value) for a threshold means the preprocessor's
    default; an img2img unit without an image takes the init image."""
    if not isinstance(args, list):
        raise UserError("alwayson_scripts.controlnet.args must be a list of ControlNet units")
    units = []
    for i, raw in enumerate(args):
        if not isinstance(raw, dict):
            raise UserError(f"alwayson_scripts.controlnet.args[{i}] must be an object (a ControlNet unit)")
        values = {{"input_image": "image", "guidance": "guidance_end"}.get(k, k): v for k, v in raw.items()}
        if not values.get("enabled", False) or is_ip_adapter_unit(raw):  # ldm/ip_adapter/unit.py takes those
            continue
        model = values.get("model")
        if not isinstance(model, str) or model_name(model) in ("", "None"):
            raise UserError(f"ControlNet unit {i} is enabled but names no model (GET /controlnet/model_list)")
        module = values.get("module") or "none"
        image = values.get("image") if values.get("image") is not None else init_image
        if image is None:
            raise UserError(f"ControlNet unit {i} has no image: send it as 'image' (base64), or use img2img, whose "
                            "init image a unit without one takes")
        thresholds = [values.get(k) for k in ("threshold_a", "threshold_b")]
        thresholds = [None if t is None or t == -1 else t for t in thresholds]
        units.append(ControlUnit(
            model=model_name(model), image=image, weight=_number(values.get("weight", 1.0), "weight", i),
            start=_number(values.get("guidance_start", 0.0), "guidance_start", i),
            end=_number(values.get("guidance_end", 1.0), "guidance_end", i),
            preprocess=str(module).lower(), threshold_a=_number(thresholds[0], "threshold_a", i),
            threshold_b=_number(thresholds[1], "threshold_b", i),
            control_mode=label(values.get("control_mode", CONTROL_MODES[0]), CONTROL_MODES, MODE_ALIASES),
            resize_mode=label(values.get("resize_mode", RESIZE_MODES[0]), RESIZE_MODES, RESIZE_ALIASES)))
    return tuple(units)


def _number(value: Any, name: str, i: int) -> float | None:
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    raise UserError(f"ControlNet unit {i}: {name} must be a number, got {value!r}")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
