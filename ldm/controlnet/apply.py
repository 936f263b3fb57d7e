"""A pipeline's ControlNets: those its requests name, opened once and kept while requests keep naming them, and a
request's units made into the denoising loop's hook for each pass (the control maps at that pass's size: a hires
fix's second pass gets them at the larger size, as A1111 does).

    controlnets = ControlNets(unet.config, vae_factor, device, dtype, directory)   # in Pipeline.__init__
    control = controlnets.use(request.controlnets)        # opens what is new (nothing without units)
    hook = control.hook(height, width, batch)             # -> denoise(..., extra_kwargs=hook); None without units
    control.recorded                                      # the units as PNGs record them ('NAME [hash]')
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ldm.controlnet.load import ControlNetSpec, check_units, load_controlnet
from ldm.controlnet.preprocess import control_tensor
from ldm.controlnet.residuals import ResidualHook, Steering, residual_hook
from ldm.controlnet.unit import ControlUnit

log = logging.getLogger(__name__)


class Control:
    """A request's units with their opened ControlNets."""

    def __init__(self, units: tuple[ControlUnit, ...], specs: list[ControlNetSpec], models: list[Any],
                 device: torch.device, dtype: torch.dtype) -> None:
        self.units, self.specs, self.models = units, specs, models
        self.device, self.dtype = device, dtype
        self._maps: dict[tuple[int, int], list[torch.Tensor]] = {}  # (H, W) -> one (1, 3, H, W) map per unit

    @property
    def recorded(self) -> tuple[ControlUnit, ...]:
        """The units as PNGs record them: the model as A1111 titles it, no image."""
        return tuple(replace(u, model=s.title, image=None) for u, s in zip(self.units, self.specs))

    def hook(self, height: int, width: int, batch: int) -> ResidualHook | None:
        """The loop's hook for a pass at height x width over `batch` images; None without units."""
        if not self.units:
            return None
        if (height, width) not in self._maps:
            self._maps[(height, width)] = [control_tensor(u, height, width, self.device, self.dtype)
                                           for u in self.units]
        steering = [Steering(m, image, u.weight, u.start, u.end, u.control_mode, s.global_pool)
                    for u, s, m, image in zip(self.units, self.specs, self.models, self._maps[(height, width)])]
        return residual_hook(steering, batch)


class ControlNets:
    """The ControlNets a pipeline has open, by path: those of the last request that named any."""

    def __init__(self, unet_config: Any, vae_factor: int, device: torch.device, dtype: torch.dtype,
                 directory: str | Path | None = None) -> None:
        self.unet_config, self.vae_factor = unet_config, vae_factor
        self.device, self.dtype = device, dtype
        self.directory = directory  # where units' names are found (--controlnet-dir)
        self._open: dict[Path, Any] = {}

    def use(self, units: tuple[ControlUnit, ...]) -> Control:
        """Open the units' ControlNets (checked against the model first); the others are closed. Without units,
        nothing changes."""
        if not units:
            return Control((), [], [], self.device, self.dtype)
        specs = check_units(units, self.unet_config, self.vae_factor, self.directory)
        models = {}
        for spec in specs:
            if spec.path not in models:
                models[spec.path] = self._open.get(spec.path)
                if models[spec.path] is None:
                    log.info("loading ControlNet %s (%s)", spec.title, spec.family)
                    models[spec.path] = load_controlnet(spec, self.unet_config, self.device, self.dtype)
        self._open = models
        return Control(units, specs, [models[s.path] for s in specs], self.device, self.dtype)
