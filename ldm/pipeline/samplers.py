"""Samplers and schedules by name: diffusers schedulers built from the model's own scheduler config, never clipping
latents.

The model's `scheduler/scheduler_config.json` carries what the U-Net was trained with (beta schedule, number of
training steps, `prediction_type` eps or v, timestep spacing); `SchedulerClass.from_config(config, ...)` keeps all
of it and changes only the solver. Latent clipping (`clip_sample`, dynamic `thresholding`) is forced off: SD
latents routinely exceed [-1, 1], and a sampler that clamps x0 to that range washes images out.

Two kinds of model config change what a name means. A zero-terminal-SNR model (`rescale_betas_zero_snr`, Lin et al.
2023) ships `timestep_spacing="trailing"`, so its '' schedule starts at the pure-noise timestep; samplers whose diffusers
class cannot rescale its betas are refused. A flow-matching model (`FlowMatchEulerDiscreteScheduler`, trained with
`noise.prediction_type: flow`) is sampled by 'euler' only: diffusers' flow-matching Euler, as its own pipelines run it.

A sampler (the solver: 'euler_a', 'lcm', ...) and a schedule (where its steps fall: '' = the sampler's own, as the
model's config says; 'karras'; 'sgm_uniform') are chosen apart, as AUTOMATIC1111 >= 1.9 ("Sampler", "Schedule type")
and ComfyUI (`sampler_name`, `scheduler`) choose them.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    TCDScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ldm.errors import UserError


@dataclass(frozen=True)
class Sampler:
    cls: type[SchedulerMixin]
    label: str  # AUTOMATIC1111's name (its "Sampler" field), written into the PNG metadata so other tools know it
    options: dict[str, Any] = field(default_factory=dict)  # fixed solver choices (not the model's training config)
    schedule: str = ""  # a schedule the name itself carries (dpmpp_2m_karras), a key of SCHEDULES
    # LCM and TCD take their timesteps from their distillation grid (`original_inference_steps` 50: 4 steps are
    # 999, 759, 499, 259) whatever `timestep_spacing` says; SGM Uniform is given to them as explicit timesteps
    # (ComfyUI's usual lcm + sgm_uniform), Karras not at all
    own_timesteps: bool = False
    eta: float | None = None  # the default stochasticity of each step (TCD's gamma), None: the sampler has none


# the default of TCD's gamma (diffusers' `eta`): the TCD paper's and diffusers' TCD docs' 0.3; 0 = deterministic
# (multistep consistency sampling), 1 = each step re-noises from scratch as LCM does
TCD_GAMMA = 0.3

SAMPLERS: dict[str, Sampler] = {
    "ddim": Sampler(DDIMScheduler, "DDIM"),
    "ddpm": Sampler(DDPMScheduler, "DDPM"),
    "euler": Sampler(EulerDiscreteScheduler, "Euler"),
    "euler_a": Sampler(EulerAncestralDiscreteScheduler, "Euler a"),
    "dpmpp_2m": Sampler(DPMSolverMultistepScheduler, "DPM++ 2M", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": Sampler(
        DPMSolverMultistepScheduler, "DPM++ 2M", {"algorithm_type": "dpmsolver++", "solver_order": 2},
        schedule="karras",
    ),
    "unipc": Sampler(UniPCMultistepScheduler, "UniPC"),
    "pndm": Sampler(PNDMScheduler, "PLMS", {"skip_prk_steps": True}),
    "lms": Sampler(LMSDiscreteScheduler, "LMS"),
    "heun": Sampler(HeunDiscreteScheduler, "Heun"),
    # few-step samplers for consistency-distilled models (LCM-LoRA, LCM checkpoints; TCD-LoRA, Hyper-SD): A1111 and
    # ComfyUI call the first LCM / lcm; TCD is not in either (SD.Next and A1111 extensions label it "TCD")
    "lcm": Sampler(LCMScheduler, "LCM", own_timesteps=True),
    "tcd": Sampler(TCDScheduler, "TCD", own_timesteps=True, eta=TCD_GAMMA),
}


@dataclass(frozen=True)
class Schedule:
    label: str  # AUTOMATIC1111's "Schedule type" (modules/sd_schedulers.py)
    param: str  # the diffusers scheduler argument that makes it ...
    value: Any  # ... and its value
    aliases: tuple[str, ...] = ()  # A1111's other spellings


# '' (A1111's "Automatic", ComfyUI's default per sampler): the sampler's own spacing, as the model's config has it
SCHEDULES: dict[str, Schedule] = {
    # Karras et al. (2022) sigmas, rho 7, between the model's sigma_min and sigma_max
    "karras": Schedule("Karras", "use_karras_sigmas", True),
    # SGM Uniform (A1111, ComfyUI `sgm_uniform`): what SDXL-Lightning, SDXL-Turbo and Hyper-SD are sampled with;
    # here diffusers' timestep_spacing="trailing", which is what their model cards set. The two agree to within one
    # training timestep: k-diffusion / A1111 / ComfyUI take t_i = linspace(999, 0, n + 1)[:-1] (fractional; sigma
    # log-interpolated between the integer timesteps) and diffusers round(1000 - i * 1000 / n) - 1: 4 steps are
    # 999, 749.25, 499.5, 249.75 there and 999, 749, 499, 249 here. On SD's scaled-linear betas that moves the
    # sigmas by at most 0.28% at 4 steps and 0.49% at 8 (n = 1 is identical: t = 999); both end at sigma 0.
    "sgm_uniform": Schedule("SGM Uniform", "timestep_spacing", "trailing", aliases=("SGMUniform",)),
}
AUTOMATIC = "Automatic"  # A1111's label of the '' schedule
# A1111 "Schedule type"s that leave a sampler's own spacing (its "Uniform" is k-diffusion's linspace of timesteps,
# close to the models' own spacing and read as it, as before schedules were chosen by name)
_PLAIN_SCHEDULES = {"", "automatic", "uniform", "default"}


def supports(sampler: str, schedule: str) -> bool:
    """Whether `schedule` (a key of SCHEDULES, or '') can be applied to `sampler` (a key of SAMPLERS)."""
    s = SAMPLERS[sampler]
    if not schedule or schedule == s.schedule:
        return True
    if s.own_timesteps:
        return schedule == "sgm_uniform"
    return not s.schedule and SCHEDULES[schedule].param in _init_params(s.cls)


def check_sampler(name: str, schedule: str = "", eta: float | None = None) -> None:
    """Raise a `UserError` listing the known samplers or schedules, or the samplers that take the schedule or eta."""
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler '{name}'; known samplers: {', '.join(SAMPLERS)}")
    if schedule and schedule not in SCHEDULES:
        raise UserError(f"unknown schedule '{schedule}'; known schedules: {', '.join(SCHEDULES)} (or '' for the "
                        "sampler's own)")
    if not supports(name, schedule):
        takers = [n for n in SAMPLERS if not SAMPLERS[n].schedule and supports(n, schedule)]
        raise UserError(f"sampler '{name}' takes no {SCHEDULES[schedule].label} schedule; samplers that do: "
                        f"{', '.join(takers)}")
    if eta is not None:
        takers = [n for n, s in SAMPLERS.items() if s.eta is not None]
        if SAMPLERS[name].eta is None:
            raise UserError(f"--eta only applies to the {', '.join(takers)} sampler (TCD's gamma); sampler '{name}' "
                            "takes none")
        if not 0.0 <= eta <= 1.0:
            raise UserError(f"--eta (TCD's gamma) must be in [0, 1] (0 = deterministic), got {eta}")


def sampler_label(name: str) -> str:
    """'dpmpp_2m' -> 'DPM++ 2M': AUTOMATIC1111's "Sampler" field (the schedule goes in its own field)."""
    return SAMPLERS[name].label


