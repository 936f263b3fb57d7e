"""The per-step ControlNet residuals: the denoising loop's one extra hook (`ldm.pipeline.denoise`, `extra_kwargs`).

At each step the loop hands the hook the scaled model input x (copies * B, C, h, w), before a 9-channel U-Net's
mask channels are added, the timestep, the step index i, the number of steps n of this run, and the U-Net's
conditioning kwargs ([uncond, cond] along the batch with guidance). Every unit that acts at step i
(diffusers: not (i / n < start or (i + 1) / n > end)) runs its ControlNet on them with its control map; the
residuals of all units are summed in unit order (diffusers' MultiControlNetModel) and go to the U-Net as
`down_block_additional_residuals` (one per encoder block: input blocks + conv_in) and
`mid_block_additional_residual`. A step where no unit acts adds none (diffusers adds zeros there: the same sums).

Control modes, as the A1111 extension names them (scripts/controlnet.py: soft_injection = mode != Balanced,
cfg_injection = mode == "ControlNet is more important"), with diffusers' numbers:
- "Balanced": residuals x weight, on both branches of guidance;
- "My prompt is more important": residuals x weight x logspace(-1, 0) over the blocks (shallow blocks weakest),
  diffusers' guess-mode scales (A1111: 0.825^(12 - k), within 0.6% of them for SD 1.x's 13 blocks);
- "ControlNet is more important": the same scales, the ControlNet run on the conditional branch only (zeros on the
  unconditional one): exactly diffusers' `guess_mode=True`. A model with `global_pool_conditions` always runs so,
  as in diffusers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ldm.controlnet.unit import CONTROL_MODES

ResidualHook = Callable[[torch.Tensor, torch.Tensor, int, int, dict[str, Any]], dict[str, Any]]


@dataclass
class Steering:
    """One unit, ready for one pass: its ControlNet and control map (1, 3, H, W) in [0, 1]."""

    model: Any  # diffusers ControlNetModel
    image: torch.Tensor
    weight: float
    start: float
    end: float
    control_mode: str
    global_pool: bool = False

    def acts(self, i: int, n: int) -> bool:
        return not (i / n < self.start or (i + 1) / n > self.end)

    @property
    def cond_only(self) -> bool:
        return self.control_mode == CONTROL_MODES[2] or self.global_pool

    @property
    def soft(self) -> bool:  # diffusers' guess_mode scales
        return self.control_mode != CONTROL_MODES[0] or self.global_pool


def residual_hook(units: list[Steering], batch: int) -> ResidualHook:
    """The loop's hook for a batch of `batch` images (x holds 1 or 2 copies of it: [uncond, cond])."""

    def hook(x: torch.Tensor, t: torch.Tensor, i: int, n: int, unet_kwargs: dict[str, Any]) -> dict[str, Any]:
        down: list[torch.Tensor] | None = None
        mid: torch.Tensor | None = None
        two = x.shape[0] == 2 * batch  # guidance's two branches, the conditional one second
        for unit in units:
            if not unit.acts(i, n):
                continue
            half = unit.cond_only and two
            rows = slice(batch, None) if half else slice(None)
            added = {k: v[rows] for k, v in (unet_kwargs.get("added_cond_kwargs") or {}).items()
                     if k in ("text_embeds", "time_ids")} or None  # SDXL's; a ControlNet takes no image embeds
            xs = x[rows]
            d, m = unit.model(xs, t, encoder_hidden_states=unet_kwargs["encoder_hidden_states"][rows],
                              controlnet_cond=unit.image.expand(xs.shape[0], -1, -1, -1),
                              conditioning_scale=unit.weight, guess_mode=unit.soft, added_cond_kwargs=added,
                              return_dict=False)
            if half:  # no control on the unconditional branch
                d = [torch.cat([torch.zeros_like(r), r]) for r in d]
                m = torch.cat([torch.zeros_like(m), m])
            down = list(d) if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        if down is None:
            return {}
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    return hook
