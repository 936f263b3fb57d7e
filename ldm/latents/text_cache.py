"""The text-embedding cache: the frozen text encoder's output for every training caption, computed once.

With `cache.text_embeddings: true` the training step looks each caption's (77, D) hidden states up instead of running
the text encoder. Training captions are plain text (no prompt weighting), so a caption's embedding is a function of
the encoder alone: its weights, the layer it is read from, its tokenizer (and prompt cleaning), and the dtype.

On-disk format: one file beside the latents, `<latent cache dir>/text-embeddings.safetensors`, written atomically:

    embeddings  (U, 77, D)  one row per distinct caption, the empty caption "" first (row 0), in the encoder's dtype
    pooled      (U, P)      SDXL only: the second tower's pooled embedding of each caption, same rows

and, in the safetensors metadata: "format", "version", "key" (JSON: what the embeddings depend on, see
`encoder_key`; an SDXL file's has "family": "sdxl"), "captions" (JSON list, row order) and "content_sha256" (of the
tensors, the captions and the key), so the file verifies itself. A file built for the other family (an SD encoder's
for an SDXL run, or the other way round) is refused saying so; one built for another encoder, layer, tokenizer,
dtype or caption set is stale: it is refused naming the difference (rebuilt with `cache.rebuild=true`); a file that
does not verify is corrupt, likewise. Row 0 is always the encoding of "": an SDXL model with
`force_zeros_for_empty_prompt` drops captions to zeros instead (`empty_conditioning`).
The embeddings stay in CPU memory, memory-mapped from the file (clean page-cache pages, shared by the processes of
one machine); a batch's rows are gathered there and moved to the device. Each process reads and verifies the file
once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors

from ldm.errors import UserError
from ldm.files import atomic_write_bytes
from ldm.latents.cache import CorruptCacheError, StaleCacheError
from ldm.latents.cache_key import FAMILY_NAMES
from ldm.latents.shard_file import tensors_sha256
from ldm.parallel.collective import run_on_all
from ldm.text.conditioning import Conditioning

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ldm.text.encoder import FrozenTextEncoder
    from ldm.text.sdxl import SDXLTextEncoder

log = logging.getLogger(__name__)

FORMAT_NAME = "ldm-text-embedding-cache"
FORMAT_VERSION = 1
FILE_NAME = "text-embeddings.safetensors"
HINT = "delete it or set cache.rebuild=true"


def encoder_key(encoder: FrozenTextEncoder | SDXLTextEncoder) -> dict[str, Any]:
    """What a caption's embedding depends on: sha256 of the weights as loaded, the layer, the tokenizer, the dtype;
    for SDXL's two towers (each read at its penultimate layer) every tower's tokenizing, and "family": "sdxl"."""
    sdxl = getattr(encoder, "pooled_size", None) is not None
    tokenizing = [_tokenizing(tower) for tower in encoder.towers] if sdxl else _tokenizing(encoder)
    key = {
        "encoder": type(encoder).__name__,
        "weights_sha256": tensors_sha256(encoder.state_dict()),
        "layer": "penultimate" if sdxl else encoder.layer,
        "tokenizer_sha256": hashlib.sha256(json.dumps(tokenizing).encode()).hexdigest(),
        "dtype": str(encoder.dtype).removeprefix("torch."),
    }
    return {"family": "sdxl", **key} if sdxl else key  # an SD key as before this field: older files stay valid


def _tokenizing(encoder: FrozenTextEncoder) -> list[Any]:
    tokenizer = encoder.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)  # fast tokenizers: vocab, merges, normaliser in one JSON
    described = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return [type(tokenizer).__name__, described, encoder.context_length, encoder._pad_id,
            getattr(encoder._clean, "__qualname__", None)]


def _captions_sha256(captions: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(captions), ensure_ascii=False).encode()).hexdigest()


def _content_sha256(embeddings: torch.Tensor, captions_json: str, key_json: str,
                    pooled: torch.Tensor | None = None) -> str:
    tensors = {"embeddings": embeddings} if pooled is None else {"embeddings": embeddings, "pooled": pooled}
    return tensors_sha256(tensors, key_json, captions_json)


class TextEmbeddingCache:
    """Caption -> (77, D) hidden states (and SDXL's (P,) pooled embedding), by lookup; `encode` stands in for
    `FrozenTextEncoder.encode`, `encode_conditioning` for either encoder's."""

    def __init__(self, path: Path, embeddings: torch.Tensor, captions: list[str], device: torch.device | str,
                 pooled: torch.Tensor | None = None) -> None:
        self.path, self.embeddings, self.captions, self.device = path, embeddings, captions, torch.device(device)
        self.pooled = pooled  # (U, P) for SDXL, else None
        self._row = {caption: row for row, caption in enumerate(captions)}

    def _rows(self, captions: Sequence[str]) -> torch.Tensor:
        # a caption that was not cached is a bug (the cache holds all of the dataset's)
        return torch.tensor([self._row[c] for c in captions], dtype=torch.long)

    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        """(B, 77, D) on the device."""
        return self.embeddings[self._rows(captions)].to(self.device)

    def encode_conditioning(self, captions: Sequence[str]) -> Conditioning:
        """Conditioning(context (B, 77, D), pooled (B, P) or None) on the device."""
        rows = self._rows(captions)
        pooled = None if self.pooled is None else self.pooled[rows].to(self.device)
        return Conditioning(self.embeddings[rows].to(self.device), pooled)

    def empty_embedding(self) -> torch.Tensor:
        """(1, 77, D): the empty caption's embedding (computed once, at build time), for caption dropout."""
        return self.embeddings[:1].to(self.device)

    def empty_conditioning(self, force_zeros: bool = False) -> Conditioning:
        """The unconditional branch (batch 1) for caption dropout: the empty caption's encoding, or zeros for an SDXL
        model with `force_zeros_for_empty_prompt` (as its `empty_conditioning` gives)."""
        empty = self.encode_conditioning([""])
        return empty.zeros_like() if force_zeros else empty

    def bytes_per_caption(self) -> int:
        return self.embeddings[0].numel() * self.embeddings.element_size()

    @classmethod
    def open(cls, path: Path, key: dict[str, Any], captions: Sequence[str], device: torch.device | str = "cpu"
             ) -> TextEmbeddingCache:
        """Load the file after checking it verifies (else `CorruptCacheError`) and was built for this encoder and
        these captions (else `StaleCacheError` naming the difference). Missing file: `FileNotFoundError`."""
        if not path.is_file():
            raise FileNotFoundError(path)
        try:
            try:  # memory-mapped: the file is not copied into this process (verifying reads it once, page by page)
                with safe_open(path, framework="pt") as file:
                    metadata = file.metadata() or {}
                    names = set(file.keys())
                    embeddings = file.get_tensor("embeddings") if "embeddings" in names else None
                    pooled = file.get_tensor("pooled") if "pooled" in names else None
            except SafetensorError as error:
                raise ValueError(f"is not a valid safetensors file ({str(error).splitlines()[0]})") from error
            if metadata.get("format") != FORMAT_NAME or embeddings is None:
                raise ValueError("is not a text-embedding cache")
            if int(metadata.get("version", 0)) > FORMAT_VERSION:
                raise ValueError(f"has format version {metadata['version']}, newer than this code")
            content = _content_sha256(embeddings, metadata["captions"], metadata["key"], pooled)
            if content != metadata.get("content_sha256"):
                raise ValueError("does not match its own content hash (corrupted)")
            built_key, built_captions = json.loads(metadata["key"]), json.loads(metadata["captions"])
            if len(built_captions) != embeddings.shape[0] or built_captions[:1] != [""]:
                raise ValueError("has captions and embeddings of different lengths")
            if (built_key.get("family") == "sdxl") != (pooled is not None):
                raise ValueError("has pooled embeddings without being an SDXL cache, or the other way round")
        except (ValueError, KeyError, TypeError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise CorruptCacheError(f"text-embedding cache {path} {reason}: {HINT}") from error
        if "encoder" in key:  # (the tar exporter opens any encoder's file with key {})
            _check_family(path, built_key.get("family", "sd"), key.get("family", "sd"))
        diffs = [f"{name} {built_key.get(name)!s:.16} != {value!s:.16}" for name, value in key.items()
                 if built_key.get(name) != value]
        wanted = _distinct(captions)
        if built_key.get("captions_sha256") != _captions_sha256(wanted):
            diffs.append(f"other captions ({len(built_captions)} cached != {len(wanted)} in the latent cache)")
        if diffs:
            raise StaleCacheError(
                f"text-embedding cache {path} is stale: it was built with {', '.join(diffs)} (cache != this run): "
                f"{HINT}"
            )
        return cls(path, embeddings, built_captions, device, pooled)


def _check_family(path: Path, built: str, family: str) -> None:
    if built != family:
        raise StaleCacheError(f"text-embedding cache {path} was built for {FAMILY_NAMES.get(built, built)}'s text "
                              f"encoder, this run uses {FAMILY_NAMES[family]}'s: {HINT}")


def check_text_cache_family(directory: Path, family: str) -> None:
    """Before a run writes anything: refuse `<directory>/text-embeddings.safetensors` if it was built for the other
    model family ("sd" or "sdxl"); a missing or unreadable file is left to `ensure_text_cache`."""
    path = Path(directory) / FILE_NAME
    try:
        with safe_open(path, framework="pt") as file:
            key = json.loads((file.metadata() or {})["key"])
    except (OSError, SafetensorError, KeyError, ValueError, TypeError):
        return
    _check_family(path, key.get("family", "sd") if isinstance(key, dict) else "sd", family)


def _distinct(captions: Sequence[str]) -> list[str]:
    """"" first (the dropout embedding), then every other caption once, sorted (independent of the row order)."""
    return [""] + sorted(set(captions) - {""})


@torch.no_grad()
def build_text_cache(path: Path, encoder: FrozenTextEncoder | SDXLTextEncoder, key: dict[str, Any],
                     captions: Sequence[str], batch_size: int = 64) -> None:
    """Encode every distinct caption (and "") once and write the file atomically."""
    distinct = _distinct(captions)
    parts = [encoder.encode_conditioning(distinct[i : i + batch_size]) for i in range(0, len(distinct), batch_size)]
    embeddings = torch.cat([c.context.cpu() for c in parts]).contiguous()  # (U, 77, D)
    pooled = None if parts[0].pooled is None else torch.cat([c.pooled.cpu() for c in parts]).contiguous()  # (U, P)
    captions_json = json.dumps(distinct, ensure_ascii=False)
    key_json = json.dumps({**key, "captions_sha256": _captions_sha256(distinct)}, sort_keys=True)
    metadata = {"format": FORMAT_NAME, "version": str(FORMAT_VERSION), "key": key_json, "captions": captions_json,
                "content_sha256": _content_sha256(embeddings, captions_json, key_json, pooled)}
    tensors = {"embeddings": embeddings} if pooled is None else {"embeddings": embeddings, "pooled": pooled}
    atomic_write_bytes(path, save_safetensors(tensors, metadata=metadata))
    log.info("text-embedding cache %s: %d captions of shape %s, %d bytes each", path, len(distinct),
             tuple(embeddings.shape[1:]), embeddings[0].numel() * embeddings.element_size())


def ensure_text_cache(accelerator: Accelerator, encoder: FrozenTextEncoder | SDXLTextEncoder, captions: Sequence[str],
                      directory: Path, rebuild: bool = False) -> TextEmbeddingCache:
    """Open `<directory>/text-embeddings.safetensors`, building it first (on the main process) when missing, or
    when stale or corrupt and `rebuild`. Collective: call it on every process."""
    path = Path(directory) / FILE_NAME
    key = encoder_key(encoder)

    opened: list[TextEmbeddingCache] = []  # the main process's, when the file it checked was good

    def check_or_build() -> None:
        try:
            opened.append(TextEmbeddingCache.open(path, key, captions, device=accelerator.device))
            return
        except FileNotFoundError:
            pass
        except UserError as error:  # stale or corrupt
            if not rebuild:
                raise
            log.warning("rebuilding the text-embedding cache (cache.rebuild=true): %s", error)
        build_text_cache(path, encoder, key, captions)

    run_on_all(accelerator, check_or_build if accelerator.is_main_process else None, what="text-embedding caching",
               describe_os_error=lambda reason: f"could not write the text-embedding cache {path}: {reason}")
    # once per process: the main process's checked file, else the file (just built) as every other process reads it
    return opened[0] if opened else TextEmbeddingCache.open(path, key, captions, device=accelerator.device)
