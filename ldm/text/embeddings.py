"""Textual-inversion embeddings in prompts: which fit a model, where a prompt names them, and how their vectors go in.

    db = EmbeddingDatabase(EmbeddingLibrary.read("embeddings/"), pipe.text_encoder)
    encode_prompt_pair(pipe.text_encoder, "a cat, ink-style", "bad-hands-5", embeddings=db)

An embedding's n vectors stand in a prompt where its name is written: each takes one token position (it counts
toward the 75-token chunks; ldm/text/prompt_encoding.py) and replaces the token-embedding layer's output there,
before the position embeddings are added (A1111's `EmbeddingsWithFixes`, modules/sd_hijack.py). The model is never
changed: `token_vectors` puts the vectors in with a forward hook for one text-encoder call, so LoRA merging
(ldm/lora/apply.py) and the empty-prompt cache see the model as it was loaded. The images equal diffusers'
`load_textual_inversion`, which adds tokens and embedding-matrix rows instead (tests/test_embeddings.py).

What fits: an SD 1.x/2.x model takes one set of vectors as wide as its text tower (768 SD 1.x, 1024 SD 2.x), SDXL
takes clip_l + clip_g (768 + 1280), its refiner clip_g. Others are `skipped`, as A1111 lists them.

Names, as A1111 matches them (modules/sd_hijack_clip.py `tokenize_line`, textual_inversion.py
`EmbeddingDatabase`): an embedding's name (its file's stem) is tokenized as prompt text is, and wherever a prompt
fragment's tokens contain that sequence the embedding goes in (case does not matter: CLIP's tokenizer lowercases);
the longest name wins when several match at one position. A word that is no embedding's name is left alone.
ComfyUI's `embedding:NAME` is read too (comfy/sd1_clip.py `tokenize_with_weights`, `_try_get_embedding`): at the
start of the text or after whitespace or a bracket; NAME runs to the next whitespace, `<` or `[`, trailing commas
are text unless a file is named with them, and NAME may carry the file's extension and the folders below
--embeddings-dir (`embedding:styles/ink.pt`). Unlike ComfyUI, which ignores an unknown one with a warning,
`embedding:NAME` that names no usable embedding is an error; weights apply as to words, `(embedding:ink:1.2)`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from ldm.errors import UserError
from ldm.lora.prompt_tags import format_lora_hashes, parse_lora_hashes
from ldm.text.embedding_files import SDXL_KEYS, Embedding, EmbeddingLibrary, say_once, widths_text
from ldm.text.prompt_syntax import parse_prompt
from ldm.text.sdxl import SDXLTextEncoder

PLACEHOLDER_ID = 0  # the id under an embedding's positions, as A1111's; the hook replaces its vector
# ComfyUI's `embedding:NAME`, where a word can start (prompt_syntax has already taken the brackets off)
_REFERENCE = re.compile(r"(?<![^\s()\[\]])embedding:([^\s<\[]*)")


# ------------------------------------------------------------------------------------ what fits a model


def tower_keys(encoder) -> tuple[str, ...]:
    """Which of an embedding's vector sets each text tower takes: "" (SD 1.x/2.x), clip_l and clip_g (SDXL; the
    refiner's one tower is clip_g)."""
    if isinstance(encoder, SDXLTextEncoder):
        return SDXL_KEYS[-len(encoder.towers):]
    return ("",)


def fits_model(embedding: Embedding, arch: str, cross_attention_dim: int) -> bool:
    """Before any weight is loaded, from the model's spec: an SD embedding's width is the U-Net's cross-attention
    width; SDXL's two widths add up to it; the refiner takes clip_g alone."""
    widths = {k: v.shape[1] for k, v in embedding.vectors.items()}
    if arch == "sd":
        return widths.get("") == cross_attention_dim
    if arch == "sdxl":
        return "" not in widths and widths["clip_l"] + widths["clip_g"] == cross_attention_dim
    return widths.get("clip_g") == cross_attention_dim


def model_needs(arch: str, cross_attention_dim: int) -> str:
    """What a model takes, in words, from its spec: '768-wide vectors (SD 1.x)'."""
    if arch == "sd":
        return widths_text({"": cross_attention_dim})
    if arch == "sdxl":
        return f"clip_l + clip_g vectors ({cross_attention_dim} wide together, SDXL)"
    return f"clip_g vectors {cross_attention_dim} wide (SDXL)"


