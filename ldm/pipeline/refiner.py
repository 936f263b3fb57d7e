"""An SDXL refiner's hand-over, as diffusers' `denoising_end` (base) and `denoising_start` (refiner) cut the schedule
and as A1111 writes it ("Refiner: NAME, Refiner switch at: 0.8"): the base runs the timesteps at or above the switch,
the refiner (an SDXL U-Net conditioned on the bigG tower and an aesthetic score) the rest, from the base's latents.
"""

from __future__ import annotations

import torch

from ldm.errors import UserError
from ldm.models.spec import ModelSpec
from ldm.pipeline.samplers import make_scheduler
from ldm.pipeline.validation import steps_to_run


def switch_cutoff(switch: float, train_timesteps: int) -> int:
    """The training timestep where a refiner takes over at `switch` (a share of the schedule), as diffusers'
    `denoising_end` / `denoising_start` compute it."""
    return int(round(train_timesteps - switch * train_timesteps))


def base_timesteps(timesteps: torch.Tensor, cutoff: int) -> torch.Tensor:
    """The leading timesteps >= `cutoff`: what the base runs before the hand-over."""
    return timesteps[: int((timesteps >= cutoff).sum())]


def refiner_timesteps(scheduler, cutoff: int, run: int | None = None) -> torch.Tensor:
    """The trailing timesteps of a set scheduler below `cutoff`, one more for a 2nd-order sampler with an even count
    (diffusers' img2img `get_timesteps` with `denoising_start`). `run`: how many trailing timesteps the whole run has
    (img2img cuts the schedule's start): the refiner never starts before the run does, so with a strength below the
    switch's share it runs the whole (short) run from the init image's noise level."""
    n = int((scheduler.timesteps < cutoff).sum())
    if scheduler.order == 2 and n % 2 == 0:
        n += 1
    if run is not None:
        n = min(n, run)
    return scheduler.timesteps[len(scheduler.timesteps) - n:]


def refiner_schedule(sampler: str, scheduler_config: dict, schedule: str, eta: float, steps: int,
                     strength: float | None, switch: float, train_timesteps: int,
                     device: torch.device) -> tuple[object, torch.Tensor]:
    """(the refiner's scheduler, its timesteps): the `steps`-step schedule from `switch` on, as diffusers' img2img
    pipeline runs it with `denoising_start` (`strength`: an img2img run's, which cuts the schedule's start)."""
    scheduler = make_scheduler(sampler, scheduler_config, schedule, eta)
    scheduler.set_timesteps(steps, device=device)
    run = len(scheduler.timesteps) if strength is None else \
        len(scheduler.timesteps) - (steps - steps_to_run(steps, strength)) * scheduler.order
    timesteps = refiner_timesteps(scheduler, switch_cutoff(switch, train_timesteps), run)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(len(scheduler.timesteps) - len(timesteps))
    return scheduler, timesteps


def check_refiner_pair(spec: ModelSpec, refiner: ModelSpec | None) -> None:
    """A base and a refiner given the right way round, each one line."""
    if spec.arch == "sdxl-refiner":
        raise UserError(f"'{spec.name}' is an SDXL refiner, which only finishes a base model's images: pass an SDXL "
                        f"base as --model and '{spec.name}' as --refiner")
    if refiner is None:
        return
    if refiner.arch != "sdxl-refiner":
        raise UserError(f"--refiner '{refiner.name}' is not an SDXL refiner (it is {refiner.kind}): pass an "
                        "SDXL refiner (text_encoder_2 only, aesthetic-score conditioning), or drop --refiner")
    if spec.arch != "sdxl":
        raise UserError(f"--refiner needs an SDXL base model; '{spec.name}' is {spec.kind}")
