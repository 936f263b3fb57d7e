"""A shapes dataset that teaches a colour the demo model never saw (`NEW_COLORS`, e.g. pink), for the LoRA demo.

    python -m ldm.demo.new_color OUT_DIR --color pink --num-images 4000 --share 0.5 [--seed 0]

Each image is, with probability `share`, one of the colour's 81 training combinations (its 9 held-out ones, chosen
by the spec's rule, are never drawn), and otherwise one of the 567 ordinary training combinations: the known colours
stay in the data so that learning the new one does not overwrite them. Same layout, captions and jitter as
`ldm.demo.shapes` (imagefolder + metadata.jsonl); the same arguments give byte-identical files.
"""

from __future__ import annotations

import random
from pathlib import Path

from ldm.demo.shapes import NEW_COLORS, new_color_combinations, train_combinations, write_dataset
from ldm.errors import OneLineArgumentParser, UserError, exit_on_user_error


def new_color_mix(color: str, num_images: int, share: float, seed: int = 0) -> list:
    """`num_images` combinations: each of the new colour with probability `share`, else a known training one."""
    if not 0 < share <= 1:
        raise UserError(f"--share must be in (0, 1], got {share}")
    rng = random.Random(seed)
    new, known = new_color_combinations(color, "train"), train_combinations()
    return [rng.choice(new) if rng.random() < share else rng.choice(known) for _ in range(num_images)]


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = OneLineArgumentParser(prog="python -m ldm.demo.new_color", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--color", default="pink", choices=list(NEW_COLORS))
    parser.add_argument("--num-images", type=int, default=4000)
    parser.add_argument("--share", type=float, default=0.5, help="share of images in the new colour (default 0.5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if args.num_images < 1:
        raise UserError(f"--num-images must be at least 1, got {args.num_images}")
    combos = new_color_mix(args.color, args.num_images, args.share, args.seed)
    # the stream is already drawn image by image; write_dataset's per-pass shuffle only reorders it
    print(write_dataset(Path(args.out_dir), len(combos), seed=args.seed, size=args.size, overwrite=args.overwrite,
                        combinations=combos))


if __name__ == "__main__":
    main()
