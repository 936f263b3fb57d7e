"""A generation request as AUTOMATIC1111-style PNG text ('parameters' tEXt chunk), both ways.

    a red car
    Negative prompt: blurry
    Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: sd15,
    Denoising strength: 0.6                                                                   <- one line in the file

Other tools (A1111, ComfyUI readers, image browsers) read this chunk; `--from-png` parses it back into arguments.
A hires-fix image is written as A1111 writes one: `Size` is the first pass's size, `Denoising strength` the second
pass's strength, then `Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent` (`Hires steps` only when it is not
the first pass's number of steps). The schedule is written as A1111 >= 1.9 writes it, `Schedule type: Karras` or
`Schedule type: SGM Uniform` after the sampler (left out for the sampler's own, A1111's "Automatic", which A1111
reads a missing field as); older texts with the schedule in the sampler's name (`Sampler: DPM++ 2M Karras`) read too.
TCD's gamma is written as `Eta` (A1111's name for a sampler's eta). ControlNet units are written as the A1111
ControlNet extension writes them (scripts/infotext.py, `ControlNetUnit.serialize`: its infotext fields, `str()` of
each value), one field per unit:

    ControlNet 0: "Module: canny, Model: NAME [hash], Weight: 1.0, Resize Mode: Crop and Resize, Processor Res: 512,
    Threshold A: 100, Threshold B: 200, Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: True,
    Control Mode: Balanced"

Preprocessing runs at the generation size, A1111's "Pixel Perfect", which is what is written (the processor
resolution, then unused, as its default 512); the control image itself is not in the PNG.
"""

from __future__ import annotations

import io
import json
import re
from typing import Any

from PIL import Image, PngImagePlugin

from ldm.controlnet.unit import ControlUnit, model_name
from ldm.errors import UserError
from ldm.ip_adapter.unit import FIELD as IP_ADAPTER_FIELD
from ldm.ip_adapter.unit import png_fields as ip_adapter_fields
from ldm.ip_adapter.unit import units_from_fields as ip_adapter_units
from ldm.pipeline.request import GenerationRequest
from ldm.pipeline.samplers import SAMPLERS, SCHEDULES, sampler_from_label, sampler_label, schedule_from_label

PNG_KEY = "parameters"


def format_parameters(p: GenerationRequest) -> str:
    """The one writer of the `parameters` text: a resolved request (one image's: its seed) as A1111 writes it."""
    lines = [p.prompt]
    if p.negative_prompt:
        lines.append(f"Negative prompt: {p.negative_prompt}")
    fields: list[tuple[str, Any]] = [
        ("Steps", p.steps),
        ("Sampler", sampler_label(p.sampler)),
    ]
    schedule = p.schedule or SAMPLERS[p.sampler].schedule
    if schedule:
        fields.append(("Schedule type", SCHEDULES[schedule].label))
    fields += [
        ("CFG scale", _num(p.cfg)),
        ("Seed", p.seed),
    ]
    if p.noise:  # ComfyUI's convention: the batch's noise from one generator (ldm.pipeline.seeds.batch_noise)
        fields.append(("Noise", p.noise))
    fields += [
        ("Size", f"{p.width}x{p.height}"),
        ("Model", p.model),
    ]
    if p.strength is not None:
        fields.append(("Denoising strength", _num(p.strength)))
    if p.hires_strength is not None:
        fields.append(("Denoising strength", _num(p.hires_strength)))
    if p.mask_blur is not None:
        fields.append(("Mask blur", p.mask_blur))
    if p.guidance_rescale:
        fields.append(("CFG rescale", _num(p.guidance_rescale)))
    if p.eta is not None:
        fields.append(("Eta", _num(p.eta)))
    if p.hires_scale is not None:
        fields.append(("Hires upscale", _num(p.hires_scale)))
        if p.hires_steps:
            fields.append(("Hires steps", p.hires_steps))
        fields.append(("Hires upscaler", HIRES_UPSCALER_LABELS.get(p.hires_upscaler or "", p.hires_upscaler)))
    if p.lora_hashes:
        fields.append(("Lora hashes", p.lora_hashes))
    if p.ti_hashes:
        fields.append(("TI hashes", p.ti_hashes))
    if p.clip_skip != 1:
        fields.append(("Clip skip", p.clip_skip))
    if p.refiner:  # as A1111 writes it
        fields.append(("Refiner", p.refiner))
        fields.append(("Refiner switch at", _num(p.refiner_switch)))
    for name, label in SDXL_LABELS.items():  # ours (A1111 has these as settings): only those given
        value = getattr(p, name)
        if value is not None:
            fields.append((label, _num(value) if name.endswith("aesthetic_score") else _pair(name, value)))
    # ours (A1111 has no core field; ldm/ip_adapter/unit.py says why not the ControlNet extension's form)
    fields += ip_adapter_fields(p.ip_adapters)
    for i, unit in enumerate(p.controlnets):
        fields.append((f"ControlNet {i}", format_unit(unit)))
    lines.append(", ".join(f"{k}: {_quote(str(v))}" for k, v in fields))
    return "\n".join(lines)


