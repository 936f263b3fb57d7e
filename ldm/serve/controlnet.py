"""The A1111 ControlNet extension's API on `ldm-serve`: its units in a request's
`alwayson_scripts.controlnet.args`, and its listing routes.

    "alwayson_scripts": {"controlnet": {"args": [{"enabled": true, "image": "<base64>", "module": "canny",
        "model": "control_v11p_sd15_canny [d14c016b]", "weight": 1.0, "guidance_start": 0.0,
        "guidance_end": 1.0, "control_mode": "Balanced"}]}}

Field names and defaults as the extension's `ControlNetUnit` (internal_controlnet/args.py; ldm/controlnet/unit.py
maps them); an image may be a base64 string or {"image": base64}. A unit names its model by name (A1111's title
'NAME [hash]' or NAME), never a path: the names are those of the server's --controlnet-dir, and any other is
refused (422, listing what there is). `GET /controlnet/model_list` lists them as A1111's titles;
`GET /controlnet/module_list` the preprocessors with their sliders, as the extension's routes do (scripts/api.py).

IP-Adapters come the extension's way too: a unit whose `module` is an IP-Adapter preprocessor ('ip-adapter_clip_sd15',
'ip-adapter-auto', ...: ldm/ip_adapter/unit.py), `model` an adapter of the server's --ip-adapter-dir (by name, as
ControlNets), `weight` its scale, `image` the image prompt. The model list has them with the ControlNets, as the
extension lists its one models folder; the worker puts a request's adapters on the model before it runs
(`Pipeline.use_ip_adapters`), and takes them off for a request without any.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi import APIRouter

from ldm.controlnet.load import inspect_controlnet, list_controlnets
from ldm.controlnet.unit import CANNY_RANGE, THRESHOLDS, ControlUnit
from ldm.errors import UserError
from ldm.files import a1111_model_hash
from ldm.image_io import decode_base64_image
from ldm.ip_adapter.format import list_ip_adapters
from ldm.ip_adapter.unit import A1111_MODULES, IPAdapterUnit
from ldm.models.ip_adapter import IPAdapterSpec, inspect_ip_adapter
from ldm.models.spec import ModelSpec
from ldm.pipeline.metadata import PROCESSOR_RES

log = logging.getLogger(__name__)

# the extension's module_detail for the preprocessors this server has (scripts/supported_preprocessor.py)
_RESOLUTION = {"name": "Resolution", "value": PROCESSOR_RES, "min": 64, "max": 2048, "step": 8}
MODULES = {
    "none": {"model_free": False, "sliders": [_RESOLUTION]},
    "canny": {"model_free": False, "sliders": [
        _RESOLUTION,
        {"name": "Low Threshold", "value": THRESHOLDS["canny"][0], "min": CANNY_RANGE[0], "max": CANNY_RANGE[1],
         "step": 1},
        {"name": "High Threshold", "value": THRESHOLDS["canny"][1], "min": CANNY_RANGE[0], "max": CANNY_RANGE[1],
         "step": 1}]},
}
# listed with an --ip-adapter-dir; no sliders (no resolution: the image encoder's preprocessing sizes the image)
IP_ADAPTER_MODULES = {name: {"model_free": False, "sliders": []} for name in A1111_MODULES}


def decode_unit_images(scripts: Mapping[str, Any] | None, max_pixels: int) -> dict[str, Any]:
    """`alwayson_scripts` with the ControlNet units' base64 images decoded into PIL images (the other scripts are
    dropped: this server runs none of them)."""
    scripts = {str(k).lower(): v for k, v in (scripts or {}).items()}
    controlnet = scripts.get("controlnet")
    if not isinstance(controlnet, dict) or not isinstance(controlnet.get("args"), list):
        return {"controlnet": controlnet} if controlnet else {}
    args = []
    for i, unit in enumerate(controlnet["args"]):
        if isinstance(unit, dict) and unit.get("enabled"):
            unit = dict(unit)
            key = "image" if "image" in unit else "input_image"
            image = unit.get(key)
            if isinstance(image, dict):  # {"image": ..., "mask": ...}: the mask is for inpainting modules only
                image = image.get("image")
            if image is not None:
                if not isinstance(image, str):
                    raise UserError(f"ControlNet unit {i}: 'image' must be a base64 image (or {{\"image\": "
                                    "base64}})")
                unit[key] = decode_base64_image(image, f"ControlNet unit {i} image", max_pixels)
        args.append(unit)
    return {"controlnet": {"args": args}}


def check_unit_names(units: tuple[ControlUnit, ...], directory: str | Path | None) -> None:
    """Every unit names a ControlNet of --controlnet-dir by name (never a path); 422 listing them otherwise."""
    if not units:
        return
    listed = list_controlnets(directory) if directory is not None else {}
    for i, unit in enumerate(units):
        if unit.model not in listed:
            there = ", ".join(listed) or "none: start ldm-serve with --controlnet-dir DIR"
            raise UserError(f"ControlNet unit {i}: model '{unit.model}' is not one of this server's ControlNets "
                            f"({there}; GET /controlnet/model_list)")


def ip_adapter_specs(units: tuple[IPAdapterUnit, ...], model: ModelSpec, directory: str | Path | None,
                     image_encoder: str | None = None) -> tuple[IPAdapterSpec, ...]:
    """The specs of the adapters `units` name, for `model`: each a name in --ip-adapter-dir (never a path; 422
    listing them otherwise), checked as the CLI checks --ip-adapter (family, image encoder: next to the adapter
    unless the server's --ip-image-encoder). Reads headers and configs only."""
    listed = list_ip_adapters(directory) if directory is not None and units else {}
    specs = []
    for unit in units:
        if unit.model not in listed:
            there = ", ".join(listed) or "none: start ldm-serve with --ip-adapter-dir DIR"
            raise UserError(f"IP-Adapter '{unit.model}' is not one of this server's IP-Adapters ({there}; "
                            "GET /controlnet/model_list)")
        specs.append(inspect_ip_adapter(listed[unit.model], model, image_encoder, label=unit.model))
    return tuple(specs)


def build_controlnet_router(directory: str | Path | None, ip_adapter_dir: str | Path | None = None) -> APIRouter:
    router = APIRouter(prefix="/controlnet")

    @router.get("/model_list")
    def model_list(update: bool = True):
        listed = list_controlnets(directory) if directory is not None else {}
        adapters = list_ip_adapters(ip_adapter_dir) if ip_adapter_dir is not None else {}
        return {"model_list": [inspect_controlnet(path).title for path in listed.values()]
                + [f"{name} [{a1111_model_hash(path)}]" for name, path in adapters.items()]}

    @router.get("/module_list")
    def module_list(alias_names: bool = False):
        modules = {**MODULES, **(IP_ADAPTER_MODULES if ip_adapter_dir is not None else {})}
        return {"module_list": list(modules), "module_detail": modules}

    @router.get("/version")
    def version():
        return {"version": 3}  # the extension's get_api_version()

    return router
