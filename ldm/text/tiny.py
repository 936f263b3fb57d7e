"""Tiny randomly initialised text encoders, for tests and the small demo model; they use the real CLIP tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.errors import OneLineArgumentParser, UserError, exit_on_user_error
from ldm.files import atomic_directory
from ldm.text.encoder import CLIPTextEncoder, Layer
from ldm.text.tokenizer import CONTEXT_LENGTH, VOCAB_SIZE, offline_clip_tokenizer

BOS_ID, EOS_ID = VOCAB_SIZE - 2, VOCAB_SIZE - 1  # 49406, 49407


def tiny_clip_text_config(
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 2,
    vocab_size: int = VOCAB_SIZE,
    max_position_embeddings: int = CONTEXT_LENGTH,
) -> CLIPTextConfig:
    """A small CLIPTextConfig. The vocabulary stays 49408 so that the real tokenizer's ids are valid."""
    return CLIPTextConfig(
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        projection_dim=hidden_size,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,  # SD 1.x pads with the end token
    )


def tiny_clip_text_model(seed: int = 0, **config: Any) -> CLIPTextModel:
    """A random CLIPTextModel from `tiny_clip_text_config(**config)`; the same seed gives the same weights."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's random stream untouched
        torch.manual_seed(seed)
        return CLIPTextModel(tiny_clip_text_config(**config)).eval()


def tiny_clip_text_encoder(layer: Layer = "last", seed: int = 0, **config: Any) -> CLIPTextEncoder:
    """A tiny frozen CLIP text encoder with the offline tokenizer: (B, 77, hidden_size) outputs."""
    return CLIPTextEncoder(offline_clip_tokenizer(), tiny_clip_text_model(seed, **config), layer)


def tiny_open_clip_model_cfg(width: int = 32, layers: int = 2, heads: int = 2) -> dict[str, Any]:
    """An open_clip `model_cfg` (write it as {"model_cfg": ...} to open_clip_config.json for 'local-dir:')."""
    return {
        "embed_dim": width,
        # the smallest image tower open_clip builds; it is dropped when wrapped as a text encoder
        "vision_cfg": {"image_size": 32, "patch_size": 16, "layers": 1, "width": 32, "head_width": 16},
        "text_cfg": {
            "context_length": CONTEXT_LENGTH,
            "vocab_size": VOCAB_SIZE,
            "width": width,
            "heads": heads,
            "layers": layers,
        },
    }


def tiny_open_clip_model(seed: int = 0, **cfg: Any) -> nn.Module:
    """A randomly initialised open_clip CLIP model from `tiny_open_clip_model_cfg(**cfg)`."""
    from open_clip.model import CLIP  # lazy: importing open_clip takes seconds

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIP(**tiny_open_clip_model_cfg(**cfg)).eval()


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    """`ldm-tiny-text-encoder OUT_DIR`: save a random small CLIP text encoder + the offline tokenizer (no download).

    For offline experiments and the shapes demo: a frozen random text transformer still gives every prompt a
    distinct, deterministic embedding the U-Net can learn to read. Use a real CLIP for real data.
    """
    parser = OneLineArgumentParser(prog="ldm-tiny-text-encoder", description=main.__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.hidden_size < 8 or args.hidden_size % args.heads:
        raise UserError(f"--hidden-size {args.hidden_size} must be >= 8 and divisible by --heads {args.heads}")
    if args.out_dir.exists() and any(args.out_dir.iterdir()):
        raise UserError(f"'{args.out_dir}' is not empty: choose a new directory")
    encoder = tiny_clip_text_encoder(seed=args.seed, hidden_size=args.hidden_size, layers=args.layers, heads=args.heads)
    with atomic_directory(args.out_dir) as tmp:
        encoder.model.save_pretrained(tmp, safe_serialization=True)
        encoder.tokenizer.save_pretrained(tmp)
    print(args.out_dir)