def check_embedding_inputs(directory: str | Path | None, files: Sequence[str | Path], prompts: Sequence[str],
                           arch: str, cross_attention_dim: int) -> EmbeddingLibrary | None:
    """The CLI's checks before any model is loaded: the files are readable embeddings, each FILE given fits the
    model (`arch`, the U-Net's `cross_attention_dim`), and each `embedding:NAME` in `prompts` names one that does.
    Returns the library (None without embeddings)."""
    library = None if directory is None and not files else EmbeddingLibrary.read(directory, files)
    if library is not None:
        for e in library.embeddings[: len(library.files)]:
            if not fits_model(e, arch, cross_attention_dim):
                raise _misfit(e, f"this model takes {model_needs(arch, cross_attention_dim)}")
    check_references(library, prompts, arch, cross_attention_dim)
    return library


def check_references(library: EmbeddingLibrary | None, prompts: Sequence[str], arch: str,
                     cross_attention_dim: int | None) -> None:
    """Each `embedding:NAME` in `prompts` (the prompt, then the negative prompt) names an embedding in `library` that
    fits the model (when `cross_attention_dim` is known)."""
    for prompt, what in zip(prompts, ("prompt", "negative prompt")):
        for raw in references(prompt, what):
            found, _ = resolve_reference(library, raw)
            if cross_attention_dim is not None and not fits_model(found, arch, cross_attention_dim):
                raise _misfit(found, f"this model takes {model_needs(arch, cross_attention_dim)}", raw)


def _misfit(e: Embedding, needs: str, reference: str | None = None) -> UserError:
    where = f" (embedding:{reference})" if reference is not None else ""
    return UserError(f"embedding '{e.path}'{where} is {e.kind}, but {needs}: use an embedding made for this "
                     "model's family")


def resolve_reference(library: EmbeddingLibrary | None, raw: str) -> tuple[Embedding, str]:
    """`embedding:NAME` -> (the embedding, text left over): NAME as written, else without its trailing commas (which
    are then text), as ComfyUI tries it; a `UserError` when neither names a file."""
    if library is None:
        raise UserError(f"the prompt names embedding:{raw}: pass --embeddings-dir DIR (or --embedding FILE) that "
                        "holds it")
    found, leftover = library.reference(raw), ""
    stripped = raw.rstrip(",")
    if found is None and stripped != raw:
        found, leftover = library.reference(stripped), raw[len(stripped):]
    if found is None:
        where = f"--embeddings-dir '{library.directory}'" if library.directory else "the --embedding files"
        raise UserError(f"embedding:{stripped} names no embedding in {where} (a file's stem, or its name)" if stripped
                        else "the prompt has 'embedding:' without a name: write embedding:NAME")
    return found, leftover


# ---------------------------------------------------------------------------------------- the prompt's side


def escape_references(prompt: str) -> str:
    """`embedding:NAME` with its colon escaped, so that A1111's prompt syntax (ldm/text/prompt_syntax.py) reads it
    as text, also inside brackets, as ComfyUI reads `(embedding:NAME:1.2)`."""
    return re.sub(r"(?<![^\s()\[\]])embedding:", r"embedding\\:", prompt)


def split_references(text: str) -> list[str | tuple[str, str]]:
    """A fragment of parsed prompt text -> its pieces: text, and ('embedding:NAME', NAME) for each reference. NAME
    runs to whitespace, `<` or `[`, trailing commas included: `resolve_reference` settles whether they are its."""
    pieces: list[str | tuple[str, str]] = []
    start = 0
    for m in _REFERENCE.finditer(text):
        pieces += [text[start : m.start()], (m.group(0), m.group(1))]
        start = m.end()
    return [*pieces, text[start:]]


def references(prompt: str, what: str = "prompt") -> list[str]:
    """The names of a prompt's `embedding:NAME` references (parsed as the encoder parses the prompt; a syntax error
    is a `UserError` starting with `what`)."""
    parsed = parse_prompt(escape_references(prompt), what)
    return [p[1] for group in parsed.chunks for f in group for p in split_references(f.text) if isinstance(p, tuple)]


# ------------------------------------------------------------------------------------------- one text encoder's


