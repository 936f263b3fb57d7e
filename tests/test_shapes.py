"""Tests for the shapes domain (ldm.demo.shapes) and the pixel-analysis attribute reader (ldm.demo.reader)."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from ldm.demo import shapes
from ldm.demo.shapes import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    Attributes,
    all_combinations,
    canonical_caption,
    heldout_combinations,
    main,
    render,
    sample_caption,
    train_combinations,
    write_dataset,
)
from ldm.errors import UserError
from ldm.eval import attribute_accuracy, read_attributes

ATTRIBUTE_VALUES = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "background": tuple(BACKGROUNDS),
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
}

# ---------------------------------------------------------------------------------------------------------
# Combinations and the held-out split
# ---------------------------------------------------------------------------------------------------------


def test_palette_matches_spec() -> None:
    assert SHAPES == ("circle", "square", "triangle")
    assert COLORS["red"] == (220, 40, 40) and COLORS["purple"] == (150, 60, 200) and len(COLORS) == 7
    assert BACKGROUNDS == {"black": (15, 15, 15), "white": (240, 240, 240), "gray": (128, 128, 128)}
    assert SIZES == {"small": 0.30, "large": 0.55}
    assert POSITIONS["center"] == (0.5, 0.5) and POSITIONS["bottom left"] == (0.27, 0.73) and len(POSITIONS) == 5


def test_combination_counts_and_disjoint_split() -> None:
    combos = all_combinations()
    heldout, train = heldout_combinations(), train_combinations()
    assert len(combos) == len(set(combos)) == 630
    assert len(heldout) == len(set(heldout)) == 63
    assert len(train) == 567
    assert set(heldout).isdisjoint(train)
    assert set(heldout) | set(train) == set(combos)
    assert all_combinations() == combos  # fixed order


def test_heldout_is_stable() -> None:
    heldout = set(heldout_combinations())
    for member in (
        Attributes("circle", "red", "black", "large", "top left"),
        Attributes("circle", "orange", "white", "small", "bottom left"),
        Attributes("square", "red", "white", "large", "top left"),
        Attributes("triangle", "purple", "gray", "large", "center"),
    ):
        assert member in heldout
    assert Attributes("circle", "red", "black", "small", "center") not in heldout
    captions = "\n".join(canonical_caption(a) for a in heldout_combinations())
    assert hashlib.sha256(captions.encode()).hexdigest() == (
        "9c0975aebf8d73c45c48dd562ad76bff524efb2b5a99d989657dc795446f45a9"
    )


def test_heldout_follows_documented_rule() -> None:
    """Re-derive the rule from the module docstring independently of the implementation."""
    expected = set()
    for shape, color, background in itertools.product(SHAPES, COLORS, BACKGROUNDS):
        options = [Attributes(shape, color, background, s, p) for s in SIZES for p in POSITIONS]
        expected.add(min(options, key=lambda a: hashlib.sha256(canonical_caption(a).encode("utf-8")).hexdigest()))
    assert set(heldout_combinations()) == expected


def test_every_attribute_value_and_triple_in_train() -> None:
    train = train_combinations()
    for name, values in ATTRIBUTE_VALUES.items():
        assert {getattr(a, name) for a in train} == set(values), name
    triples = Counter((a.shape, a.color, a.background) for a in train)
    assert len(triples) == 63 and set(triples.values()) == {9}


# ---------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------


def _foreground_mask(image: Image.Image, background: str) -> np.ndarray:
    pixels = np.asarray(image, dtype=np.int64)
    return np.abs(pixels - np.array(BACKGROUNDS[background])).sum(axis=-1) > 0


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("shape", SHAPES)
def test_render_colours_exact_without_jitter(size: int, shape: str) -> None:
    for background, position in itertools.product(BACKGROUNDS, ("center", "top left", "bottom right")):
        a = Attributes(shape, "cyan", background, "small", position)
        image = render(a, size)
        assert image.mode == "RGB" and image.size == (size, size)
        pixels = np.asarray(image)
        # The corner diagonally opposite the shape (and all corners for a centred shape) is pure background.
        far_corner = pixels[-1, -1] if position == "top left" else pixels[0, 0]
        assert tuple(far_corner) == BACKGROUNDS[background]
        fx, fy = POSITIONS[position]
        assert tuple(pixels[int(fy * size), int(fx * size)]) == COLORS["cyan"]


@pytest.mark.parametrize("size", [32, 64])
def test_render_triangle_apex_up(size: int) -> None:
    a = Attributes("triangle", "red", "black", "large", "center")
    mask = _foreground_mask(render(a, size), "black")
    x0, y0, x1, y1 = _bbox(mask)
    widths = mask[y0:y1].sum(axis=1)
    quarter = (y1 - y0) // 4
    assert widths[:quarter].mean() < 0.5 * widths[-quarter:].mean()
    assert widths[-1] >= 0.9 * (x1 - x0)  # base at the bottom of the box


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("size_name", ["small", "large"])
def test_render_size_fractions(size: int, size_name: str) -> None:
    for shape in SHAPES:
        mask = _foreground_mask(render(Attributes(shape, "blue", "white", size_name, "center"), size), "white")
        x0, y0, x1, y1 = _bbox(mask)
        expected = SIZES[size_name] * size
        assert abs((x1 - x0) - expected) <= 1.5, shape
        assert abs((y1 - y0) - expected) <= 1.5, shape
        assert abs((x0 + x1) / 2 - size / 2) <= 1.0 and abs((y0 + y1) / 2 - size / 2) <= 1.0


def test_render_jitter_varies_but_stays_in_spec() -> None:
    a = Attributes("square", "green", "gray", "small", "center")
    rng = random.Random(0)
    images = [np.asarray(render(a, 32, rng)) for _ in range(20)]
    assert len({im.tobytes() for im in images}) > 10
    for im in images:
        assert tuple(im[0, 0]) == BACKGROUNDS["gray"]  # the background is never jittered
        centre = im[16, 16].astype(int)
        assert np.abs(centre - np.array(COLORS["green"])).max() <= 10


def test_render_rejects_unknown_attribute() -> None:
    with pytest.raises(UserError):
        render(Attributes("hexagon", "red", "black", "small", "center"))


# ---------------------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------------------


def test_canonical_caption() -> None:
    assert canonical_caption(Attributes("circle", "red", "black", "small", "center")) == (
        "a small red circle in the center on a black background"
    )
    assert canonical_caption(Attributes("triangle", "orange", "gray", "large", "top left")) == (
        "a large orange triangle in the top left on a gray background"
    )


def _mentions(caption: str, a: Attributes) -> dict[str, bool]:
    return {
        "size": re.search(rf"\b{a.size}\b", caption) is not None,
        "color": re.search(rf"\b{a.color}\b", caption) is not None,
        "position": a.position in caption,
        "background": re.search(rf"\b{a.background}\b", caption) is not None,
    }


def test_sample_caption_mix() -> None:
    rng = random.Random(123)
    combos = all_combinations()
    n = 3000
    counts: Counter[str] = Counter()
    for i in range(n):
        a = combos[i % len(combos)]
        caption = sample_caption(a, rng)
        assert re.search(rf"\b{a.shape}\b", caption), caption  # the shape word is always there
        mentioned = _mentions(caption, a)
        if caption == canonical_caption(a):
            counts["canonical"] += 1
        elif all(mentioned.values()):
            counts["other full"] += 1
        else:
            counts["dropped"] += 1
    assert counts.most_common(1)[0][0] == "canonical"
    assert 0.28 < counts["dropped"] / n < 0.39
    assert counts["other full"] > 0


def test_sample_caption_drops_produce_readable_captions() -> None:
    a = Attributes("circle", "orange", "black", "small", "center")
    rng = random.Random(5)
    captions = {sample_caption(a, rng) for _ in range(400)}
    assert "an orange circle" in captions
    assert "a circle" in captions
    assert "an orange circle on a black background" in captions


# ---------------------------------------------------------------------------------------------------------
# Dataset writing and the command line
# ---------------------------------------------------------------------------------------------------------


def _read_metadata(directory: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in (directory / "metadata.jsonl").read_text().splitlines()]


def _tree_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_write_dataset_is_deterministic_and_well_formed(tmp_path: Path) -> None:
    first = write_dataset(tmp_path / "a", num_images=40, seed=7)
    second = write_dataset(tmp_path / "b", num_images=40, seed=7)
    other = write_dataset(tmp_path / "c", num_images=40, seed=8)
    assert first == tmp_path / "a"
    assert _tree_bytes(first) == _tree_bytes(second)
    assert _tree_bytes(first) != _tree_bytes(other)

    records = _read_metadata(first)
    assert len(records) == 40
    assert sorted(p.name for p in first.glob("*.png")) == [f"{i:05d}.png" for i in range(40)]
    for i, record in enumerate(records):
        assert set(record) == {"file_name", "text", *ATTRIBUTE_VALUES}
        assert record["file_name"] == f"{i:05d}.png"
        assert record["shape"] in record["text"]
        for name, values in ATTRIBUTE_VALUES.items():
            assert record[name] in values
        with Image.open(first / record["file_name"]) as image:
            assert image.mode == "RGB" and image.size == (32, 32)
    # No temporary directories are left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


def _combos_in(directory: Path) -> set[Attributes]:
    return {Attributes(**{k: r[k] for k in ATTRIBUTE_VALUES}) for r in _read_metadata(directory)}


def test_write_dataset_splits(tmp_path: Path) -> None:
    heldout = set(heldout_combinations())
    held = _combos_in(write_dataset(tmp_path / "held", num_images=126, split="heldout", size=16))
    assert held == heldout  # two full passes cover every held-out combination
    train = _combos_in(write_dataset(tmp_path / "train", num_images=600, split="train", size=16))
    assert train == set(train_combinations())
    assert not train & heldout


def test_write_dataset_refuses_non_empty_target(tmp_path: Path) -> None:
    target = tmp_path / "data"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="--overwrite"):
        write_dataset(target, num_images=3)
    assert (target / "keep.txt").read_text() == "precious"
    write_dataset(target, num_images=3, overwrite=True)
    assert not (target / "keep.txt").exists()
    assert len(_read_metadata(target)) == 3
    # An existing empty directory is fine without --overwrite.
    empty = tmp_path / "empty"
    empty.mkdir()
    write_dataset(empty, num_images=2)
    assert len(_read_metadata(empty)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "empty"]


def test_write_dataset_interrupted_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real_render = shapes.render

    def failing_render(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_render(*args, **kwargs)

    monkeypatch.setattr(shapes, "render", failing_render)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(tmp_path / "data", num_images=10)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs",
    [{"num_images": 0}, {"num_images": 5, "size": 4}, {"num_images": 5, "split": "test"}],
)
def test_write_dataset_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(UserError):
        write_dataset(tmp_path / "data", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    main([str(out), "--num-images", "6", "--seed", "3", "--size", "24", "--split", "heldout"])
    assert capsys.readouterr().out.strip() == str(out)
    records = _read_metadata(out)
    assert len(records) == 6
    assert _combos_in(out) <= set(heldout_combinations())
    with Image.open(out / "00000.png") as image:
        assert image.size == (24, 24)


@pytest.mark.parametrize(
    "argv",
    [
        [],  # missing OUT_DIR and --num-images
        ["out"],  # missing --num-images
        ["out", "--num-images", "ten"],
        ["out", "--num-images", "5", "--split", "test"],
        ["out", "--num-images", "0"],  # UserError -> exit 2
    ],
)
def test_cli_bad_arguments_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    assert excinfo.value.code == 2
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_non_empty_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "x").write_text("")
    with pytest.raises(SystemExit) as excinfo:
        main([str(tmp_path), "--num-images", "2"])
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------------------
# Attribute reader
# ---------------------------------------------------------------------------------------------------------


def _jittered_pairs(num_images: int, seed: int, size: int = 32):
    """(truth, image) pairs covering every combination (num_images >= 630), with spec jitter."""
    rng = random.Random(seed)
    combos = all_combinations()
    for i in range(num_images):
        a = combos[i % len(combos)]
        yield a, render(a, size, rng)


def _assert_accuracy(pairs: list[tuple[Attributes, Attributes]], threshold: float) -> None:
    accuracy = attribute_accuracy(pairs)
    for name in ATTRIBUTE_VALUES:
        assert accuracy[name] >= threshold, (name, accuracy)


def test_reader_exact_on_unjittered_images() -> None:
    for a in all_combinations():
        assert read_attributes(render(a, 32)) == a


def test_reader_accuracy_clean_jittered() -> None:
    pairs = [(a, read_attributes(image)) for a, image in _jittered_pairs(1000, seed=11)]
    _assert_accuracy(pairs, 0.99)


@pytest.mark.slow
def test_reader_accuracy_noise_and_blur() -> None:
    noise_rng = np.random.default_rng(0)
    noisy, blurred = [], []
    for a, image in _jittered_pairs(1000, seed=12):
        pixels = np.asarray(image, dtype=np.float64) / 255.0
        noisy_pixels = np.clip(pixels + noise_rng.normal(0.0, 5 / 255, pixels.shape), 0.0, 1.0)
        noisy.append((a, read_attributes(noisy_pixels)))  # float arrays in [0, 1] are accepted
        soft = np.asarray(image.filter(ImageFilter.GaussianBlur(0.6)), dtype=np.float64)
        soft = np.clip(soft + noise_rng.normal(0.0, 5, soft.shape), 0, 255).astype(np.uint8)
        blurred.append((a, read_attributes(soft)))
    _assert_accuracy(noisy, 0.97)
    _assert_accuracy(blurred, 0.97)


def test_reader_at_64_px() -> None:
    pairs = [(a, read_attributes(image)) for a, image in _jittered_pairs(630, seed=13, size=64)]
    _assert_accuracy(pairs, 0.99)


def test_reader_input_formats() -> None:
    a = Attributes("triangle", "yellow", "gray", "large", "bottom right")
    image = render(a, 32)
    pixels = np.asarray(image)
    assert read_attributes(pixels) == a
    assert read_attributes(np.moveaxis(pixels, -1, 0).astype(np.float32) / 255.0) == a  # CHW float
    assert read_attributes(image.convert("RGBA")) == a


@pytest.mark.parametrize("value", [0, 128, 255])
def test_reader_blank_image_gives_a_guess(value: int) -> None:
    guess = read_attributes(np.full((32, 32, 3), value, dtype=np.uint8))
    assert isinstance(guess, Attributes)
    for name, values in ATTRIBUTE_VALUES.items():
        assert getattr(guess, name) in values


def test_attribute_accuracy() -> None:
    a = Attributes("circle", "red", "black", "small", "center")
    b = Attributes("square", "red", "black", "small", "center")
    accuracy = attribute_accuracy([(a, a), (a, b)])
    assert accuracy == {"shape": 0.5, "color": 1.0, "background": 1.0, "size": 1.0, "position": 1.0, "all": 0.5}
    with pytest.raises(ValueError):
        attribute_accuracy([])