def full_label(name: str, schedule: str = "") -> str:
    """A1111's sampler name before 1.9, the schedule in it: 'DPM++ 2M Karras', 'Euler SGM Uniform', 'Euler a'."""
    schedule = schedule or SAMPLERS[name].schedule
    return sampler_label(name) + (f" {SCHEDULES[schedule].label}" if schedule else "")


def schedule_label(schedule: str) -> str:
    """'' -> 'Automatic', 'karras' -> 'Karras', 'sgm_uniform' -> 'SGM Uniform' (A1111's "Schedule type")."""
    return SCHEDULES[schedule].label if schedule else AUTOMATIC


def schedule_from_label(label: str) -> str:
    """A schedule as a user, a PNG, A1111 or ComfyUI names it -> ours ('' for the sampler's own), case-insensitive:
    'Karras', 'SGM Uniform', 'sgm_uniform', 'SGMUniform', 'Automatic'."""
    text = " ".join(label.split()).lower()
    if text in _PLAIN_SCHEDULES:
        return ""
    for name, s in SCHEDULES.items():
        if text in (name, s.label.lower(), *(a.lower() for a in s.aliases)):
            return name
    raise UserError(f"unknown schedule '{label}'; known schedules: {', '.join(SCHEDULES)} "
                    f"({', '.join(s.label for s in SCHEDULES.values())}), or {AUTOMATIC} for the sampler's own")


