"""Stage 2's inputs in miniature: a random tiny VAE, a random tiny CLIP text encoder and captioned shapes."""

from __future__ import annotations

from pathlib import Path

import torch

from ldm.demo.shapes import write_dataset
from ldm.text.tiny import tiny_clip_text_encoder
from ldm.vae.presets import build_vae


def write_tiny_stage2_inputs(root: str | Path, num_images: int, seed: int = 0) -> dict[str, Path]:
    """{"vae", "text", "data"} directories under `root`, for tests and soak runs of train_ldm.py (no training).

    The VAE is random, with a scaling factor of 0.5 in its config; the same seed gives the same files.
    """
    root = Path(root)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = build_vae("tiny", 32)
    vae.register_to_config(scaling_factor=0.5)
    vae.save_pretrained(root / "vae", safe_serialization=True)
    text = tiny_clip_text_encoder(seed=seed)
    text.model.save_pretrained(root / "text", safe_serialization=True)
    text.tokenizer.save_pretrained(root / "text")
    data = write_dataset(root / "shapes", num_images=num_images, seed=seed, size=32, overwrite=True)
    return {"vae": root / "vae", "text": root / "text", "data": data}
