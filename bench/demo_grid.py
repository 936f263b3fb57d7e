"""The picture of the bundled demo model (docs/demo.md): a few prompts x seeds, cfg 7.5, 25 steps, scaled up for
display.

    python bench/demo_grid.py                 # -> bench/demo-samples.png (rows: prompts; columns: seeds 0..N-1)

The first row is the README's first command; rows marked * are combinations held out of training.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

from ldm.demo import MODEL_DIR
from ldm.demo.shapes import canonical_caption, heldout_combinations
from ldm.pipeline import Pipeline

PROMPTS = [
    "a large red circle in the center on a black background",
    "a small blue triangle in the top left on a white background",
    "a large yellow square in the bottom right on a gray background",
    "a green circle on a white background",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "demo-samples.png")
    parser.add_argument("--model", type=Path, default=MODEL_DIR, help="a diffusers model directory (default: the demo)")
    parser.add_argument("--negative", default="", help="negative prompt (the demo knows only shapes words)")
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--scale", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    pipe = Pipeline.from_pretrained(args.model, device="cpu")
    prompts = PROMPTS + [canonical_caption(a) for a in heldout_combinations()[:2]]
    rows = [pipe(p, args.negative, cfg=7.5, steps=25, seed=0, num_images=args.seeds, batch_size=args.seeds,
                 show_progress=False).images for p in prompts]
    side = rows[0][0].width * args.scale
    grid = Image.new("RGB", (side * args.seeds, side * len(rows)), (255, 255, 255))
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            grid.paste(image.resize((side, side), Image.Resampling.NEAREST), (c * side, r * side))
    grid.save(args.out, optimize=True)
    for r, p in enumerate(prompts):
        print(f"row {r + 1}: {p}{' *' if r >= len(PROMPTS) else ''}")
    print(args.out)


if __name__ == "__main__":
    main()
