"""`Conditioning`: what the U-Net is conditioned on for one branch of guidance, one type for every model family.

SD 1.x/2.x: the text context alone. SDXL adds a pooled text embedding (the second text tower's projected end-token
state) and the micro-conditioning time ids (original size, crop top-left, target size; the refiner replaces the
target size with an aesthetic score), which its U-Net takes as `added_cond_kwargs` ("text_time" addition embedding).
An LCM-distilled U-Net (config `time_cond_proj_dim`) also takes the guidance scale, embedded, as `timestep_cond`.
Any of them may add IP-Adapter image embeds (ldm/ip_adapter), one tensor per adapter, which the U-Net projects to the
tokens of its decoupled cross-attention (`added_cond_kwargs["image_embeds"]`, diffusers' IP-Adapter U-Net).
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
    # IP-Adapters' image embeds, one per adapter: (B, 1, E) projected embeds or (B, 1, T, H) hidden states
    image_embeds: tuple[torch.Tensor, ...] | None = None

    def with_time_ids(self, time_ids: torch.Tensor) -> Conditioning:
        """`time_ids` (n,) or (B, n), in the context's dtype and device."""
        ids = time_ids.to(self.context.device, self.context.dtype)
        return replace(self, time_ids=ids if ids.ndim == 2 else ids[None])

    def with_image_embeds(self, embeds: list[torch.Tensor]) -> Conditioning:
        """IP-Adapter image embeds, one tensor per adapter (B, 1, ...), in the U-Net's adapter order."""
        return replace(self, image_embeds=tuple(embeds))

    def _tensors(self) -> tuple[torch.Tensor | None, ...]:
        """Every field but the image embeds, in order."""
        return tuple(getattr(self, f.name) for f in fields(self) if f.name != "image_embeds")

    def _map(self, fn) -> Conditioning:
        images = None if self.image_embeds is None else tuple(fn(t) for t in self.image_embeds)
        return Conditioning(*(None if t is None else fn(t) for t in self._tensors()), image_embeds=images)

    def to(self, dtype: torch.dtype) -> Conditioning:
        return self._map(lambda t: t.to(dtype))

    def expand(self, batch: int) -> Conditioning:
        """Batch 1 -> `batch` (views, no copy)."""
        return self._map(lambda t: t.expand(batch, *t.shape[1:]))

    def zeros_like(self) -> Conditioning:
        """SDXL's `force_zeros_for_empty_prompt` unconditional branch: context and pooled zero, time ids kept."""
        pooled = None if self.pooled is None else torch.zeros_like(self.pooled)
        return replace(self, context=torch.zeros_like(self.context), pooled=pooled)

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        """Along the batch (guidance's [uncond, cond] in one U-Net call)."""
        def join(ts):
            return None if ts[0] is None else torch.cat(ts)
        images = None if items[0].image_embeds is None else tuple(
            torch.cat(ts) for ts in zip(*(c.image_embeds for c in items)))
        return Conditioning(*(join(ts) for ts in zip(*(c._tensors() for c in items))), image_embeds=images)

    def unet_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of diffusers' `UNet2DConditionModel.forward` for this conditioning."""
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.context}
        if self.timestep_cond is not None:
            kwargs["timestep_cond"] = self.timestep_cond
        added: dict[str, Any] = {}
        if self.pooled is not None:
            if self.time_ids is None:
                raise ValueError("an SDXL conditioning needs its time ids before the U-Net is called")
            added = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        if self.image_embeds is not None:
            added["image_embeds"] = list(self.image_embeds)
        return {**kwargs, "added_cond_kwargs": added} if added else kwargs
