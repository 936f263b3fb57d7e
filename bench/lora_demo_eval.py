"""The LoRA demo's measurement in one process: `ldm-eval`'s prompt-adherence rows at the guidance scale (held-out and
training combinations of the seven known colours, and the new colour's held-out and training ones), for one model.

    python bench/lora_demo_eval.py --model runs/demo/lora-pink/model [--new-color pink] [--seeds 2] [--json PATH]

The same prompts, seeds, sampler and reader (with the new colour in its palette) as `ldm-eval --new-color pink
--seeds 2`, without its cfg-1.0, negative-prompt, img2img and inpainting sections (which a colour adapter does not
target), so the rows compare one to one with a full `ldm-eval` run of the base model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from ldm.demo.adherence import Settings, prompt_adherence
from ldm.demo.prompts import prompt_sets, spread
from ldm.demo.reader import ATTRIBUTE_NAMES
from ldm.demo.shapes import new_color_combinations
from ldm.eval.report import _accuracy_row, _table
from ldm.pipeline.pipeline import Pipeline


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--new-color", default="pink")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=7.5)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    pipe = Pipeline.from_pretrained(args.model, device="cpu")
    s = Settings(steps=args.steps, cfg=args.cfg, seeds=args.seeds, size=pipe.default_size, progress=True,
                 new_colors=(args.new_color,))
    sets = prompt_sets()
    rows, start = [], time.perf_counter()
    for name, combos in (("heldout", sets.heldout), ("train", sets.train),
                         (f"{args.new_color} heldout", new_color_combinations(args.new_color, "heldout")),
                         (f"{args.new_color} train", spread(new_color_combinations(args.new_color, "train"), 27))):
        rows.append({"set": name, **prompt_adherence(pipe, combos, s, s.cfg, desc=name)})
    print(f"Model `{args.model}`, {s.steps} steps, {s.seeds} seeds per prompt, reader palette + {args.new_color}; "
          f"{time.perf_counter() - start:.0f} s\n")
    print("\n".join(_table(["check", "images", *ATTRIBUTE_NAMES, "all five"],
                           [_accuracy_row(f"{r['set']} prompts @ cfg {r['cfg']:g}", r) for r in rows])))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
