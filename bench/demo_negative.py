"""Does a negative prompt of words the demo never saw change the README's first image? (issue 28)

    python bench/demo_negative.py [--model DIR] [--seeds 6]

Generates the README's first command ("a large red circle in the center on a black background", cfg 7.5, the CLI's
defaults: 25 steps, euler_a) for seeds 1..N with no negative prompt and with each negative of `NEGATIVES` (words
that no demo caption uses), and prints, per setting, the mean RGB of the centre (`CENTER`: the middle 8x8 pixels of
the 32x32 image, inside the large circle), its hue, and the distance from the no-negative colour. A neutral
negative prompt leaves the colour where it is.
"""

from __future__ import annotations

import argparse
import colorsys
from pathlib import Path

import numpy as np
import torch

from ldm.demo import MODEL_DIR
from ldm.demo.shapes import all_combinations, canonical_caption
from ldm.pipeline import Pipeline

PROMPT = "a large red circle in the center on a black background"  # the README's first command, with cfg 7.5
NEGATIVES = ["", "blurry", "ugly, lowres", "bad anatomy", "worst quality, jpeg artifacts", "watermark, text",
             "deformed, extra fingers"]
CENTER = (slice(12, 20), slice(12, 20))  # rows, columns of the 32x32 image
SETTINGS = dict(cfg=7.5, steps=25, sampler="euler_a")


def unseen(words: str) -> bool:
    """True if no word of `words` appears in any demo caption (full or partial captions use the same words)."""
    vocab = {w for a in all_combinations() for w in canonical_caption(a).split()}
    return not any(w in vocab for w in words.replace(",", " ").split())


def centre_colours(pipe: Pipeline, negative: str, seeds: list[int], prompt: str = PROMPT) -> np.ndarray:
    """(len(seeds), 3) mean RGB (0-255) of the centre of each seed's image."""
    out = []
    for seed in seeds:
        image = pipe(prompt, negative, seed=seed, show_progress=False, **SETTINGS).images[0]
        out.append(np.asarray(image, dtype=np.float64)[CENTER].reshape(-1, 3).mean(axis=0))
    return np.stack(out)


def hue(rgb: np.ndarray) -> float:
    """Hue of a mean RGB (0-255) in degrees, 0-360."""
    return 360.0 * colorsys.rgb_to_hsv(*(np.asarray(rgb) / 255.0))[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=MODEL_DIR, help="a diffusers model directory (default: the demo)")
    parser.add_argument("--seeds", type=int, default=6, help="seeds 1..N (the issue's: 1-6)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny kernels: on shared cores, two threads spin-wait on each other
    assert all(unseen(n) for n in NEGATIVES), "a negative of NEGATIVES uses a demo word"
    pipe = Pipeline.from_pretrained(args.model, device="cpu")
    seeds = list(range(1, args.seeds + 1))
    print(f"{args.model}: '{PROMPT}', cfg 7.5, 25 steps, euler_a, seeds {seeds[0]}-{seeds[-1]}, centre 8x8 mean\n")
    print("| negative prompt | mean RGB | hue | distance from no negative (RGB) | worst seed |")
    print("|---|---|---|---|---|")
    base = None
    for negative in NEGATIVES:
        colours = centre_colours(pipe, negative, seeds)  # (S, 3)
        mean = colours.mean(axis=0)
        if base is None:
            base_per_seed, base = colours, mean
        shift = float(np.linalg.norm(mean - base))
        worst = float(np.linalg.norm(colours - base_per_seed, axis=1).max())
        rgb = ", ".join(f"{c:.0f}" for c in mean)
        print(f"| \"{negative}\" | ({rgb}) | {hue(mean):.0f} deg | {shift:.1f} | {worst:.1f} |", flush=True)


if __name__ == "__main__":
    main()
