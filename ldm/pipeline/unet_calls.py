"""How many U-Net evaluations one batch of a run makes: the progress bar's total (and the server's /progress).

A second-order sampler (Heun) evaluates twice per step; img2img runs only the last steps of its schedule; a refiner
hand-over splits the schedule between the base and the refiner (diffusers' `denoising_end`/`denoising_start`,
each with its own extra step for second-order samplers); a hires fix adds its second pass.
"""

from __future__ import annotations

from typing import Any

from ldm.pipeline.hires import HiresFix, SecondPass
from ldm.pipeline.refiner import base_timesteps, refiner_timesteps, switch_cutoff
from ldm.pipeline.request import GenerationRequest
from ldm.pipeline.samplers import make_scheduler


def unet_calls_per_batch(r: GenerationRequest, scheduler_config: dict[str, Any], train_timesteps: int,
                         steps_run: int, refined: bool, hires: HiresFix | None, second: SecondPass | None) -> int:
    """U-Net evaluations of one batch of the resolved request `r` (`steps_run` of its steps; `refined`: with a
    refiner; `second`: a hires fix's second pass)."""
    probe = make_scheduler(r.sampler, scheduler_config, r.schedule, r.eta)
    probe.set_timesteps(r.steps)
    per_batch = len(probe.timesteps) - (r.steps - steps_run) * probe.order
    if refined:
        cutoff = switch_cutoff(r.refiner_switch, train_timesteps)
        run = probe.timesteps[len(probe.timesteps) - per_batch:]
        per_batch = len(base_timesteps(run, cutoff)) + len(refiner_timesteps(probe, cutoff, len(run)))
    if second is not None:
        probe.set_timesteps(second.steps)
        per_batch += hires.unet_calls(probe, second)
    return per_batch