class EmbeddingDatabase:
    """A library's embeddings for one text encoder (A1111's `EmbeddingDatabase`): those whose vectors fit its towers
    (`loaded`) and the others (`skipped`, as A1111 lists them), and each name's token ids for `match`."""

    def __init__(self, library: EmbeddingLibrary, encoder) -> None:
        self.library, self.encoder = library, encoder
        self.keys = tower_keys(encoder)
        self.widths = {k: int(t.hidden_size) for k, t in zip(self.keys, encoder.towers)}
        self._build()

    def refresh(self) -> None:
        """Before a generation: the directory read again if it changed (`EmbeddingLibrary.refresh`)."""
        self.library.refresh()
        if self.library.version != self._version:
            self._build()

    def fits(self, e: Embedding) -> bool:
        return all(k in e.vectors and e.vectors[k].shape[1] == w for k, w in self.widths.items())

    def _build(self) -> None:
        self._version = self.library.version
        needs = f"this model's text encoder takes {widths_text(self.widths)}"
        for e in self.library.embeddings[: len(self.library.files)]:  # given by themselves: they must fit
            if not self.fits(e):
                raise _misfit(e, needs)
        self.loaded, self.skipped = self.library.split(self.fits)
        named = {**self.loaded, **self.skipped}
        if self.skipped:
            say_once(logging.INFO, "embeddings skipped, made for another model family: %s", ", ".join(self.skipped))
        # first token id -> [(the name's ids, embedding)], longest first; equal lengths in the library's order
        self._lookup: dict[int, list[tuple[list[int], Embedding]]] = {}
        names = list(named)
        for name, ids in zip(names, self.encoder.token_ids(names) if names else []):
            if ids:
                self._lookup.setdefault(ids[0], []).append((ids, named[name]))
        for entries in self._lookup.values():
            entries.sort(key=lambda entry: -len(entry[0]))

    def match(self, ids: Sequence, offset: int) -> tuple[Embedding | None, int]:
        """The embedding whose name's tokens start at `ids[offset]` and how many ids it takes, else (None, 0).
        A skipped one is read as words, with one warning, as A1111 (which does not know it) reads it."""
        skipped = None
        for name_ids, e in self._lookup.get(ids[offset], ()):
            if list(ids[offset : offset + len(name_ids)]) == name_ids:
                if e.name in self.loaded:
                    return e, len(name_ids)
                skipped = skipped or e
        if skipped is not None:
            say_once(logging.WARNING, "the prompt's '%s' is the name of %s, which this model cannot use: it is "
                     "read as words (use an embedding made for this model's family)", skipped.name, skipped.kind)
        return None, 0

    def reference(self, raw: str) -> tuple[Embedding, str]:
        """`embedding:NAME` (`resolve_reference`), checked to fit."""
        found, leftover = resolve_reference(self.library, raw)
        if not self.fits(found):
            raise _misfit(found, f"this model's text encoder takes {widths_text(self.widths)}", raw)
        return found, leftover


def open_database(directory: str | Path | None, files: Sequence[str | Path], encoder) -> EmbeddingDatabase | None:
    """`Pipeline.open`'s embeddings: None when neither a directory nor files are given."""
    if directory is None and not files:
        return None
    return EmbeddingDatabase(EmbeddingLibrary.read(directory, files), encoder)


@contextmanager
def token_vectors(tower, vectors: list[tuple[int, torch.Tensor]]) -> Iterator[None]:
    """Within the block, `tower`'s token-embedding layer gives each (position, v (n, D)) pair's vectors at positions
    [position, position + n) of its output (B, T, D), in the layer's dtype: where an embedding stands in the ids.
    A forward hook, removed on exit: the weights are never touched."""
    if not vectors:
        yield
        return
    # a transformers CLIP model's embedding layer, or an open_clip tower's (ldm/text/openclip.py)
    layer = tower.model.get_input_embeddings() if hasattr(tower, "model") else tower.token_embedding

    def put(module, args, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        for position, v in vectors:
            output[:, position : position + v.shape[0]] = v.to(output.device, output.dtype)
        return output

    handle = layer.register_forward_hook(put)
    try:
        yield
    finally:
        handle.remove()


def ti_hashes(used: Sequence[Embedding], recorded: str = "") -> str:
    """A1111's `TI hashes` value for the embeddings a generation used: 'name: hash, ...'. `recorded` is the value a
    replayed PNG holds: a file whose hash differs from it, and an embedding it names that this generation does not
    use, each get one warning."""
    expected = parse_lora_hashes(recorded)
    names = set()
    for e in used:
        key = e.name.replace(":", "").replace(",", "")
        names.add(key)
        if expected.get(key, e.short_hash) != e.short_hash:
            say_once(logging.WARNING, "embedding '%s': %s has hash %s, but the image was made with %s; the result "
                     "may differ", e.name, e.path, e.short_hash, expected[key])
    missing = [name for name in expected if name not in names]
    if missing:
        say_once(logging.WARNING, "the image was made with embedding(s) %s (its TI hashes), which this generation "
                 "does not use: pass --embeddings-dir DIR (or --embedding FILE) holding them; until then their "
                 "names are read as words", ", ".join(missing))
    return format_lora_hashes([(e.name, e.short_hash) for e in used])
