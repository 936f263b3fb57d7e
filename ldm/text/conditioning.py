"""`Conditioning`: what the U-Net is conditioned on for one branch of guidance, one type for every model family.

SD 1.x/2.x: the text context alone. SDXL adds a pooled text embedding (the second text tower's projected end-token
state) and the micro-conditioning time ids (original size, crop top-left, target size; the refiner replaces the
target size with an aesthetic score), which its U-Net takes as `added_cond_kwargs` ("text_time" addition embedding).
An LCM-distilled U-Net (config `time_cond_proj_dim`) also takes the guidance scale, embedded, as `timestep_cond`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch


@dataclass(frozen=True)
class Conditioning:
    context: torch.Tensor  # (B, 77 * chunks, D): the cross-attention context
    pooled: torch.Tensor | None = None  # (B, P): SDXL's pooled text embedding
    time_ids: torch.Tensor | None = None  # (B, 6) or (B, 5): SDXL's micro-conditioning
    timestep_cond: torch.Tensor | None = None  # (B, time_cond_proj_dim): an LCM-distilled U-Net's guidance input

    def with_time_ids(self, time_ids: torch.Tensor) -> Conditioning:
        """`time_ids` (n,) or (B, n), in the context's dtype and device."""
        ids = time_ids.to(self.context.device, self.context.dtype)
        return replace(self, time_ids=ids if ids.ndim == 2 else ids[None])

    def _tensors(self) -> tuple[torch.Tensor | None, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    def to(self, dtype: torch.dtype) -> Conditioning:
        return Conditioning(*(None if t is None else t.to(dtype) for t in self._tensors()))

    def expand(self, batch: int) -> Conditioning:
        """Batch 1 -> `batch` (views, no copy)."""
        return Conditioning(*(None if t is None else t.expand(batch, *t.shape[1:]) for t in self._tensors()))

    def zeros_like(self) -> Conditioning:
        """SDXL's `force_zeros_for_empty_prompt` unconditional branch: context and pooled zero, time ids kept."""
        pooled = None if self.pooled is None else torch.zeros_like(self.pooled)
        return replace(self, context=torch.zeros_like(self.context), pooled=pooled)

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        """Along the batch (guidance's [uncond, cond] in one U-Net call)."""
        def join(ts):
            return None if ts[0] is None else torch.cat(ts)
        return Conditioning(*(join(ts) for ts in zip(*(c._tensors() for c in items))))

    def unet_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of diffusers' `UNet2DConditionModel.forward` for this conditioning."""
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.context}
        if self.timestep_cond is not None:
            kwargs["timestep_cond"] = self.timestep_cond
        if self.pooled is None:
            return kwargs
        if self.time_ids is None:
            raise ValueError("an SDXL conditioning needs its time ids before the U-Net is called")
        return {**kwargs, "added_cond_kwargs": {"text_embeds": self.pooled, "time_ids": self.time_ids}}
