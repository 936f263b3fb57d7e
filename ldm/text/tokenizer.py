"""CLIP tokenization: an offline `CLIPTokenizer`, and prompt -> (B, 77) ids with a warning that names dropped words.

Every CLIP text encoder used for latent diffusion (OpenAI CLIP for SD 1.x, OpenCLIP for SD 2.x) shares one BPE
vocabulary. open_clip ships it as `bpe_simple_vocab_16e6.txt.gz`, so a `CLIPTokenizer` can be built from that file
without the Hugging Face hub: the ids are those of `openai/clip-vit-large-patch14`'s tokenizer.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import CLIPTokenizer

from ldm.errors import UserError
from ldm.files import atomic_write_text

CONTEXT_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# the BPE file holds more merges than CLIP uses: CLIP keeps 49152 - 256 - 2 of them, so that 256 bytes + 256 end-of-word
# bytes + merges + 2 special tokens make a 49408-token vocabulary
NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 2 * 256 + NUM_MERGES + 2  # 49408
_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")


class PromptTruncatedWarning(UserWarning):
    """A prompt had more tokens than the text encoder's context; the message names the words that were dropped."""


def offline_clip_tokenizer(cache_dir: str | Path | None = None) -> CLIPTokenizer:
    """The CLIP BPE tokenizer (model_max_length 77, pads with `<|endoftext|>` like SD 1.x), no network needed.

    Built from open_clip's vocabulary file; the files are written once to `cache_dir` (default `$LDM_CACHE_DIR` or
    `~/.cache/ldm`, under `clip_tokenizer/`) and loaded from there afterwards.

    open_clip (SD 2.x) pads with id 0 instead, which is the token '!'. Do not make '!' the pad token to get that:
    the tokenizer then splits every '!' in a prompt off as padding (diffusers' SD 2.x tokenizer does exactly this,
    diffusers issue #4153). Pass `pad_id=0` to `tokenize_prompts` instead.
    """
    directory = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    if not _complete(directory):
        _write_tokenizer_files(directory)
    return CLIPTokenizer.from_pretrained(str(directory))


def _complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in _FILES)


def _default_cache_dir() -> Path:
    root = os.environ.get("LDM_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "ldm")
    return Path(root).expanduser() / "clip_tokenizer"


def _bpe_file() -> Path:
    # find_spec locates the package without importing it (importing open_clip takes seconds)
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "open_clip is not installed, so the offline CLIP vocabulary is missing: pip install open_clip_torch"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"


def _byte_symbols() -> list[str]:
    """One printable unicode character per byte value (0..255), in CLIP's (GPT-2's) byte-level BPE order.

    Bytes that are printable latin-1 characters stand for themselves; the others (control characters, space, ...)
    map to code points from 256 upwards, in byte order, so that no BPE symbol is whitespace or a control character.
    The vocabulary starts with the printable ones, then the remapped ones.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    kept = set(printable)
    remapped = [b for b in range(256) if b not in kept]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(remapped))]


def _write_tokenizer_files(directory: Path) -> None:
    """Write vocab.json, merges.txt and tokenizer_config.json, the layout of a hub CLIP tokenizer."""
    with gzip.open(_bpe_file(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # line 0 is a version header
    symbols = _byte_symbols()
    # id order matters: bytes, bytes ending a word, one token per merge (in merge order), then the two special tokens
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(pair) for pair in merges] + [BOS_TOKEN, EOS_TOKEN]
    assert len(tokens) == VOCAB_SIZE, len(tokens)
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": CONTEXT_LENGTH,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "do_lower_case": True,
    }
    # Each file is written atomically (temporary sibling, fsync, rename), so concurrent processes never read half a
    # file and an interrupted run leaves some files complete and the others missing (`_complete` is then false).
    # Processes racing to write the same files write identical bytes: whichever rename comes last is as good.
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / "vocab.json", json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    atomic_write_text(directory / "merges.txt", "#version: 0.2\n" + "\n".join(" ".join(p) for p in merges) + "\n")
    atomic_write_text(directory / "tokenizer_config.json", json.dumps(config, indent=2))


def tokenize_prompts(
    tokenizer: CLIPTokenizer,
    prompts: Sequence[str],
    context_length: int,
    clean: Callable[[str], str] | None = None,
    pad_id: int | None = None,
) -> torch.LongTensor:
    """Prompts -> ids (B, context_length): `<|startoftext|>`, tokens, `<|endoftext|>`, then padding.

    The call is exactly diffusers' `StableDiffusionPipeline.encode_prompt` one (padding="max_length", truncation=True),
    so the ids match it. A prompt that does not fit raises a `PromptTruncatedWarning` naming the dropped words.
    `clean` preprocesses each prompt first (open_clip models use open_clip's ftfy + HTML-unescape cleaning);
    `pad_id` replaces the tokenizer's padding id (open_clip pads with 0).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    texts = [clean(p) for p in prompts] if clean is not None else list(prompts)
    tokens = tokenizer(texts, padding="max_length", max_length=context_length, truncation=True, return_tensors="pt")
    ids = tokens.input_ids  # (B, 77)
    if pad_id is not None:
        ids = ids.masked_fill(tokens.attention_mask == 0, pad_id)
    _warn_truncated(tokenizer, texts, context_length)
    return ids


def _warn_truncated(tokenizer: CLIPTokenizer, texts: list[str], context_length: int) -> None:
    room = context_length - 2  # start and end tokens take two places
    # verbose=False: the tokenizer's own "sequence length is longer than" warning would not say what was lost
    full = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False).input_ids
    for ids in full:
        if len(ids) > room:
            dropped = tokenizer.decode(ids[room:])
            if len(dropped) > 300:  # a whole paragraph in the log helps nobody
                dropped = dropped[:300] + " ..."
            warnings.warn(
                f'prompt truncated to {context_length} tokens; dropped {len(ids) - room} tokens: "{dropped}"',
                PromptTruncatedWarning,
                stacklevel=4,
            )
