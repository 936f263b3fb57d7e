"""Unseen words as the unconditional branch (`train.uncond_words`): a share of the training captions is replaced by a
random string of words that no training caption uses, so the U-Net learns that such words mean "no condition".

Why: a negative prompt *is* the unconditional branch of classifier-free guidance. A model trained with only the empty
prompt there maps a word it never saw ("blurry") to an arbitrary point of its caption space, and guidance then pushes
images away from that point: the bundled demo's red circle turned magenta with `--negative "blurry"` (issue 28).
Trained with random unseen words as unconditional, such a negative prompt acts like the empty one.

The words: whole-word tokens of the text encoder's tokenizer (`train.uncond_vocab: tokenizer`; CLIP's BPE vocabulary
marks them with "</w>"), or a text file with one word a line; minus every word of the training captions, sorted so
that the list is the same on every machine. A replaced caption is 1 to `MAX_WORDS` of them, joined by spaces or by
", " (negative prompts are often comma lists).

Draws come from torch's global RNG, which checkpoints save and restore (ldm/checkpoint/save.py), so a resumed run
draws the same words; a fixed number per caption whatever is replaced, so the stream does not depend on the draws.
With `train.uncond_words: 0` nothing is drawn and training is bit-identical to a run without the option.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ldm.errors import UserError

log = logging.getLogger("train_ldm")

MAX_WORDS = 6  # per replaced caption: "blurry" to "ugly, lowres, bad anatomy, worst quality"
WORD = re.compile(r"[a-z]+")
END_OF_WORD = "</w>"  # CLIP's BPE suffix of a token that ends a word


def caption_words(captions: Iterable[str]) -> set[str]:
    """The lower-case alphabetic words of `captions`."""
    return {w for caption in captions for w in WORD.findall(caption.lower())}


def tokenizer_words(tokenizer: Any) -> list[str]:
    """The whole alphabetic words (>= 2 letters) of a CLIP tokenizer's vocabulary (its "word</w>" tokens)."""
    words = (t[: -len(END_OF_WORD)] for t in tokenizer.get_vocab() if t.endswith(END_OF_WORD))
    return [w for w in words if len(w) >= 2 and WORD.fullmatch(w)]


def file_words(path: Path) -> list[str]:
    """One word a line (lower-cased; blank lines and lines starting with '#' skipped)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"train.uncond_vocab: cannot read the word file {path} ({e}); give a UTF-8 text file with "
                        "one word a line, or 'tokenizer'") from None
    return [line.strip().lower() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def unseen_words(words: Iterable[str], captions: Iterable[str]) -> list[str]:
    """`words` minus every word of `captions`, without repeats, sorted (the same list on every run)."""
    return sorted(set(words) - caption_words(captions))


@dataclass(frozen=True)
class UncondWords:
    """Replaces `share` of the captions by random strings of `words` (call it once per micro-batch)."""

    share: float
    words: tuple[str, ...] = ()

    def __call__(self, captions: Sequence[str]) -> list[str]:
        """`captions` (B strings) with each one replaced with probability `share`; draws nothing when `share` is 0."""
        captions = list(captions)
        if self.share == 0:
            return captions
        b = len(captions)
        replace = torch.rand(b) < self.share  # (B,)
        counts = torch.randint(1, MAX_WORDS + 1, (b,))  # (B,) words per string
        picks = torch.randint(len(self.words), (b, MAX_WORDS))  # (B, MAX_WORDS) indices into `words`
        commas = torch.rand(b) < 0.5  # (B,) ", " or " " between the words
        for i in torch.nonzero(replace).flatten().tolist():
            chosen = [self.words[j] for j in picks[i, : counts[i]].tolist()]
            captions[i] = (", " if commas[i] else " ").join(chosen)
        return captions


def uncond_words(share: float, vocab: str, text_encoder: Any, captions: Sequence[str]) -> UncondWords:
    """The option of `train.uncond_words` (`share`) and `train.uncond_vocab` (`vocab`: "tokenizer" or a word file)
    for a run whose training captions are `captions`; `text_encoder` supplies the tokenizer (SDXL: its first tower's).
    """
    if share == 0:
        return UncondWords(0.0)
    if vocab == "tokenizer":
        tokenizer = getattr(text_encoder, "tokenizer", None) or text_encoder.towers[0].tokenizer
        if not hasattr(tokenizer, "get_vocab"):
            raise UserError("train.uncond_vocab=tokenizer needs a tokenizer with a vocabulary (CLIP's): give a word "
                            "file instead (one word a line)")
        source = tokenizer_words(tokenizer)
    else:
        source = file_words(Path(vocab))
    words = unseen_words(source, captions)
    if not words:
        raise UserError(f"train.uncond_vocab: every word of {vocab} appears in the training captions; give words "
                        "the captions never use")
    log.info("train.uncond_words: %.0f%% of the captions become random strings of %d words the captions never use "
             "(%d of the source's %d words left out: they appear in the captions)", 100 * share, len(words),
             len(set(source)) - len(words), len(set(source)))
    return UncondWords(share, tuple(words))