# `Key: value` pairs, the value either a JSON string (when it holds a comma, colon or quote) or up to the next comma
_FIELD = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


# SDXL's micro-conditioning, written when set: sizes as "WxH" (as Size), crops as "top, left"
SDXL_LABELS = {
    "original_size": "Original size", "crop_top_left": "Crop top left", "target_size": "Target size",
    "negative_original_size": "Negative original size", "negative_crop_top_left": "Negative crop top left",
    "negative_target_size": "Negative target size", "aesthetic_score": "Aesthetic score",
    "negative_aesthetic_score": "Negative aesthetic score",
}

# the fields `parse_parameters` reads; `unread_fields` names the others (A1111 writes many: Model hash, Version, ...)
READ_FIELDS = (
    "Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Noise", "Size", "Model", "Denoising strength", "Mask blur",
    "CFG rescale", "Eta", "Hires upscale", "Hires steps", "Hires upscaler", "Lora hashes", "TI hashes", "Clip skip",
    "Refiner",
    "Refiner switch at", *SDXL_LABELS.values(),
)
HIRES_UPSCALER_LABELS = {"latent": "Latent", "lanczos": "Lanczos"}  # ours -> A1111's names


def parameter_fields(text: str) -> dict[str, str]:
    """The `Key: value` pairs of the last line (unquoted), as written; {} when there is no such line."""
    lines = text.strip("\n").split("\n")
    fields_line = lines[-1] if lines and "Steps:" in lines[-1] else ""
    return {k.strip(): _unquote(v.strip()) for k, v in _FIELD.findall(fields_line)}


def unread_fields(text: str) -> list[str]:
    """The field names in `text` that `parse_parameters` drops, in their order."""
    return [k for k in parameter_fields(text)
            if k not in READ_FIELDS and not IP_ADAPTER_FIELD.fullmatch(k) and not CONTROLNET_FIELD.fullmatch(k)]


