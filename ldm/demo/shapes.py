"""The "shapes" domain: small synthetic captioned images with a known, checkable generative spec.

Every image shows one filled shape on a plain background. Five attributes fully describe it:

* shape:      circle, square, triangle (apex up, base on the bottom edge of its box)
* color:      red (220, 40, 40), orange (245, 140, 30), yellow (240, 220, 40), green (40, 170, 60),
              cyan (40, 200, 220), blue (40, 70, 220), purple (150, 60, 200)
* background: black (15, 15, 15), white (240, 240, 240), gray (128, 128, 128)
* size:       the side of the shape's square box is 30% ("small") or 55% ("large") of the image side
* position:   centre of the box, as fractions of (width, height): center (0.5, 0.5),
              top left (0.27, 0.27), top right (0.73, 0.27), bottom left (0.27, 0.73),
              bottom right (0.73, 0.73)

3 x 7 x 3 x 2 x 5 = 630 attribute combinations. A large shape near a corner may run slightly past the
image edge; that is part of the spec (it is clipped), not a bug.

Rendering is anti-aliased: the shape is drawn at ``SUPERSAMPLE`` (4x) resolution with PIL ImageDraw and
downsampled with a box filter, so pixels fully inside the shape have exactly the shape colour and pixels
fully outside have exactly the background colour. To make this a distribution rather than 630 fixed
pictures, a random generator adds jitter: box centre +-0.03 (fractions of the image side), box side
x[0.9, 1.1], shape colour +-10 per channel (clipped to 0..255). The background is never jittered and
images are never flipped (left/right is meaningful).

Captions: the canonical form is ``a {size} {color} {shape} in the {position} on a {background} background``
(e.g. ``a small red circle in the center on a black background``). ``sample_caption`` returns it half of the
time, another full phrasing one sixth of the time, and one third of the time a caption that leaves out a
random non-empty subset of {size, color, position, background} (e.g. ``a red circle on a black background``),
so prompts with missing attributes and negative prompts mean something. The shape word is always present.

Held-out rule (fixed; evaluation measures compositional generalisation on it):
for each of the 63 (shape, color, background) triples, the one (size, position) pair among the 10 whose
canonical caption has the smallest SHA-256 hex digest (of its UTF-8 bytes) is held out. That gives 63
held-out combinations (10%) and 567 training ones. Because the rule is stratified, every
(shape, color, background) triple, and therefore every single attribute value, still appears in training
(each with 9 of its 10 size/position pairs); only the specific combinations are unseen. The rule is pure
Python (hashlib), so it does not change with numpy/torch versions.

Datasets are written in the Hugging Face ``datasets`` "imagefolder" layout: PNG files plus
``metadata.jsonl`` with ``{"file_name": "00000.png", "text": "<caption>", "shape": ..., "color": ...,
"background": ..., "size": ..., "position": ...}`` per line. Output is a pure function of the arguments
(same seed -> byte-identical files). Command line: ``ldm-shapes OUT_DIR --num-images N --seed S``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from ldm.errors import OneLineArgumentParser, UserError, exit_on_user_error
from ldm.files import remove_tree, replace_directory, temp_sibling

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "cyan": (40, 200, 220),
    "blue": (40, 70, 220),
    "purple": (150, 60, 200),
}

# Colours outside the spec above: never in the demo model's data (no combination, split or caption uses them). The
# LoRA demo teaches one to the bundled model (docs/formats.md); `render` draws them.
NEW_COLORS: dict[str, tuple[int, int, int]] = {
    "pink": (240, 100, 180),
}

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "white": (240, 240, 240),
    "gray": (128, 128, 128),
}

# Side of the shape's square box as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.30, "large": 0.55}

# Centre of the shape's box as (x, y) fractions of the image width and height.
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
}

SPLITS: tuple[str, ...] = ("train", "heldout", "all")

# Rendering parameters (part of the spec, so outside tools can reproduce the distribution).
SUPERSAMPLE = 4
POSITION_JITTER = 0.03  # +- fraction of the image side, uniform
SIZE_JITTER = 0.10  # box side multiplied by uniform [1 - j, 1 + j]
COLOR_JITTER = 10  # +- integer per channel, uniform, then clipped to 0..255

# Caption mix: canonical / other full phrasing / some attributes left out.
CANONICAL_SHARE = 1 / 2
ALT_FULL_SHARE = 1 / 6
# The remaining 1/3 drop attributes.

MIN_IMAGE_SIZE = 8  # below this a small shape is a couple of pixels and the spec stops meaning anything


@dataclass(frozen=True)
class Attributes:
    """The five attributes that fully describe one shapes image (up to jitter)."""

    shape: str
    color: str
    background: str
    size: str
    position: str


# ---------------------------------------------------------------------------------------------------------
# Combinations and the held-out split
# ---------------------------------------------------------------------------------------------------------


def all_combinations() -> list[Attributes]:
    """All 630 attribute combinations in a fixed order (shape, color, background, size, position nesting)."""
    return [
        Attributes(shape, color, background, size, position)
        for shape, color, background, size, position in itertools.product(
            SHAPES, COLORS, BACKGROUNDS, SIZES, POSITIONS
        )
    ]


def _caption_digest(a: Attributes) -> str:
    return hashlib.sha256(canonical_caption(a).encode("utf-8")).hexdigest()


def heldout_combinations() -> list[Attributes]:
    """The fixed 63 held-out combinations (see the module docstring for the rule), in `all_combinations` order."""
    chosen: set[Attributes] = set()
    for shape, color, background in itertools.product(SHAPES, COLORS, BACKGROUNDS):
        candidates = [Attributes(shape, color, background, s, p) for s, p in itertools.product(SIZES, POSITIONS)]
        chosen.add(min(candidates, key=_caption_digest))
    return [a for a in all_combinations() if a in chosen]


def train_combinations() -> list[Attributes]:
    """The 567 combinations used for training: all combinations minus the held-out ones."""
    heldout = set(heldout_combinations())
    return [a for a in all_combinations() if a not in heldout]


def new_color_combinations(color: str, split: str = "all") -> list[Attributes]:
    """The 90 combinations in a colour of `NEW_COLORS` ("all"), with the held-out rule applied per
    (shape, colour, background) triple: 9 "heldout", 81 "train"."""
    if color not in NEW_COLORS:
        raise UserError(f"unknown new colour {color!r}; use one of: {', '.join(NEW_COLORS)}")
    combos = [Attributes(shape, color, background, size, position)
              for shape, background, size, position in itertools.product(SHAPES, BACKGROUNDS, SIZES, POSITIONS)]
    heldout = {min([a for a in combos if (a.shape, a.background) == (shape, background)], key=_caption_digest)
               for shape, background in itertools.product(SHAPES, BACKGROUNDS)}
    if split == "all":
        return combos
    if split in ("train", "heldout"):
        return [a for a in combos if (a in heldout) == (split == "heldout")]
    raise UserError(f"unknown split {split!r}; use one of: {', '.join(SPLITS)}")


def split_combinations(split: str) -> list[Attributes]:
    """Combinations for a split name: "train", "heldout" or "all"."""
    if split == "train":
        return train_combinations()
    if split == "heldout":
        return heldout_combinations()
    if split == "all":
        return all_combinations()
    raise UserError(f"unknown split {split!r}; use one of: {', '.join(SPLITS)}")


# ---------------------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------------------


def canonical_caption(a: Attributes) -> str:
    """`a {size} {color} {shape} in the {position} on a {background} background`."""
    return f"a {a.size} {a.color} {a.shape} in the {a.position} on a {a.background} background"


def _with_article(phrase: str) -> str:
    article = "an" if phrase[0] in "aeiou" else "a"
    return f"{article} {phrase}"


def partial_caption(a: Attributes, keep: set[str]) -> str:
    """Canonical word order, keeping only the optional attributes in `keep` (the shape is always kept)."""
    words = [getattr(a, name) for name in ("size", "color") if name in keep] + [a.shape]
    caption = _with_article(" ".join(words))
    if "position" in keep:
        caption += f" in the {a.position}"
    if "background" in keep:
        caption += f" on a {a.background} background"
    return caption


def _alternate_full_caption(a: Attributes, rng: random.Random) -> str:
    """A full caption in a non-canonical phrasing (all five attributes present)."""
    templates = (
        "{size} {color} {shape}, {position}, {background} background",
        "{article_color} {shape}, {size}, in the {position}, {background} background",
        "{size} {color} {shape} on {background}, {position}",
    )
    template = rng.choice(templates)
    return template.format(
        size=a.size,
        color=a.color,
        shape=a.shape,
        position=a.position,
        background=a.background,
        article_color=_with_article(a.color),
    )


OPTIONAL_ATTRIBUTES: tuple[str, ...] = ("size", "color", "position", "background")
ALL_ATTRIBUTES = frozenset(("shape", *OPTIONAL_ATTRIBUTES))


def sample_caption(a: Attributes, rng: random.Random) -> str:
    """A caption for `a`: canonical 1/2, another full phrasing 1/6, and 1/3 leaving out some attributes.

    Dropped attributes are a uniformly random non-empty subset of size/color/position/background, so a
    model sees each attribute missing about 1/3 * 8/15 = 18% of the time and learns what "unspecified" means.
    """
    return sample_caption_and_mentions(a, rng)[0]


def sample_caption_and_mentions(a: Attributes, rng: random.Random) -> tuple[str, frozenset[str]]:
    """`sample_caption`, plus the names of the attributes the caption states (the shape is always stated)."""
    r = rng.random()
    if r < CANONICAL_SHARE:
        return canonical_caption(a), ALL_ATTRIBUTES
    if r < CANONICAL_SHARE + ALT_FULL_SHARE:
        return _alternate_full_caption(a, rng), ALL_ATTRIBUTES
    # A random non-empty subset to drop: a random 4-bit mask in 1..15.
    drop_mask = rng.randrange(1, 2 ** len(OPTIONAL_ATTRIBUTES))
    keep = {name for i, name in enumerate(OPTIONAL_ATTRIBUTES) if not drop_mask >> i & 1}
    return partial_caption(a, keep), frozenset(keep | {"shape"})


# ---------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------


def _check_attributes(a: Attributes) -> None:
    for name, allowed in (
        ("shape", SHAPES),
        ("color", {**COLORS, **NEW_COLORS}),
        ("background", BACKGROUNDS),
        ("size", SIZES),
        ("position", POSITIONS),
    ):
        value = getattr(a, name)
        if value not in allowed:
            raise UserError(f"unknown {name} {value!r}; use one of: {', '.join(allowed)}")


def shape_box(a: Attributes, size: int, rng: random.Random | None = None) -> tuple[float, float, float]:
    """(centre x, centre y, side) of the shape's box in pixels, with jitter drawn from `rng` if given.

    The jitter draws happen in a fixed order (x, y, side) so that datasets are reproducible.
    """
    fx, fy = POSITIONS[a.position]
    side_fraction = SIZES[a.size]
    if rng is not None:
        fx += rng.uniform(-POSITION_JITTER, POSITION_JITTER)
        fy += rng.uniform(-POSITION_JITTER, POSITION_JITTER)
        side_fraction *= rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER)
    return fx * size, fy * size, side_fraction * size


def shape_color(a: Attributes, rng: random.Random | None = None) -> tuple[int, int, int]:
    """The palette colour of `a`, with per-channel jitter drawn from `rng` if given."""
    base = COLORS[a.color] if a.color in COLORS else NEW_COLORS[a.color]
    if rng is None:
        return base
    r, g, b = (min(255, max(0, c + rng.randint(-COLOR_JITTER, COLOR_JITTER))) for c in base)
    return r, g, b


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, side: float, fill: tuple[int, int, int]) -> None:
    """Draw one filled shape whose box is centred at (cx, cy) with the given side (canvas pixels)."""
    x0, y0, x1, y1 = cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2
    # PIL's rectangle/ellipse boxes are inclusive of the last pixel; a pixel belongs to the box when its
    # centre lies inside [x0, x1), hence round(x1) - 1.
    box = (round(x0), round(y0), round(x1) - 1, round(y1) - 1)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # pragma: no cover - guarded by _check_attributes
        raise AssertionError(shape)


def render(a: Attributes, size: int = 32, rng: random.Random | None = None) -> Image.Image:
    """Render `a` as a `size` x `size` RGB image; `rng` None means no jitter (the exact spec picture)."""
    _check_attributes(a)
    if size < MIN_IMAGE_SIZE:
        raise UserError(f"image size {size} is too small; use at least {MIN_IMAGE_SIZE} pixels")
    cx, cy, side = shape_box(a, size, rng)
    fill = shape_color(a, rng)
    big = size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), BACKGROUNDS[a.background])
    _draw_shape(ImageDraw.Draw(canvas), a.shape, cx * SUPERSAMPLE, cy * SUPERSAMPLE, side * SUPERSAMPLE, fill)
    # An exact integer box-filter downsample: pure regions keep their exact colour, edges get coverage blends.
    return canvas.resize((size, size), Image.Resampling.BOX)


# ---------------------------------------------------------------------------------------------------------
# Dataset writing
# ---------------------------------------------------------------------------------------------------------


def _combination_stream(combos: list[Attributes], num_images: int, rng: random.Random) -> list[Attributes]:
    """`num_images` combinations, each pass a fresh shuffle, so every combination appears equally often."""
    out: list[Attributes] = []
    while len(out) < num_images:
        epoch = list(combos)
        rng.shuffle(epoch)
        out.extend(epoch)
    return out[:num_images]


def _metadata_line(file_name: str, caption: str, a: Attributes) -> str:
    record = {
        "file_name": file_name,
        "text": caption,
        "shape": a.shape,
        "color": a.color,
        "background": a.background,
        "size": a.size,
        "position": a.position,
    }
    return json.dumps(record, ensure_ascii=False)


def _fill_directory(directory: Path, num_images: int, seed: int, size: int, split: str,
                    combinations: list[Attributes] | None = None) -> None:
    """Write the images and metadata.jsonl into an (empty) directory."""
    rng = random.Random(seed)
    combos = _combination_stream(combinations or split_combinations(split), num_images, rng)
    width = max(5, len(str(num_images - 1)))
    lines: list[str] = []
    for index, a in enumerate(combos):
        file_name = f"{index:0{width}d}.png"
        render(a, size, rng).save(directory / file_name, format="PNG")
        lines.append(_metadata_line(file_name, sample_caption(a, rng), a))
    (directory / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _check_write_arguments(out_dir: Path, num_images: int, size: int, split: str, overwrite: bool) -> None:
    if num_images < 1:
        raise UserError(f"--num-images must be at least 1, got {num_images}")
    if size < MIN_IMAGE_SIZE:
        raise UserError(f"--size must be at least {MIN_IMAGE_SIZE} pixels, got {size}")
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use one of: {', '.join(SPLITS)}")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output path {out_dir} exists and is not a directory; choose another path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"output directory {out_dir} is not empty; pass --overwrite to replace it or choose another path")


def write_dataset(
    out_dir: str | os.PathLike[str],
    num_images: int,
    seed: int = 0,
    size: int = 32,
    split: str = "train",
    overwrite: bool = False,
    combinations: list[Attributes] | None = None,
) -> Path:
    """Write `num_images` captioned images of `split` ("train", "heldout" or "all") to `out_dir`.

    `combinations`, if given, replaces the split's (e.g. `new_color_combinations("pink", "train")` plus known ones).
    The files are written into a temporary sibling directory that `ldm.files.replace_directory` fsyncs and renames
    into place at the end, so an interrupted run (or a power cut) never leaves a half-written dataset at `out_dir`.
    Returns the output path.
    """
    out = Path(out_dir).expanduser().absolute()
    _check_write_arguments(out, num_images, size, split, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out)
    tmp.mkdir()
    try:
        _fill_directory(tmp, num_images, seed, size, split, combinations)
        replace_directory(tmp, out)
    except BaseException:
        remove_tree(tmp)
        raise
    return out


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineArgumentParser(
        prog="ldm-shapes",
        description="Write a synthetic shapes dataset (imagefolder layout: PNGs + metadata.jsonl).",
    )
    parser.add_argument("out_dir", help="output directory (must be absent or empty unless --overwrite)")
    parser.add_argument("--num-images", type=int, required=True, help="number of images to write")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed gives identical files")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    parser.add_argument("--split", choices=SPLITS, default="train", help="attribute combinations to draw from")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    """Console script `ldm-shapes`: write a dataset and print its path."""
    args = _parse_args(argv)
    out = write_dataset(args.out_dir, args.num_images, args.seed, args.size, args.split, args.overwrite)
    print(out)


if __name__ == "__main__":
    main()
