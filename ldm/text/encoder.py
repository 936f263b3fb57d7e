"""Frozen text encoders: prompts -> per-token hidden states (B, 77, D), the U-Net's cross-attention context.

`FrozenTextEncoder` is the one interface; `CLIPTextEncoder` wraps a transformers `CLIPTextModel` (SD 1.x) and
`OpenCLIPTextEncoder` (ldm/text/openclip.py) an open_clip model (SD 2.x). The weights never train: they are frozen,
kept in eval mode, and run under `torch.no_grad`. The one exception is a LoRA run with text-encoder targets
(ldm/lora/train.py): it adds trainable adapters, and an encoder with trainable parameters (`trainable`) computes
gradients when the caller does, may enter training mode (for the adapters' dropout), and does not cache its empty
prompt's embedding (its weights change at every step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

from ldm.errors import UserError
from ldm.text.conditioning import Conditioning
from ldm.text.tokenizer import tokenize_prompts

Layer = Literal["last", "penultimate"]


class FrozenTextEncoder(nn.Module):
    """Tokenizer + frozen transformer. Subclasses implement `_hidden_states(input_ids)`."""

    context_length: int  # tokens per prompt (77)
    hidden_size: int  # D, the U-Net's cross_attention_dim

    def __init__(
        self,
        tokenizer: CLIPTokenizer,
        layer: Layer,
        context_length: int,
        hidden_size: int,
        clean: Callable[[str], str] | None = None,
        pad_id: int | None = None,
    ) -> None:
        super().__init__()
        if layer not in ("last", "penultimate"):
            raise ValueError(f"layer must be 'last' or 'penultimate', got {layer!r}")
        self.tokenizer = tokenizer
        self.layer: Layer = layer
        self.context_length = context_length
        self.hidden_size = hidden_size
        self._clean = clean  # prompt preprocessing before tokenizing
        self._pad_id = pad_id  # replaces the tokenizer's padding id
        # the unconditional embedding per (device, dtype); a plain dict, not a buffer, so it never enters a state_dict
        self._empty_cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def _freeze(self) -> None:
        """Call at the end of a subclass's __init__, once the weights are attached."""
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        # stay in eval mode when a parent module calls .train(): a frozen encoder is never trained, and dropout (if a
        # config enables it) would make the conditioning noisy; one with trainable LoRA adapters trains as diffusers'
        # scripts train it (so that lora.dropout acts)
        return super().train(mode and self.trainable)

    @property
    def trainable(self) -> bool:
        """Whether any parameter trains (LoRA adapters added by ldm/lora/train.py); False for a frozen encoder."""
        return any(p.requires_grad for p in self.parameters())

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def tokenize(self, prompts: Sequence[str]) -> torch.LongTensor:
        """Prompts -> ids (B, 77) on the CPU; warns (`PromptTruncatedWarning`) naming any words that did not fit."""
        return tokenize_prompts(self.tokenizer, prompts, self.context_length, self._clean, self._pad_id)

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's ids without start/end tokens, untruncated, cleaned as `tokenize` cleans (prompt chunking)."""
        texts = [self._clean(t) for t in texts] if self._clean is not None else list(texts)
        return self.tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False).input_ids

    @property
    def pad_token_id(self) -> int:
        """The id `tokenize` pads with after the end token."""
        return self._pad_id if self._pad_id is not None else self.tokenizer.pad_token_id

    @property
    def num_layers(self) -> int:
        """Transformer layers; clip skip N may go up to this minus the layers the configured `layer` skips."""
        raise NotImplementedError

    def max_clip_skip(self) -> int:
        return self.num_layers - (self.layer == "penultimate")

    def forward(self, input_ids: torch.LongTensor, clip_skip: int = 1) -> torch.Tensor:
        """ids (B, 77) -> hidden states (B, 77, D) in the module's dtype, on its device.

        Without gradients (no_grad, not inference_mode: the U-Net saves this output for its backward pass, which
        inference tensors forbid), unless the encoder has trainable adapters and the caller computes gradients.

        `clip_skip` (A1111's "Clip skip") N > 1 takes the hidden state N - 1 layers before the configured `layer`'s
        output, then the final layer norm; 1 is the configured layer itself.
        """
        return self.encode_ids(input_ids, clip_skip)[0]

    def encode_ids(self, input_ids: torch.LongTensor, clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`forward`, and the pooled embedding (B, P) of a tower that has one (SDXL's second: its text projection of
        the end token's final state), else None."""
        if clip_skip != 1 and not 1 <= clip_skip <= self.max_clip_skip():
            raise UserError(
                f"clip skip {clip_skip} is out of range: this text encoder allows 1..{self.max_clip_skip()} "
                f"({self.num_layers} layers, '{self.layer}' layer)"
            )
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trainable):
            hidden, pooled = self._states(input_ids.to(self.device), self._extra_skip(clip_skip))
        return hidden.to(self.dtype), None if pooled is None else pooled.to(self.dtype)

    @property
    def towers(self) -> tuple[FrozenTextEncoder, ...]:
        """The text towers whose outputs are concatenated into the context: this one (SDXL has two)."""
        return (self,)

    def _extra_skip(self, clip_skip: int) -> int:
        """Layers to skip beyond the configured one for A1111's "Clip skip" N: N - 1."""
        return clip_skip - 1

    def _states(self, input_ids: torch.LongTensor, extra_skip: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._hidden_states(input_ids, extra_skip), None

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> hidden states (B, 77, D)."""
        return self(self.tokenize(prompts))

    def empty_embedding(self, batch_size: int = 1) -> torch.Tensor:
        """`encode([""] * batch_size)`: the unconditional branch for caption dropout and classifier-free guidance.

        Computed once per device and dtype; each call returns a fresh copy (B, 77, D), safe to modify in place. An
        encoder with trainable adapters computes it at every call (its weights change at every step).
        """
        if self.trainable:
            return self.encode([""]).repeat(batch_size, 1, 1)
        key = (self.device, self.dtype)
        if key not in self._empty_cache:
            self._empty_cache[key] = self.encode([""])  # (1, 77, D)
        return self._empty_cache[key].repeat(batch_size, 1, 1)

    def encode_conditioning(self, prompts: Sequence[str]) -> Conditioning:
        """`encode` as a `Conditioning` (the form SDXL's encoder gives too)."""
        return Conditioning(self.encode(prompts))

    def empty_conditioning(self, batch_size: int = 1) -> Conditioning:
        return Conditioning(self.empty_embedding(batch_size))

    def _apply(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        # .to()/.half()/.cuda() may change the weights in place, so cached outputs would be stale
        self._empty_cache = {}
        return super()._apply(fn, *args, **kwargs)

    def _hidden_states(self, input_ids: torch.LongTensor, extra_skip: int = 0) -> torch.Tensor:
        """ids -> hidden states of the configured layer, or of the one `extra_skip` layers before it."""
        raise NotImplementedError

    @classmethod
    def from_clip(
        cls, tokenizer: CLIPTokenizer, model: CLIPTextModel, layer: Layer = "last", pad_id: int | None = None
    ) -> CLIPTextEncoder:
        return CLIPTextEncoder(tokenizer, model, layer, pad_id)


class CLIPTextEncoder(FrozenTextEncoder):
    """A transformers `CLIPTextModel`, called exactly as diffusers' `StableDiffusionPipeline.encode_prompt` calls it."""

    def __init__(
        self, tokenizer: CLIPTokenizer, model: CLIPTextModel, layer: Layer = "last", pad_id: int | None = None,
        *, sdxl: bool = False,
    ) -> None:
        """`sdxl`: a tower of SDXL's (diffusers' `StableDiffusionXLPipeline.encode_prompt`): its penultimate state is
        used as it is (no final layer norm), clip skip N takes `hidden_states[-max(N, 2)]` (Forge's rule: 1 and 2 are
        SDXL's own penultimate layer), and a model with a text projection (`CLIPTextModelWithProjection`, the
        OpenCLIP bigG tower) also gives its pooled embedding."""
        config = model.config
        # diffusers pads to tokenizer.model_max_length; a tokenizer saved without its config has a huge one, so cap
        # it at the number of position embeddings (77 for every CLIP)
        context_length = min(tokenizer.model_max_length, config.max_position_embeddings)
        # pad_id: an OpenCLIP tower converted to CLIPTextModel (SD 2.x single files) pads with 0, as open_clip does
        super().__init__(tokenizer, layer, context_length, config.hidden_size, pad_id=pad_id)
        self.model = model
        self.sdxl = sdxl
        self._freeze()

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    def _extra_skip(self, clip_skip: int) -> int:
        return max(clip_skip, 2) - 2 if self.sdxl else clip_skip - 1

    def max_clip_skip(self) -> int:
        return self.num_layers if self.sdxl else super().max_clip_skip()

    def _states(self, input_ids: torch.LongTensor, extra_skip: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.sdxl:
            return self._hidden_states(input_ids, extra_skip), None
        # (B, 77) -> (B, 77, D) from hidden_states (embeddings, then every layer's output) and, with a projection,
        # text_embeds (B, P): the projected final-layer-normed state at the end token
        out = self.model(input_ids, attention_mask=self._attention_mask(input_ids), output_hidden_states=True)
        skip = (self.layer == "penultimate") + extra_skip
        return out.hidden_states[-1 - skip], getattr(out, "text_embeds", None)

    def _hidden_states(self, input_ids: torch.LongTensor, extra_skip: int = 0) -> torch.Tensor:
        # (B, 77) -> (B, 77, D)
        attention_mask = self._attention_mask(input_ids)
        skip = (self.layer == "penultimate") + extra_skip
        if skip == 0:
            return self.model(input_ids, attention_mask=attention_mask)[0]
        # diffusers' clip_skip=1: hidden_states holds the embeddings and then every layer's output, so [-2] is the
        # second-to-last layer's output; the final layer norm follows, as it does for the last layer's output
        # (A1111's "Clip skip" N is hidden_states[-N] then the final layer norm, the same thing)
        out = self.model(input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return self._final_layer_norm()(out.hidden_states[-1 - skip])

    def _final_layer_norm(self) -> nn.Module:
        # transformers < 5 nests the modules under .text_model; 5.x holds them on the CLIPTextModel itself
        return getattr(self.model, "text_model", self.model).final_layer_norm

    def _attention_mask(self, input_ids: torch.LongTensor) -> torch.Tensor | None:
        # diffusers passes the tokenizer's attention mask only when the config asks for one; SD 1.x configs do not
        # (the causal mask already hides the padding from every real token)
        if not getattr(self.model.config, "use_attention_mask", False):
            return None
        # the tokenizer's mask: 1 up to and including the first end token, 0 on the padding after it
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (77,)
        first_end = (input_ids == self.tokenizer.eos_token_id).int().argmax(dim=1, keepdim=True)  # (B, 1)
        return (positions[None, :] <= first_end).long()  # (B, 77)
