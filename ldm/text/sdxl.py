"""SDXL's two frozen text towers as one encoder: CLIP ViT-L and OpenCLIP ViT-bigG, each one's penultimate hidden
state concatenated to one context (B, 77, 768 + 1280 = 2048), and the pooled embedding of the second (its text
projection of the end token). The refiner has the bigG tower only (context 1280).

    encoder = SDXLTextEncoder.from_models(tokenizer, clip_l, clip_g, force_zeros_for_empty_prompt=True)
    cond = encoder.encode_conditioning(["a red car"])  # Conditioning(context (1, 77, 2048), pooled (1, 1280))

Prompts with A1111 syntax go through `ldm.text.prompt_encoding` (both towers chunked in lockstep, emphasis applied
to each tower's output on its own, as A1111/Forge do); this module is the towers and training's plain encoding.

Both towers tokenize with the ordinary CLIP tokenizer (pad = end token); the bigG tower then pads with id 0 as
open_clip does. diffusers' SDXL `tokenizer_2` instead makes '!' (id 0) its pad token, so it splits every '!' of a
prompt off as a special token and encodes "wow!" as (wow, !<pad>) (diffusers issue #4153); A1111, Forge and ComfyUI
tokenize with open_clip, as here. Prompts without '!' give the same ids either way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ldm.text.conditioning import Conditioning
from ldm.text.encoder import CLIPTextEncoder

OPEN_CLIP_PAD_ID = 0


class SDXLTextEncoder(nn.Module):
    """The towers (`towers[-1]` is bigG with its projection) and `force_zeros_for_empty_prompt` (the model's config:
    an empty negative prompt's conditioning is zeros, not the encoding of "")."""

    def __init__(self, towers: Sequence[CLIPTextEncoder], force_zeros_for_empty_prompt: bool) -> None:
        super().__init__()
        if not hasattr(towers[-1].model, "text_projection"):
            raise ValueError("SDXL's last text tower must have a text projection (CLIPTextModelWithProjection)")
        self.tower_list = nn.ModuleList(towers)
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.context_length = towers[0].context_length
        self.hidden_size = sum(t.hidden_size for t in towers)  # the U-Net's cross_attention_dim
        self.pooled_size = int(towers[-1].model.config.projection_dim)

    @classmethod
    def from_models(
        cls,
        tokenizer: CLIPTokenizer,
        text_encoder: CLIPTextModel | None,
        text_encoder_2: CLIPTextModelWithProjection,
        *,
        force_zeros_for_empty_prompt: bool,
    ) -> SDXLTextEncoder:
        """`tokenizer`: an ordinary CLIP tokenizer (SD 1.x's, or `ldm.text.tokenizer.offline_clip_tokenizer()`), not
        diffusers' `tokenizer_2` (see the module docstring); `text_encoder` None for a refiner."""
        towers = [] if text_encoder is None else [CLIPTextEncoder(tokenizer, text_encoder, "penultimate", sdxl=True)]
        towers.append(CLIPTextEncoder(tokenizer, text_encoder_2, "penultimate", OPEN_CLIP_PAD_ID, sdxl=True))
        return cls(towers, force_zeros_for_empty_prompt)

    # what ldm.text.prompt_encoding reads of an encoder: its towers, and the first one's tokenizer for chunking
    @property
    def towers(self) -> tuple[CLIPTextEncoder, ...]:
        return tuple(self.tower_list)

    @property
    def tokenizer(self) -> CLIPTokenizer:
        return self.towers[0].tokenizer

    @property
    def pad_token_id(self) -> int:
        return self.towers[0].pad_token_id

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        return self.towers[0].token_ids(texts)

    def max_clip_skip(self) -> int:
        return min(t.max_clip_skip() for t in self.towers)

    @property
    def trainable(self) -> bool:
        return any(t.trainable for t in self.towers)

    @property
    def device(self) -> torch.device:
        return self.towers[-1].device

    @property
    def dtype(self) -> torch.dtype:
        return self.towers[-1].dtype

    def train(self, mode: bool = True) -> SDXLTextEncoder:
        for tower in self.towers:
            tower.train(mode)
        self.training = mode and self.trainable
        return self

    def conditioning_from_ids(self, input_ids: torch.LongTensor, clip_skip: int = 1) -> Conditioning:
        """ids (B, 77) of the first tower's tokenizer -> context (B, 77, D) and pooled (B, P); each tower pads its
        own way (ids after the first end token replaced by its pad id)."""
        parts, pooled = [], None
        for tower in self.towers:
            ids = _repad(input_ids, tower.tokenizer.eos_token_id, tower.pad_token_id)
            z, p = tower.encode_ids(ids, clip_skip)
            parts.append(z)
            pooled = p if p is not None else pooled
        return Conditioning(torch.cat(parts, dim=-1), pooled)

    def tokenize(self, prompts: Sequence[str]) -> torch.LongTensor:
        """Plain prompts -> ids (B, 77) of the first tower's tokenizer (what `conditioning_from_ids` takes)."""
        return self.towers[0].tokenize(prompts)

    def forward(self, input_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, 77) -> (context (B, 77, D), pooled (B, P)): `conditioning_from_ids` as a module call, the way a
        training run calls the encoder through its DDP wrapper when LoRA adapters train in it."""
        cond = self.conditioning_from_ids(input_ids)
        return cond.context, cond.pooled

    def encode_conditioning(self, prompts: Sequence[str]) -> Conditioning:
        """Plain prompts (no A1111 syntax; truncated at 77 tokens with a warning) -> Conditioning (B, ...)."""
        return self.conditioning_from_ids(self.tokenize(prompts))

    def empty_conditioning(self, batch_size: int = 1) -> Conditioning:
        """The unconditional branch as the model was trained with it: zeros when `force_zeros_for_empty_prompt`,
        else the encoding of ""."""
        empty = self.encode_conditioning([""] * batch_size)
        return empty.zeros_like() if self.force_zeros_for_empty_prompt else empty


def _repad(ids: torch.LongTensor, eos_id: int, pad_id: int) -> torch.LongTensor:
    """(B, T) ids -> the same with every position after the first end token set to `pad_id`."""
    positions = torch.arange(ids.shape[1], device=ids.device)  # (T,)
    first_end = (ids == eos_id).int().argmax(dim=1, keepdim=True)  # (B, 1)
    return ids.masked_fill(positions[None, :] > first_end, pad_id)