# AUTOMATIC1111's other spellings of the samplers we have (its `aliases`, from modules/sd_samplers_kdiffusion.py and
# sd_samplers_lcm.py):
# alias -> (our name, schedule). Its labels themselves ("Euler a", "DPM++ 2M", "PLMS", ...) are in SAMPLERS.
A1111_ALIASES: dict[str, tuple[str, str]] = {
    "k_euler_a": ("euler_a", ""), "k_euler_ancestral": ("euler_a", ""), "k_euler": ("euler", ""),
    "k_lms": ("lms", ""), "k_lms_ka": ("lms", "karras"), "k_heun": ("heun", ""),
    "k_dpmpp_2m": ("dpmpp_2m", ""), "k_dpmpp_2m_ka": ("dpmpp_2m", "karras"), "k_lcm": ("lcm", ""),
    # ComfyUI's names where they differ from ours (comfy/samplers.py KSAMPLER_NAMES)
    "euler_ancestral": ("euler_a", ""), "uni_pc": ("unipc", ""),
}


def sampler_from_label(label: str) -> tuple[str, str]:
    """A sampler as a user or a PNG names it -> (our name, schedule), case-insensitive: our names ('dpmpp_2m'),
    AUTOMATIC1111's labels with or without a schedule in them ('DPM++ 2M Karras' -> ('dpmpp_2m', 'karras'),
    'Euler SGM Uniform', 'Euler a', 'LCM'), its k_ aliases ('k_dpmpp_2m_ka') and ComfyUI's ('euler_ancestral').
    The inverse of `full_label`."""
    text = " ".join(label.split()).lower()
    if text in SAMPLERS:
        return text, ""  # dpmpp_2m_karras carries its Karras spacing itself
    if text in A1111_ALIASES:
        return A1111_ALIASES[text]
    base, schedule = text, ""
    for name, s in SCHEDULES.items():  # A1111 (sd_samplers.get_sampler_and_scheduler) splits off any schedule's name
        for suffix in (s.label, name, *s.aliases):
            if text.endswith(" " + suffix.lower()):
                base, schedule = text[: -len(suffix) - 1], name
                break
        if schedule:
            break
    for name, s in SAMPLERS.items():
        if not s.schedule and base in (name, s.label.lower()):
            return name, schedule
    raise UserError(
        f"unknown sampler '{label}'; known samplers: {', '.join(SAMPLERS)} (or AUTOMATIC1111's names for them: "
        f"{', '.join(dict.fromkeys(s.label for s in SAMPLERS.values()))}, a schedule's name after it where it applies: "
        f"{', '.join(repr(' ' + s.label) for s in SCHEDULES.values())})"
    )


