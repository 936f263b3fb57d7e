"""Samplers by name: diffusers schedulers built from the model's own scheduler config, never clipping latents.

The model's `scheduler/scheduler_config.json` carries what the U-Net was trained with (beta schedule, number of
training steps, `prediction_type` eps or v, timestep spacing); `SchedulerClass.from_config(config, ...)` keeps all
of it and changes only the solver. Latent clipping (`clip_sample`, dynamic `thresholding`) is forced off: SD
latents routinely exceed [-1, 1], and a sampler that clamps x0 to that range washes images out.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ldm.errors import UserError


@dataclass(frozen=True)
class Sampler:
    cls: type[SchedulerMixin]
    label: str  # AUTOMATIC1111's name, written into the PNG metadata so other tools recognise it
    options: dict[str, Any] = field(default_factory=dict)  # fixed solver choices (not the model's training config)
    karras: bool = False  # Karras et al. (2022) sigma spacing, only for classes with `use_karras_sigmas`


SAMPLERS: dict[str, Sampler] = {
    "ddim": Sampler(DDIMScheduler, "DDIM"),
    "ddpm": Sampler(DDPMScheduler, "DDPM"),
    "euler": Sampler(EulerDiscreteScheduler, "Euler"),
    "euler_a": Sampler(EulerAncestralDiscreteScheduler, "Euler a"),
    "dpmpp_2m": Sampler(DPMSolverMultistepScheduler, "DPM++ 2M", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": Sampler(
        DPMSolverMultistepScheduler, "DPM++ 2M", {"algorithm_type": "dpmsolver++", "solver_order": 2}, karras=True
    ),
    "unipc": Sampler(UniPCMultistepScheduler, "UniPC"),
    "pndm": Sampler(PNDMScheduler, "PLMS", {"skip_prk_steps": True}),
    "lms": Sampler(LMSDiscreteScheduler, "LMS"),
    "heun": Sampler(HeunDiscreteScheduler, "Heun"),
}


def check_sampler(name: str, karras: bool = False) -> None:
    """Raise a `UserError` listing the known samplers, or saying which ones take Karras sigmas."""
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler '{name}'; known samplers: {', '.join(SAMPLERS)}")
    if karras and "use_karras_sigmas" not in _init_params(SAMPLERS[name].cls):
        with_karras = [n for n, s in SAMPLERS.items() if "use_karras_sigmas" in _init_params(s.cls)]
        raise UserError(f"sampler '{name}' has no Karras sigmas option; samplers with one: {', '.join(with_karras)}")


def sampler_label(name: str, karras: bool = False) -> str:
    """'dpmpp_2m' + karras -> 'DPM++ 2M Karras' (AUTOMATIC1111's spelling)."""
    s = SAMPLERS[name]
    return s.label + (" Karras" if karras or s.karras else "")


# AUTOMATIC1111's other spellings of the samplers we have (its `aliases`, from modules/sd_samplers_kdiffusion.py):
# alias -> (our name, karras). Its labels themselves ("Euler a", "DPM++ 2M", "PLMS", ...) are in SAMPLERS.
A1111_ALIASES: dict[str, tuple[str, bool]] = {
    "k_euler_a": ("euler_a", False), "k_euler_ancestral": ("euler_a", False), "k_euler": ("euler", False),
    "k_lms": ("lms", False), "k_lms_ka": ("lms", True), "k_heun": ("heun", False),
    "k_dpmpp_2m": ("dpmpp_2m", False), "k_dpmpp_2m_ka": ("dpmpp_2m", True),
}


def sampler_from_label(label: str) -> tuple[str, bool]:
    """A sampler as a user or a PNG names it -> (our name, karras), case-insensitive: our names ('dpmpp_2m'),
    AUTOMATIC1111's labels with or without ' Karras' ('DPM++ 2M Karras' -> ('dpmpp_2m', True), 'Euler a', 'DDIM',
    'PLMS') and its k_ aliases ('k_dpmpp_2m_ka'). The inverse of `sampler_label`."""
    text = " ".join(label.split()).lower()
    if text in SAMPLERS:
        return text, False  # dpmpp_2m_karras carries its Karras spacing itself
    if text in A1111_ALIASES:
        return A1111_ALIASES[text]
    karras = text.endswith(" karras")
    base = text[: -len(" karras")] if karras else text
    for name, s in SAMPLERS.items():
        if not s.karras and base in (name, s.label.lower()):
            return name, karras
    raise UserError(
        f"unknown sampler '{label}'; known samplers: {', '.join(SAMPLERS)} (or AUTOMATIC1111's names for them: "
        f"{', '.join(dict.fromkeys(s.label for s in SAMPLERS.values()))}, with ' Karras' where it applies)"
    )


def make_scheduler(name: str, model_config: Mapping[str, Any], karras: bool = False) -> SchedulerMixin:
    """A fresh scheduler of the named kind from the model's scheduler config; each call returns independent state."""
    check_sampler(name, karras)
    sampler = SAMPLERS[name]
    params = _init_params(sampler.cls)
    overrides: dict[str, Any] = dict(sampler.options)
    # clamping x0 to [-1, 1] is a pixel-space DDPM habit that is wrong for latents; turn it off wherever it exists
    if "clip_sample" in params:
        overrides["clip_sample"] = False
    if "thresholding" in params:
        overrides["thresholding"] = False
    # set from the name, not inherited: a model saved with a Karras config must not change what 'euler' means
    if "use_karras_sigmas" in params:
        overrides["use_karras_sigmas"] = karras or sampler.karras
    return sampler.cls.from_config(dict(model_config), **overrides)


def _init_params(cls: type) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters)
