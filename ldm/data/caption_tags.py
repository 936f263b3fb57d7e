"""Tag captions ("1girl, red hair, smiling, outdoors"): shuffle the tags and drop some, afresh for every sample.

`data.shuffle_tags` reorders a caption's comma-separated tags, `data.keep_tokens` keeps its first N tags in place
(and never drops them: a trigger word or the subject), `data.tag_dropout` drops each other tag with that probability.
A model trained on one fixed tag order learns the order (a prompt with the tags in another order works worse), and
one that always sees every tag cannot be prompted with fewer. The rules are kohya sd-scripts' `shuffle_caption`,
`keep_tokens` and `caption_tag_dropout_rate` (library/train_util.py, `process_caption`): split on ",", strip each tag,
the first `keep_tokens` fixed, shuffle the rest, then drop each of the rest, join with ", ". A caption is only
rewritten when shuffling or dropout is on, so the defaults leave it byte for byte as written.

Randomness comes from the `random.Random` the caller passes in: the latent dataset seeds it from (seed, key), with
key = epoch * len + position (`ldm.latents.cache.LatentDataset`), so each epoch shows another order and a resumed
run the very same ones, whatever the worker count.

With the text-embedding cache (`cache.text_embeddings: true`) both are refused: that cache stores one embedding per
distinct caption, encoded once, and a shuffled caption is a new string every step (`ldm.unet.config`'s check).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ldm.data.config import DataConfig


@dataclass(frozen=True)
class TagOptions:
    """`data.shuffle_tags`, `data.keep_tokens`, `data.tag_dropout` (see the module docstring)."""

    shuffle: bool = False
    keep_tokens: int = 0
    dropout: float = 0.0

    @property
    def active(self) -> bool:
        """Whether captions are rewritten at all (keep_tokens alone changes nothing, as in kohya's scripts)."""
        return self.shuffle or self.dropout > 0

    @classmethod
    def from_data(cls, data_cfg: DataConfig) -> TagOptions:
        return cls(bool(data_cfg.shuffle_tags), int(data_cfg.keep_tokens), float(data_cfg.tag_dropout))


def process_tags(caption: str, options: TagOptions, rng: random.Random) -> str:
    """The caption with its non-kept tags shuffled and/or dropped; draws from `rng` only when `options.active`
    (shuffle: one `rng.shuffle`; dropout: one `rng.random()` per non-kept tag, after the shuffle)."""
    if not options.active:
        return caption
    tags = [tag.strip() for tag in caption.strip().split(",")]
    fixed, flex = tags[: options.keep_tokens], tags[options.keep_tokens :]
    if options.shuffle:
        rng.shuffle(flex)
    if options.dropout > 0:
        flex = [tag for tag in flex if rng.random() >= options.dropout]
    return ", ".join(fixed + flex)
