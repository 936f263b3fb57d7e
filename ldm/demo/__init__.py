"""The shapes demo, all in one place: its synthetic data (`shapes`, `new_color`), its text tower's pretraining
(`text_tower`), its judges (`reader`, `prompts`, `adherence`, `vae_check`; run by `ldm-eval`), and the bundled
default model they made (`shapes-32px/`, and the pink LoRA demo's files in `pink/`).

One filled circle, square or triangle on a plain background (`ldm.demo.shapes`), drawn from captions like
"a large red circle in the center on a black background". It exists so that `ldm-generate` works right after
`pip install` on a machine that cannot download weights; it is a toy, not a general text-to-image model.
How it was trained and how well it follows prompts: docs/demo.md.
"""

from __future__ import annotations

from pathlib import Path

NAME = "shapes-32px-demo"  # what `--model` accepts for it, and what PNG metadata records (a path would not travel)
MODEL_DIR = Path(__file__).parent / "shapes-32px"  # diffusers layout: loads in StableDiffusionPipeline too
NOTICE = (
    "using the bundled 32-px shapes demo model (one shape on a plain background, e.g. \"a large red circle in the "
    "center on a black background\"); pass --model DIR for a real Stable Diffusion model"
)