def parse_parameters(text: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Inverse of `format_parameters` -> a dict of GenerationRequest field names (a layer for `layered`); keys it does not know are dropped.

    The last line holds the `Key: value` list; the lines before it are the prompt, up to a line starting with
    'Negative prompt:' (the rest up to the last line is the negative prompt), as A1111 writes it
    (modules/infotext_utils.py, parse_generation_parameters). Fields named in `skip` are not read (the CLI skips
    those the user overrides, so that e.g. a sampler we lack does not stop a replay with `--sampler`).
    """
    lines = text.strip("\n").split("\n")
    if lines and "Steps:" in lines[-1]:
        lines.pop()
    prompt_lines: list[str] = []
    negative_lines: list[str] | None = None
    for line in lines:
        if negative_lines is None and line.startswith("Negative prompt:"):
            negative_lines = [line[len("Negative prompt:"):].strip()]
        elif negative_lines is not None:
            negative_lines.append(line)
        else:
            prompt_lines.append(line)
    out: dict[str, Any] = {"prompt": "\n".join(prompt_lines)}
    if negative_lines is not None:
        out["negative_prompt"] = "\n".join(negative_lines)

    raw = {k: v for k, v in parameter_fields(text).items() if k not in skip}
    if "Steps" in raw:
        out["steps"] = int(raw["Steps"])
    if "Sampler" in raw:  # older A1111 versions put the schedule into the sampler's name: 'DPM++ 2M Karras'
        out["sampler"], out["schedule"] = sampler_from_label(raw["Sampler"])
    schedule = _schedule(raw.get("Schedule type", ""))  # newer ones write it apart
    if schedule:
        out["schedule"] = schedule
    if "CFG scale" in raw:
        out["cfg"] = float(raw["CFG scale"])
    if "Seed" in raw:
        out["seed"] = int(raw["Seed"])
    if "Noise" in raw:
        out["noise"] = raw["Noise"]
    if "Size" in raw:
        width, height = raw["Size"].lower().split("x")
        out["width"], out["height"] = int(width), int(height)
    if "Model" in raw:
        out["model"] = raw["Model"]
    hires = "Hires upscale" in raw
    if "Denoising strength" in raw:  # with a hires fix, the second pass's strength (the image is txt2img)
        out["hires_strength" if hires else "strength"] = float(raw["Denoising strength"])
    if hires:
        out["hires_scale"] = float(raw["Hires upscale"])
        out["hires_steps"] = int(raw.get("Hires steps", 0))
        upscaler = raw.get("Hires upscaler", "Latent")  # A1111's default (its latent_upscale_default_mode)
        labels = {v.lower(): k for k, v in HIRES_UPSCALER_LABELS.items()}
        out["hires_upscaler"] = labels.get(upscaler.lower(), upscaler)  # another name is refused where it is used
    if "Mask blur" in raw:
        out["mask_blur"] = int(raw["Mask blur"])
    if "CFG rescale" in raw:
        out["guidance_rescale"] = float(raw["CFG rescale"])
    if "Eta" in raw and SAMPLERS[out.get("sampler", "euler_a")].eta is not None:  # A1111 writes it for others too
        out["eta"] = float(raw["Eta"])
    if "Lora hashes" in raw:
        out["lora_hashes"] = raw["Lora hashes"]
    if "TI hashes" in raw:
        out["ti_hashes"] = raw["TI hashes"]
    if "Clip skip" in raw:
        out["clip_skip"] = int(raw["Clip skip"])
    if "Refiner" in raw:  # A1111 writes the checkpoint's title: "sd_xl_refiner_1.0 [7440042bbd]"
        out["refiner"] = re.sub(r" \[[0-9a-f]{8,10}\]$", "", raw["Refiner"])
        if "Refiner switch at" in raw:
            out["refiner_switch"] = float(raw["Refiner switch at"])
    for name, label in SDXL_LABELS.items():
        if label in raw:
            out[name] = float(raw[label]) if name.endswith("aesthetic_score") else _read_pair(name, raw[label])
    if "IP-Adapter" in raw:  # without their images, which the PNG does not hold
        out["ip_adapters"] = ip_adapter_units(raw)
    units = sorted((int(m[1]), v) for k, v in raw.items() if (m := CONTROLNET_FIELD.fullmatch(k)))
    if units and "ControlNet" not in skip:
        out["controlnets"] = tuple(parse_unit(v) for _, v in units)
    return out


def _schedule(label: str) -> str:
    """A "Schedule type" -> ours; one we do not have (A1111's Exponential, ...) -> '' (ldm.pipeline.a1111 warns)."""
    try:
        return schedule_from_label(label)
    except UserError:
        return ""
# ------------------------------------------------------------------------------------------------- ControlNet units
CONTROLNET_FIELD = re.compile(r"ControlNet (\d+)")
PROCESSOR_RES = 512  # A1111's default preprocessor resolution; with Pixel Perfect it is not used


def format_unit(u: ControlUnit) -> str:
    """One unit as the extension serialises it: `Field: str(value)` joined by ', ', in its field order."""
    a, b = u.thresholds()
    values = (("Module", u.preprocess), ("Model", u.model), ("Weight", float(u.weight)),
              ("Resize Mode", u.resize_mode), ("Processor Res", PROCESSOR_RES), ("Threshold A", a),
              ("Threshold B", b), ("Guidance Start", float(u.start)), ("Guidance End", float(u.end)),
              ("Pixel Perfect", True), ("Control Mode", u.control_mode))
    return ", ".join(f"{k}: {v}" for k, v in values)


def parse_unit(text: str) -> ControlUnit:
    """`format_unit`'s text (or the extension's, older ones' `Low Vram` too) -> a unit without its image."""
    values = dict(item.strip().partition(": ")[::2] for item in text.split(","))

    def number(key: str, default: float) -> float:
        try:
            return float(values[key])
        except (KeyError, ValueError):
            return default

    preprocess = values.get("Module", "none").strip().lower()
    thresholds = [number(k, -1) for k in ("Threshold A", "Threshold B")]
    thresholds = [None if t == -1 else int(t) if preprocess == "canny" and t.is_integer() else t for t in thresholds]
    return ControlUnit(model=model_name(values.get("Model", "")), weight=number("Weight", 1.0),
                       start=number("Guidance Start", 0.0), end=number("Guidance End", 1.0), preprocess=preprocess,
                       threshold_a=thresholds[0], threshold_b=thresholds[1],
                       control_mode=values.get("Control Mode", "Balanced"),
                       resize_mode=values.get("Resize Mode", "Crop and Resize"))


def _pair(name: str, value: tuple[int, int]) -> str:
    """(height, width) -> 'WxH'; (top, left) -> 'top, left'."""
    return f"{value[0]}, {value[1]}" if "crop" in name else f"{value[1]}x{value[0]}"


def _read_pair(name: str, text: str) -> tuple[int, int] | None:
    try:
        if "crop" in name:
            top, left = text.split(",")
            return int(top), int(left)
        width, height = text.lower().split("x")
        return int(height), int(width)
    except ValueError:
        return None  # not ours: left to the default


def _num(x: float) -> str:
    """7.5 -> '7.5', 7.0 -> '7' (A1111 writes floats with repr, which round-trips exactly)."""
    return repr(int(x)) if float(x).is_integer() else repr(float(x))


def _quote(value: str) -> str:
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ',:"\n') else value


def _unquote(value: str) -> str:
    if value.startswith('"') and value.endswith('"') and len(value) >= 2:
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def png_info(p: GenerationRequest, extra: dict[str, str] | None = None) -> PngImagePlugin.PngInfo:
    """The PNG chunk every writer of our images adds (the CLI, prompt lists, the server), then `extra` text chunks
    (ComfyUI's `prompt` and `workflow`: `comfy_chunks`)."""
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_KEY, format_parameters(p))
    for key, value in (extra or {}).items():
        info.add_text(key, value)
    return info


def comfy_chunks(graph: dict, extra_pnginfo: dict | None = None) -> dict[str, str]:
    """The text chunks ComfyUI's SaveImage writes (comfyanonymous/ComfyUI nodes.py): `prompt`, the API graph as
    JSON, then each key of the request's `extra_data.extra_pnginfo` (the UI sends `workflow`) as JSON."""
    out = {"prompt": json.dumps(graph)}
    for key, value in (extra_pnginfo or {}).items():
        out[str(key)] = json.dumps(value)
    return out


def png_bytes(image: Image.Image, p: GenerationRequest, extra: dict[str, str] | None = None) -> bytes:
    """The PNG file of `image` with its `parameters` chunk (and `extra` text chunks), as bytes."""
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=png_info(p, extra))
    return out.getvalue()
