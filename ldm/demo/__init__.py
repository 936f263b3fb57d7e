"""The bundled default model: the 32-px shapes demo, trained by this package on its own synthetic data.

One filled circle, square or triangle on a plain background (`ldm.data.shapes`), drawn from captions like
"a large red circle in the center on a black background". It exists so that `ldm-generate` works right after
`pip install` on a machine that cannot download weights; it is a toy, not a general text-to-image model.
How it was trained and how well it follows prompts: README.md, "The demo model".
"""

from __future__ import annotations

from pathlib import Path

NAME = "shapes-32px-demo"  # what `--model` accepts for it, and what PNG metadata records (a path would not travel)
MODEL_DIR = Path(__file__).parent / "shapes-32px"  # diffusers layout: loads in StableDiffusionPipeline too
NOTICE = (
    "using the bundled 32-px shapes demo model (one shape on a plain background, e.g. \"a large red circle in the "
    "center on a black background\"); pass --model DIR for a real Stable Diffusion model"
)
