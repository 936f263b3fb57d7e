"""The fixed prompt sets and seeds of `ldm-eval`, so that every number it reports can be reproduced exactly.

Every set is a pure function of the shapes spec and the constants below (Python's `random` with a fixed seed,
which is stable across versions for `sample`/`randrange`), so two runs of the same model give the same images.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from ldm.demo.shapes import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    Attributes,
    all_combinations,
    heldout_combinations,
    partial_caption,
    train_combinations,
)

FIRST_SEED = 0  # image i of every prompt uses seed FIRST_SEED + i: the same noise at both guidance scales
SET_SEED = 0  # chooses the training sample and the recolouring targets
TRAIN_SAMPLE = 63  # as many training prompts as held-out ones, so the two rows are equally noisy
NEGATIVE_PROMPTS = 30
NEGATIVE_COLOR = "red"  # the colour the negative-prompt test asks the model to avoid
IMG2IMG_PROMPTS = 21
QUICK_PROMPTS = 5  # per set, for --quick
INPAINT_POSITIONS = ("top left", "bottom left")  # a small box there lies wholly in the left half (the mask)
INPAINT_SIZE = "small"
NO_COLOR = ""  # the colour of a combination whose prompt does not name one


@dataclass(frozen=True)
class Recolor:
    """An init image of `source` and a prompt for `target`: the same combination in another colour."""

    source: Attributes
    target: Attributes


@dataclass(frozen=True)
class PromptSets:
    heldout: list[Attributes]  # the 63 combinations left out of training: compositional generalisation
    train: list[Attributes]  # a fixed sample of training combinations, the in-distribution reference
    negative: list[Attributes]  # colour NO_COLOR: their prompts leave it out (see `colorless_caption`)
    img2img: list[Recolor]
    inpaint: list[Recolor]
    quick: bool


def colorless_caption(a: Attributes) -> str:
    """The canonical caption without the colour, e.g. `a large circle in the center on a black background`."""
    return partial_caption(a, {"size", "position", "background"})


def _recolor(combos: list[Attributes], rng: random.Random) -> list[Recolor]:
    """Pair each combination with a copy in a different colour, chosen uniformly among the other six."""
    names = list(COLORS)
    out = []
    for a in combos:
        other = names[(names.index(a.color) + rng.randrange(1, len(names))) % len(names)]
        out.append(Recolor(a, replace(a, color=other)))
    return out


def spread(items: list, n: int) -> list:
    """`n` items evenly spaced over the list: a quick subset that still varies every attribute."""
    if n >= len(items):
        return items
    return [items[i * len(items) // n] for i in range(n)]


def prompt_sets(quick: bool = False) -> PromptSets:
    """All prompt sets; `quick` keeps `QUICK_PROMPTS` of each (a smoke test, not a measurement)."""
    rng = random.Random(SET_SEED)
    train = rng.sample(train_combinations(), TRAIN_SAMPLE)
    negative = rng.sample(
        [Attributes(shape, NO_COLOR, bg, size, pos) for shape in SHAPES for bg in BACKGROUNDS
         for size in SIZES for pos in POSITIONS],
        NEGATIVE_PROMPTS,
    )
    img2img = _recolor(rng.sample(all_combinations(), IMG2IMG_PROMPTS), rng)
    inpaint = _recolor(
        [Attributes(shape, rng.choice(list(COLORS)), bg, INPAINT_SIZE, pos)
         for shape in SHAPES for bg in BACKGROUNDS for pos in INPAINT_POSITIONS],
        rng,
    )
    sets = PromptSets(heldout_combinations(), train, negative, img2img, inpaint, quick=False)
    if not quick:
        return sets
    n = QUICK_PROMPTS
    return PromptSets(*(spread(getattr(sets, f), n) for f in ("heldout", "train", "negative", "img2img", "inpaint")),
                      quick=True)
