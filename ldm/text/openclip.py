"""An open_clip text tower as a `FrozenTextEncoder`: per-token hidden states (B, 77, D), not the pooled embedding.

open_clip's `encode_text` pools the end token and projects it; the U-Net needs every token. So the text transformer is
run here the way SD 2.x's `FrozenOpenCLIPEmbedder` runs it: token + position embeddings, the residual blocks under the
causal mask (all of them, or all but the last for "penultimate"), then `ln_final`.
"""

from __future__ import annotations

import torch
from open_clip.tokenizer import SimpleTokenizer, basic_clean
from torch import nn
from transformers import CLIPTokenizer

from ldm.errors import UserError
from ldm.text.encoder import FrozenTextEncoder, Layer
from ldm.text.tokenizer import offline_clip_tokenizer, tokenize_prompts

OPEN_CLIP_PAD_ID = 0

# a prompt whose ids show whether open_clip's tokenizer is the CLIP BPE one that ours reproduces
_PROBE = "A Photo of 2 cats &amp; a “dog”, 3.5 m tall!!! café"


class OpenCLIPTextEncoder(FrozenTextEncoder):
    def __init__(self, model: nn.Module, layer: Layer = "last", tokenizer: CLIPTokenizer | None = None) -> None:
        # open_clip's CLIP class holds the text tower's modules on itself; CustomTextCLIP holds a TextTransformer
        text = getattr(model, "text", model)
        if not hasattr(text, "token_embedding") or getattr(text, "cls_emb", None) is not None:
            raise UserError(
                f"open_clip model {type(model).__name__} has no plain CLIP text transformer: "
                "use a CLIP-style model such as ViT-H-14 or ViT-L-14"
            )
        if getattr(text, "attn_mask", None) is None:
            raise UserError("open_clip model's text tower is not causal: use a CLIP-style model such as ViT-H-14")
        tokenizer = tokenizer if tokenizer is not None else offline_clip_tokenizer()
        context_length = int(text.positional_embedding.shape[0])
        hidden_size = int(text.positional_embedding.shape[1])
        # open_clip's tokenizer cleans prompts first (ftfy fixes, HTML unescaping) and pads with id 0 (which changes
        # the hidden states at the padded positions, that the U-Net attends to); do the same so the ids match
        super().__init__(tokenizer, layer, context_length, hidden_size, clean=basic_clean, pad_id=OPEN_CLIP_PAD_ID)
        self.token_embedding = text.token_embedding  # (vocab, D)
        self.positional_embedding = text.positional_embedding  # (77, D)
        self.transformer = text.transformer  # .resblocks: residual attention blocks
        self.ln_final = text.ln_final
        self.register_buffer("attn_mask", text.attn_mask, persistent=False)  # (77, 77) additive causal mask
        self._freeze()

    @property
    def num_layers(self) -> int:
        return len(self.transformer.resblocks)

    def _hidden_states(self, input_ids: torch.LongTensor, extra_skip: int = 0) -> torch.Tensor:
        dtype = self.dtype
        x = self.token_embedding(input_ids).to(dtype) + self.positional_embedding.to(dtype)  # (B, 77, D)
        blocks = list(self.transformer.resblocks)
        skip = (self.layer == "penultimate") + extra_skip  # clip skip N > 1 drops N - 1 more blocks
        if skip:
            blocks = blocks[:-skip]
        # open_clip >= 2.24 runs batch-first; older versions expect (77, B, D)
        batch_first = getattr(self.transformer, "batch_first", False)
        if not batch_first:
            x = x.transpose(0, 1)
        for block in blocks:
            x = block(x, attn_mask=self.attn_mask)
        if not batch_first:
            x = x.transpose(0, 1)
        return self.ln_final(x)  # (B, 77, D)


def check_open_clip_tokenizer(reference: object, name: str) -> None:
    """Refuse models whose open_clip tokenizer is not the CLIP BPE one (SigLIP, HF tokenizers, ...)."""
    context = getattr(reference, "context_length", None)
    same = (
        isinstance(reference, SimpleTokenizer)
        and getattr(reference, "reduction_fn", None) is None
        and context is not None
        and torch.equal(
            reference([_PROBE]),
            tokenize_prompts(offline_clip_tokenizer(), [_PROBE], context, basic_clean, OPEN_CLIP_PAD_ID),
        )
    )
    if not same:
        raise UserError(
            f"open_clip model '{name}' uses a tokenizer other than CLIP's BPE one ({type(reference).__name__}): "
            "use a CLIP-style model such as ViT-H-14 or ViT-L-14"
        )