class FlowMatchEuler(FlowMatchEulerDiscreteScheduler):
    """diffusers' `FlowMatchEulerDiscreteScheduler` (x <- x + (sigma_next - sigma) v, unchanged) with the three
    members our denoising loop asks every scheduler for: the input is not scaled, pure noise has sigma 1, and
    img2img's re-noising is its `scale_noise`, (1 - sigma) x0 + sigma eps."""

    init_noise_sigma = 1.0

    def scale_model_input(self, sample, timestep=None):
        return sample

    def add_noise(self, original_samples, noise, timesteps):
        return self.scale_noise(original_samples, timesteps, noise)


FLOW_MATCHING = "FlowMatchEulerDiscreteScheduler"  # a model config's `_class_name` for a flow-matching model


def is_flow_matching(model_config: Mapping[str, Any]) -> bool:
    return model_config.get("_class_name") == FLOW_MATCHING


def make_scheduler(name: str, model_config: Mapping[str, Any], schedule: str = "",
                   eta: float | None = None) -> SchedulerMixin:
    """A fresh scheduler of the named kind and schedule from the model's scheduler config; each call returns
    independent state. `eta`: TCD's gamma (None: TCD_GAMMA), bound to every `step` call."""
    check_sampler(name, schedule, eta)
    if is_flow_matching(model_config):
        if name != "euler" or schedule:
            raise UserError(f"this is a flow-matching model: it samples with --sampler euler and the sampler's own "
                            f"schedule (diffusers' FlowMatchEulerDiscreteScheduler), not '{full_label(name, schedule)}'")
        return FlowMatchEuler.from_config(dict(model_config))
    sampler = SAMPLERS[name]
    schedule = schedule or sampler.schedule
    params = _init_params(sampler.cls)
    if model_config.get("rescale_betas_zero_snr") and "rescale_betas_zero_snr" not in params:
        takers = [n for n, s in SAMPLERS.items() if "rescale_betas_zero_snr" in _init_params(s.cls)]
        raise UserError(f"this is a zero-terminal-SNR model and sampler '{name}' cannot rescale its betas: use one of "
                        f"{', '.join(takers)}")
    overrides: dict[str, Any] = dict(sampler.options)
    # clamping x0 to [-1, 1] is a pixel-space DDPM habit that is wrong for latents; turn it off wherever it exists
    if "clip_sample" in params:
        overrides["clip_sample"] = False
    if "thresholding" in params:
        overrides["thresholding"] = False
    # set from the name, not inherited: a model saved with a Karras config must not change what 'euler' means
    if "use_karras_sigmas" in params:
        overrides["use_karras_sigmas"] = False
    if schedule and not sampler.own_timesteps:
        overrides[SCHEDULES[schedule].param] = SCHEDULES[schedule].value
    scheduler = sampler.cls.from_config(dict(model_config), **overrides)
    if schedule and sampler.own_timesteps:  # sgm_uniform: `set_timesteps(n)` sets trailing timesteps explicitly
        scheduler.set_timesteps = functools.partial(_set_trailing, scheduler.set_timesteps,
                                                    scheduler.config.num_train_timesteps)
    if sampler.eta is not None:  # an argument of each step in diffusers (its pipelines pass `eta=`), not config
        scheduler.step = functools.partial(scheduler.step, eta=sampler.eta if eta is None else eta)
    return scheduler


def _set_trailing(set_timesteps, train_steps: int, num_inference_steps: int, device=None) -> None:
    """LCM's and TCD's `set_timesteps(n)` with diffusers' timestep_spacing="trailing" timesteps, round(T - i T / n) - 1
    (4 of 1000: 999, 749, 499, 249), given explicitly; `original_inference_steps` = T makes every training timestep
    one of their grid (k = 1), so none is warned about."""
    timesteps = np.round(np.arange(train_steps, 0, -train_steps / num_inference_steps)).astype(np.int64) - 1
    set_timesteps(timesteps=timesteps.tolist(), device=device, original_inference_steps=train_steps)


def _init_params(cls: type) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters)
