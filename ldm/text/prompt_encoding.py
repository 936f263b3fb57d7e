"""Prompts with A1111 syntax -> the U-Net's `Conditioning` (context (1, 77 * chunks, D), and SDXL's pooled embedding):
chunking, emphasis weights, clip skip.

    cond, uncond = encode_prompt_pair(text_encoder, "a (red:1.3) car, ...", "blurry", clip_skip=2)

How a prompt becomes a context, as A1111 does it (modules/sd_hijack_clip.py, sd_emphasis.py "Original"):
1. `parse_prompt` (ldm/text/prompt_syntax.py) splits it into (text, weight) fragments and BREAK-separated groups.
2. Each fragment is tokenized on its own (no start/end tokens); every token carries its fragment's weight. Where a
   textual-inversion embedding's name (or ComfyUI's `embedding:NAME`) stands, its n vectors take n positions
   instead, with the fragment's weight (ldm/text/embeddings.py).
3. The tokens are cut into chunks of 75 (context 77 - start - end). When a chunk is full and the next token is not a
   comma, the tokens after the chunk's last comma move to the next chunk, if that comma is within the last 20 tokens
   (A1111's "comma_padding_backtrack" default): phrases are not split across chunks. BREAK ends a chunk early. An
   embedding that does not fit in what is left of a chunk starts the next one, as in A1111 (no comma backtracking
   then); one the comma backtracking moves goes with its positions (A1111 leaves its vectors in the padding of the
   chunk it left, a bug we do not copy).
4. Each chunk is encoded on its own as `<start> + tokens + <end> + padding` = 77 ids, exactly as a short prompt is
   tokenized (`FrozenTextEncoder.tokenize`), at the hidden state chosen by clip skip; embeddings' vectors replace
   the token-embedding layer's output at their positions (`ldm.text.embeddings.token_vectors`).
5. Weights: the chunk's hidden states z (77, D) are multiplied per token by its weight (start, end and padding keep
   weight 1), then the whole chunk is rescaled so that its mean over all 77 x D values equals the mean before
   weighting: z_w = z * w[:, None] * (mean(z) / mean(z * w[:, None])). A chunk whose weights are all 1 is left as it
   came out of the encoder, untouched, so an unweighted prompt of at most 75 tokens gives the very same bits as
   `text_encoder.encode([prompt])`.
6. The chunks are concatenated along the sequence: (1, 77 * chunks, D). The prompt and the negative prompt are padded
   to the same number of chunks with the encoding of the empty prompt (one 77-token chunk each), so that the two
   branches of guidance batch together. A1111 does this with its "Pad prompt/negative prompt" option, which is off
   by default there: it then runs the two branches separately, each at its own length, and a prompt and negative
   prompt of different chunk counts give a (slightly) different image than here.

Clip skip follows A1111 (modules/sd_hijack_clip.py and sd_hijack_open_clip.py): it is applied to CLIP text encoders
(SD 1.x) only. A1111's SD 2.x encoder, `FrozenOpenCLIPEmbedderWithCustomWords`, ignores `CLIP_stop_at_last_layers`
(its `encode_with_transformers` has only a comment about it), yet A1111 still writes "Clip skip: N" into the PNG. So
for an OpenCLIP text tower (SD 2.x: an open_clip model, or one converted to a `CLIPTextModel`; they pad with id 0,
as open_clip does, `uses_open_clip_padding`), `encode_prompt`/`encode_prompt_pair` ignore a clip skip other than 1
with one `ClipSkipIgnoredWarning` line, and an A1111 SD 2.x PNG replays with the conditioning it was made with.
`FrozenTextEncoder.__call__(ids, clip_skip=N)` itself still honours N for every encoder (library use).

SDXL (ldm/text/sdxl.py) has two towers; each chunk goes through both in lockstep (their vocabularies are the same, so
the chunks are), each tower's output is weighted on its own (mean restored per tower, as A1111 does per embedder),
and the two are concatenated along the channels. Clip skip N takes `hidden_states[-max(N, 2)]` of both towers, as
Forge does (A1111 ignores it for SDXL unless its `sdxl_clip_l_skip` option is on, and then only for CLIP-L); 1 and 2
are SDXL's own penultimate layer. The pooled embedding is the first chunk's, unweighted.

No truncation warning: nothing is dropped. Training captions never come here: the training loop calls
`FrozenTextEncoder.encode`, which reads brackets as plain text and truncates at 77 tokens (with a warning).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace

import torch

from ldm.text.conditioning import Conditioning
from ldm.text.embedding_files import Embedding
from ldm.text.embeddings import (
    PLACEHOLDER_ID,
    EmbeddingDatabase,
    escape_references,
    resolve_reference,
    split_references,
    token_vectors,
    tower_keys,
)
from ldm.text.encoder import FrozenTextEncoder
from ldm.text.sdxl import SDXLTextEncoder

TextEncoder = FrozenTextEncoder | SDXLTextEncoder
from ldm.text.prompt_syntax import Fragment, ParsedPrompt, parse_prompt

COMMA_BACKTRACK = 20  # tokens; A1111's comma_padding_backtrack default ("Prompt word wrap length limit")


class PromptSyntaxWarning(UserWarning):
    """Something A1111 tolerates was found (unbalanced brackets): the message says how it was read."""


class ClipSkipIgnoredWarning(UserWarning):
    """A clip skip was given for an OpenCLIP (SD 2.x) text encoder, for which A1111 ignores it; so do we."""


def uses_open_clip_padding(encoder: FrozenTextEncoder) -> bool:
    """An OpenCLIP text tower (SD 2.x), run by open_clip or converted to a CLIPTextModel: it pads with id 0, as
    open_clip does (diffusers' SD 2.x tokenizers say pad_token '!', id 0); CLIP's own (SD 1.x) pads with <end>."""
    return encoder.pad_token_id == 0  # ldm.text.openclip.OPEN_CLIP_PAD_ID (importing it would import open_clip)


def a1111_clip_skip(encoder: TextEncoder, clip_skip: int) -> int:
    """The clip skip A1111 would use: `clip_skip` for a CLIP encoder, 1 (with a warning) for an OpenCLIP one. SDXL's
    towers take it as Forge does (ldm/text/sdxl.py)."""
    if clip_skip == 1 or isinstance(encoder, SDXLTextEncoder) or not uses_open_clip_padding(encoder):
        return clip_skip
    warnings.warn(
        f"clip skip {clip_skip} is ignored: this text encoder is an OpenCLIP one (SD 2.x), for which A1111 ignores "
        "Clip skip too; the prompt is encoded as with clip skip 1",
        ClipSkipIgnoredWarning,
        stacklevel=3,
    )
    return 1


@dataclass
class TokenChunk:
    """At most 75 token ids (no start/end) and one weight per id; `fixes`: (offset into `ids`, embedding) for each
    textual-inversion embedding, whose n vectors stand at ids[offset : offset + n] (ldm/text/embeddings.py)."""

    ids: list[int]
    weights: list[float]
    fixes: list[tuple[int, Embedding]] = field(default_factory=list)

    @property
    def weighted(self) -> bool:
        return any(w != 1.0 for w in self.weights)

    def split(self, cut: int) -> tuple[TokenChunk, TokenChunk]:
        """(ids[:cut], ids[cut:]), each with its embeddings (A1111 leaves the moved ones' vectors behind)."""
        return (TokenChunk(self.ids[:cut], self.weights[:cut], [(o, e) for o, e in self.fixes if o < cut]),
                TokenChunk(self.ids[cut:], self.weights[cut:], [(o - cut, e) for o, e in self.fixes if o >= cut]))


def chunk_tokens(encoder: TextEncoder, parsed: ParsedPrompt,
                 embeddings: EmbeddingDatabase | None = None) -> list[TokenChunk]:
    """Steps 2-3 of the module docstring: fragments -> chunks of at most `context_length - 2` weighted ids.

    Textual-inversion embeddings (`embeddings`) take one position per vector, as A1111's `tokenize_line` places
    them: one that does not fit in what is left of a chunk starts the next one (the rest padded, no comma
    backtracking), and the comma backtracking moves them with their tokens."""
    size = encoder.context_length - 2
    comma = encoder.tokenizer.get_vocab().get(",</w>")
    chunks: list[TokenChunk] = []
    for g, group in enumerate(parsed.chunks):  # each BREAK-separated group starts a chunk
        current = TokenChunk([], [])
        last_comma = -1  # index in `current` of its last comma
        for items, fragment in zip(_fragment_items(encoder, group, embeddings), group):
            position = 0
            while position < len(items):
                item = items[position]  # a token id, or the embedding an `embedding:NAME` names
                token = item if isinstance(item, int) else None
                if len(current.ids) == size:
                    if token != comma and last_comma >= 0 and size - last_comma <= COMMA_BACKTRACK:
                        done, current = current.split(last_comma + 1)  # the comma stays; what follows moves on
                        chunks.append(done)
                    else:
                        chunks.append(current)
                        current = TokenChunk([], [])
                    last_comma = -1
                if token == comma:
                    last_comma = len(current.ids)
                embedding, length = (item, 1) if token is None else \
                    embeddings.match(items, position) if embeddings is not None else (None, 0)
                if embedding is None:
                    current.ids.append(token)
                    current.weights.append(fragment.weight)
                    position += 1
                    continue
                n = embedding.num_vectors
                if len(current.ids) + n > size:  # it does not fit: pad this chunk, start the next
                    chunks.append(current)
                    current, last_comma = TokenChunk([], []), -1
                current.fixes.append((len(current.ids), embedding))
                current.ids += [PLACEHOLDER_ID] * n
                current.weights += [fragment.weight] * n
                position += length
        last_group = g == len(parsed.chunks) - 1
        if not last_group or current.ids or not chunks:  # BREAK always closes its chunk; the end only a non-empty one
            chunks.append(current)
    return chunks


def _fragment_items(encoder: TextEncoder, group: tuple[Fragment, ...],
                    embeddings: EmbeddingDatabase | None) -> list[list[int | Embedding]]:
    """Each fragment's token ids, with the embedding each `embedding:NAME` in it names in place of its text (the
    text around it is tokenized on its own, as ComfyUI does: CLIP's tokenizer splits at whitespace anyway)."""
    pieces: list[list[tuple[Embedding | None, str]]] = []  # per fragment: (embedding or None, text after it)
    for fragment in group:
        first, *rest = split_references(fragment.text)
        pieces.append([(None, first)])
        for ref, text in zip(rest[::2], rest[1::2]):  # ('embedding:NAME', NAME), then the text up to the next one
            found, leftover = embeddings.reference(ref[1]) if embeddings is not None else \
                resolve_reference(None, ref[1])
            pieces[-1].append((found, leftover + text))
    ids = iter(encoder.token_ids([text for fragment in pieces for _, text in fragment]))
    return [[item for found, _ in fragment for item in ([found] if found else []) + next(ids)] for fragment in pieces]


def chunk_input_ids(encoder: FrozenTextEncoder, chunk: TokenChunk) -> torch.LongTensor:
    """(1, 77): `<start>` + ids + `<end>` + padding, the ids `encoder.tokenize` gives a prompt of these tokens."""
    tokenizer = encoder.tokenizer
    ids = [tokenizer.bos_token_id, *chunk.ids, tokenizer.eos_token_id]
    ids += [encoder.pad_token_id] * (encoder.context_length - len(ids))
    return torch.tensor([ids], dtype=torch.long)


def apply_weights(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's emphasis: z (B, T, D) times per-token `weights` (B, T), rescaled so its mean is unchanged.

    Computed in float32 and returned in z's dtype; the mean is over every element of z (for A1111, one chunk).
    A1111's own comment says restoring the mean "is likely not correct, but it seems to work well"; the factor is
    ill-conditioned when the mean is near 0 (a random text encoder whose final layer norm has no bias yet).
    """
    z32 = z.float()
    original_mean = z32.mean()
    weighted = z32 * weights.to(z32)[..., None]  # (B, T, D)
    new_mean = weighted.mean()
    if new_mean == 0:  # (A1111 would give NaN) nothing to restore: weights that cancel the mean exactly
        return weighted.to(z.dtype)
    return (weighted * (original_mean / new_mean)).to(z.dtype)


def encode_chunks(encoder: TextEncoder, chunks: list[TokenChunk], clip_skip: int = 1) -> Conditioning:
    """Steps 4-6: each chunk through each text tower on its own (batch 1), weighted per tower, the towers
    concatenated along the channels and the chunks along the sequence -> context (1, 77 * n, D); the pooled
    embedding (SDXL) is the first chunk's, unweighted (A1111's `zs[0].pooled`)."""
    contexts, pooled = [], None
    for i, chunk in enumerate(chunks):
        parts = []
        for tower, key in zip(encoder.towers, tower_keys(encoder)):
            vectors = [(1 + offset, e.vectors[key]) for offset, e in chunk.fixes]  # 1 + : after the start token
            with token_vectors(tower, vectors):
                z, p = tower.encode_ids(chunk_input_ids(tower, chunk), clip_skip)  # (1, 77, D_tower), (1, P) | None
            if chunk.weighted:
                weights = torch.ones(tower.context_length)
                weights[1 : 1 + len(chunk.weights)] = torch.tensor(chunk.weights)
                z = apply_weights(z, weights[None].to(z.device))
            parts.append(z)
            if i == 0 and p is not None:
                pooled = p
        contexts.append(torch.cat(parts, dim=-1))
    return Conditioning(torch.cat(contexts, dim=1), pooled)


def encode_prompt(encoder: TextEncoder, prompt: str, clip_skip: int = 1, what: str = "prompt",
                  embeddings: EmbeddingDatabase | None = None) -> Conditioning:
    """One prompt -> Conditioning (1, 77 * chunks, D). Warns (`PromptSyntaxWarning`) about unbalanced brackets, and
    (`ClipSkipIgnoredWarning`) when a clip skip is ignored, as A1111 ignores it for OpenCLIP encoders. `embeddings`:
    the textual-inversion embeddings the prompt may name (ldm/text/embeddings.py)."""
    return _encode_prompt(encoder, prompt, a1111_clip_skip(encoder, clip_skip), what, embeddings)


def _parse(prompt: str, what: str) -> ParsedPrompt:
    """A1111's syntax, ComfyUI's `embedding:NAME` read as text (its colon is no weight's)."""
    return parse_prompt(escape_references(prompt), what)


def _encode_prompt(encoder: TextEncoder, prompt: str, clip_skip: int, what: str,
                   embeddings: EmbeddingDatabase | None) -> Conditioning:
    parsed = _parse(prompt, what)
    for message in parsed.warnings:
        warnings.warn(message, PromptSyntaxWarning, stacklevel=4)
    return encode_chunks(encoder, chunk_tokens(encoder, parsed, embeddings), clip_skip)


def encode_prompt_pair(
    encoder: TextEncoder, prompt: str, negative_prompt: str | None, clip_skip: int = 1,
    embeddings: EmbeddingDatabase | None = None,
) -> tuple[Conditioning, Conditioning | None]:
    """(cond, uncond), contexts (1, 77 * n, D) with the same n; uncond is None when `negative_prompt` is None.
    An empty negative prompt of a model with `force_zeros_for_empty_prompt` (SDXL) is zeros, as diffusers (its
    `negative_prompt=None`) and A1111 make it. Warns as `encode_prompt` does, an ignored clip skip once."""
    clip_skip = a1111_clip_skip(encoder, clip_skip)
    cond = _encode_prompt(encoder, prompt, clip_skip, "prompt", embeddings)
    if negative_prompt is None:
        return cond, None
    if negative_prompt == "" and getattr(encoder, "force_zeros_for_empty_prompt", False):
        return cond, cond.zeros_like()
    uncond = _encode_prompt(encoder, negative_prompt, clip_skip, "negative prompt", embeddings)
    if cond.context.shape[1] == uncond.context.shape[1]:
        return cond, uncond
    n = max(cond.context.shape[1], uncond.context.shape[1])
    empty = encode_chunks(encoder, [TokenChunk([], [])], clip_skip).context  # (1, 77, D): the empty prompt
    return _pad_to(cond, n, empty), _pad_to(uncond, n, empty)


def prompt_embeddings(encoder: TextEncoder, prompts: list[str], embeddings: EmbeddingDatabase | None
                      ) -> list[Embedding]:
    """The embeddings `prompts` use, each once, in order of first use (what a PNG's `TI hashes` records)."""
    if embeddings is None:
        return []
    used: dict[int, Embedding] = {}
    for prompt in prompts:
        for chunk in chunk_tokens(encoder, _parse(prompt, "prompt"), embeddings):
            used.update((id(e), e) for _, e in chunk.fixes if id(e) not in used)
    return list(used.values())


def _pad_to(c: Conditioning, length: int, empty: torch.Tensor) -> Conditioning:
    repeats = (length - c.context.shape[1]) // empty.shape[1]
    return replace(c, context=torch.cat([c.context, empty.repeat(1, repeats, 1)], dim=1)) if repeats else c
