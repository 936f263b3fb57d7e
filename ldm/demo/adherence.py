"""Generate shapes images from prompts and read them back: does the model draw what the prompt says?

Each test takes the generator as an argument (anything called like `ldm.pipeline.Pipeline`), so the scoring can
be checked against fakes whose right answers are known, e.g. a "perfect model" that renders its prompt.
Every result is a plain dict of numbers (shares in [0, 1]) that goes into the report as it is.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image

from ldm.demo.prompts import FIRST_SEED, NEGATIVE_COLOR, Recolor, colorless_caption
from ldm.demo.reader import attribute_accuracy, read_attributes
from ldm.demo.shapes import COLORS, Attributes, canonical_caption, render
from ldm.progress import progress_bar

IMG2IMG_STRENGTH = 0.6
INPAINT_STRENGTH = 1.0  # the masked half is repainted from noise: the old colour cannot leak through the latents
# The pipeline's default feather (4 px) is meant for 512 px images; at 32 px it would blend the old colour into
# the right edge of the new shape. 1 px still exercises the feathered paste-back.
INPAINT_MASK_BLUR = 1
KEPT = ("shape", "size", "position", "background")  # what recolouring must not change


class HasImages(Protocol):
    images: list[Image.Image]


class ImageGenerator(Protocol):
    """`ldm.pipeline.Pipeline.__call__`, as far as the evaluation uses it."""

    def __call__(self, prompt: str, negative_prompt: str = "", **kwargs: Any) -> HasImages: ...


@dataclass(frozen=True)
class Settings:
    steps: int = 25
    cfg: float = 7.5
    seeds: int = 4  # images per prompt; image i uses seed FIRST_SEED + i
    sampler: str | None = None  # None: the pipeline's default
    size: int = 32  # the model's native image side: init images and masks are rendered at it
    progress: bool = False  # one bar per test
    new_colors: tuple[str, ...] = ()  # colours outside the spec the reader also knows (ldm-eval --new-color)


def generate(
    pipe: ImageGenerator, prompt: str, s: Settings, negative: str = "", cfg: float | None = None, **extra: Any
) -> list[Image.Image]:
    """`s.seeds` images of one prompt, all in one batch (batching does not change the pixels)."""
    kwargs: dict[str, Any] = dict(steps=s.steps, cfg=s.cfg if cfg is None else cfg, seed=FIRST_SEED,
                                  num_images=s.seeds, batch_size=s.seeds, show_progress=False, **extra)
    if s.sampler is not None:
        kwargs["sampler"] = s.sampler
    return pipe(prompt, negative, **kwargs).images


def _bar(items: list, desc: str, s: Settings) -> Iterable:
    return progress_bar(items, desc=desc, disable=not s.progress, leave=False, file=sys.stderr, unit="prompt")


def _share(flags: list[bool]) -> float:
    return sum(flags) / len(flags)


def prompt_adherence(
    pipe: ImageGenerator, combos: list[Attributes], s: Settings, cfg: float, desc: str = "adherence"
) -> dict[str, Any]:
    """Per-attribute and all-five accuracy of images generated from the canonical captions of `combos`."""
    pairs = []
    for a in _bar(combos, desc, s):
        images = generate(pipe, canonical_caption(a), s, cfg=cfg)
        pairs += [(a, read_attributes(image, s.new_colors)) for image in images]
    return {"cfg": cfg, "prompts": len(combos), "images": len(pairs), "accuracy": attribute_accuracy(pairs)}


def _matches(a: Attributes, read: Attributes, names: tuple[str, ...]) -> bool:
    return all(getattr(a, n) == getattr(read, n) for n in names)


def negative_prompt_test(pipe: ImageGenerator, combos: list[Attributes], s: Settings) -> dict[str, Any]:
    """Prompts without a colour, with negative prompt "" and NEGATIVE_COLOR: how often is the image that colour?

    With "" any colour is a right answer, so the colour should appear about as often as in training (1 in 7);
    the negative prompt is the unconditional branch of guidance, so it should make that colour rarer.
    `prompt_match` checks that avoiding the colour did not cost the attributes the prompt does name.
    """
    reads: dict[str, list[tuple[Attributes, Attributes]]] = {"": [], NEGATIVE_COLOR: []}
    for a in _bar(combos, "negative prompt", s):
        for negative, pairs in reads.items():
            images = generate(pipe, colorless_caption(a), s, negative)
            pairs += [(a, read_attributes(image, s.new_colors)) for image in images]
    return {
        "negative": NEGATIVE_COLOR,
        "cfg": s.cfg,
        "prompts": len(combos),
        "images": len(reads[""]),  # per negative prompt
        "color_share": {neg: _share([r.color == NEGATIVE_COLOR for _, r in p]) for neg, p in reads.items()},
        "prompt_match": {neg: _share([_matches(a, r, KEPT) for a, r in p]) for neg, p in reads.items()},
        "chance": 1 / len(COLORS),
    }


def img2img_test(pipe: ImageGenerator, cases: list[Recolor], s: Settings) -> dict[str, Any]:
    """Init image: an exact render in colour A; prompt: the same combination in colour B. Is it B, and the rest kept?"""
    pairs = []
    for case in _bar(cases, "img2img", s):
        init = render(case.source, s.size)
        images = generate(pipe, canonical_caption(case.target), s, init_image=init, strength=IMG2IMG_STRENGTH)
        pairs += [(case.target, read_attributes(image, s.new_colors)) for image in images]
    return {
        "strength": IMG2IMG_STRENGTH,
        "cfg": s.cfg,
        "prompts": len(cases),
        "images": len(pairs),
        "target_color": _share([t.color == r.color for t, r in pairs]),
        "kept": {n: _share([getattr(t, n) == getattr(r, n) for t, r in pairs]) for n in KEPT},
        "all": _share([t == r for t, r in pairs]),
    }


def left_half_mask(size: int) -> Image.Image:
    """White (repaint) on the left half, black (keep) on the right."""
    mask = np.zeros((size, size), np.uint8)
    mask[:, : size // 2] = 255
    return Image.fromarray(mask)


def inpaint_test(pipe: ImageGenerator, cases: list[Recolor], s: Settings) -> dict[str, Any]:
    """Repaint the left half (holding a small shape in colour A) with a prompt for the same shape in colour B.

    `max_outside_diff` is the largest change of any pixel outside the mask, over all images: it must be 0.
    """
    mask = left_half_mask(s.size)
    pairs, max_diff = [], 0
    for case in _bar(cases, "inpainting", s):
        init = render(case.source, s.size)
        kept = np.asarray(init, dtype=np.int16)[:, s.size // 2 :]  # (H, W/2, 3), outside the mask
        images = generate(pipe, canonical_caption(case.target), s, init_image=init, mask=mask,
                          strength=INPAINT_STRENGTH, mask_blur=INPAINT_MASK_BLUR)
        for image in images:
            out = np.asarray(image.convert("RGB"), dtype=np.int16)[:, s.size // 2 :]
            max_diff = max(max_diff, int(np.abs(out - kept).max()))
            pairs.append((case.target, read_attributes(image, s.new_colors)))
    return {
        "mask": "left half",
        "strength": INPAINT_STRENGTH,
        "mask_blur": INPAINT_MASK_BLUR,
        "cfg": s.cfg,
        "prompts": len(cases),
        "images": len(pairs),
        "max_outside_diff": max_diff,
        "target_color": _share([t.color == r.color for t, r in pairs]),
        "others_match": _share([_matches(t, r, KEPT) for t, r in pairs]),
    }
