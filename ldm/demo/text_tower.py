"""Contrastive pre-training of a small CLIP text tower on the shapes domain (for the bundled demo model).

A frozen *random* text transformer gives every prompt a distinct embedding, but the words a picture depends on most
(colour, background) move its states by only a fraction of their norm, and a U-Net trained on it learned to ignore
them (docs/demo.md). Training the text tower CLIP-style against a small image tower first makes exactly
those words stand apart; the U-Net is then trained on the frozen result, as with any pretrained CLIP.

Pairs are made on the fly from the *training* combinations only (fresh jitter and caption each time), so the held-out
combinations stay unseen by both stages. The loss is CLIP's symmetric cross-entropy with one change: a caption that
leaves out attributes (a third of them do) truly describes every image in the batch that matches what it does say, so
the target is spread evenly over all such images instead of pushing the matching ones away as negatives.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPVisionConfig

from ldm.config import check
from ldm.demo.shapes import (
    ALL_ATTRIBUTES,
    MIN_IMAGE_SIZE,
    Attributes,
    canonical_caption,
    render,
    sample_caption_and_mentions,
)
from ldm.errors import UserError
from ldm.pixels import pil_to_tensor
from ldm.text.tiny import tiny_clip_text_config


@dataclass
class TextTowerConfig:
    hidden_size: int = 32  # also the U-Net's cross_attention_dim
    layers: int = 2
    heads: int = 2
    # a saved CLIPTextModel directory (e.g. ldm/demo/shapes-32px/text_encoder): the text tower starts from it and
    # stays frozen, and only the image tower and both projections learn: an image tower that shares an existing text
    # encoder's space (ldm/demo/image_tower.py, the features of `ldm-eval --features demo`). "": trained from scratch
    init_from: str = ""


@dataclass
class ImageTowerConfig:
    # a small ViT (transformers CLIPVisionModel); patches keep position information, which the captions name
    hidden_size: int = 64
    layers: int = 2
    heads: int = 2
    patch_size: int = 4


@dataclass
class PretrainConfig:
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    projection_dim: int = 64
    resolution: int = 32
    steps: int = 2000
    batch_size: int = 256
    lr: float = 1.0e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    seed: int = 0
    log_every: int = 100
    output_dir: str = "runs/demo/text-encoder"

    def validate(self) -> None:
        check(not self.text.init_from or Path(self.text.init_from).is_dir(), "text.init_from",
              f"'{self.text.init_from}' is not a directory (a saved CLIPTextModel)")
        check(self.text.hidden_size % self.text.heads == 0, "text.hidden_size", "must be divisible by text.heads")
        check(self.image.hidden_size % self.image.heads == 0, "image.hidden_size", "must be divisible by image.heads")
        check(self.resolution >= MIN_IMAGE_SIZE, "resolution", f"must be >= {MIN_IMAGE_SIZE}")
        check(
            self.resolution % self.image.patch_size == 0,
            "image.patch_size",
            f"{self.image.patch_size} does not divide resolution {self.resolution}",
        )
        check(self.steps >= 1, "steps", "must be >= 1")
        check(self.batch_size >= 2, "batch_size", "must be >= 2 (a contrastive batch needs negatives)")
        check(self.lr > 0, "lr", "must be > 0")
        check(0 <= self.warmup_steps < self.steps, "warmup_steps", "must be >= 0 and below steps")
        check(self.log_every >= 1, "log_every", "must be >= 1")
        check(bool(self.output_dir), "output_dir", "is empty: name a directory for the text encoder")


def build_clip(cfg: PretrainConfig) -> CLIPModel:
    """A CLIPModel whose text tower is `tiny_clip_text_config(...)` (the real tokenizer's vocabulary) and a small ViT."""
    text = tiny_clip_text_config(hidden_size=cfg.text.hidden_size, layers=cfg.text.layers, heads=cfg.text.heads)
    vision = CLIPVisionConfig(
        hidden_size=cfg.image.hidden_size,
        intermediate_size=4 * cfg.image.hidden_size,
        num_hidden_layers=cfg.image.layers,
        num_attention_heads=cfg.image.heads,
        image_size=cfg.resolution,
        patch_size=cfg.image.patch_size,
    )
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.projection_dim))
    if cfg.text.init_from:
        saved = CLIPTextModel.from_pretrained(cfg.text.init_from)
        if saved.config.hidden_size != text.hidden_size or saved.config.num_hidden_layers != text.num_hidden_layers:
            raise UserError(f"text.init_from '{cfg.text.init_from}': a text tower of width {saved.config.hidden_size} "
                            f"and {saved.config.num_hidden_layers} layers, but the config says {text.hidden_size} and "
                            f"{text.num_hidden_layers}: set text.hidden_size and text.layers to match")
        clip.text_model.load_state_dict(saved.state_dict())
        clip.text_model.requires_grad_(False)
    return clip


def text_encoder_from(clip: CLIPModel) -> CLIPTextModel:
    """The text tower as a standalone CLIPTextModel (what the U-Net is conditioned on); the projection is dropped."""
    text = CLIPTextModel(clip.config.text_config)
    text.load_state_dict(clip.text_model.state_dict())
    return text.eval()


@dataclass
class PairBatch:
    captions: list[str]
    pixels: torch.Tensor  # (B, 3, H, W) in [-1, 1]
    positives: torch.Tensor  # (B captions, B images) bool: caption i truly describes image j


def make_pairs(combos: list[Attributes], batch_size: int, resolution: int, rng: random.Random) -> PairBatch:
    """`batch_size` fresh (image, caption) pairs of random combinations from `combos`."""
    chosen = [rng.choice(combos) for _ in range(batch_size)]
    pixels = torch.cat([pil_to_tensor(render(a, resolution, rng)) for a in chosen])
    said = [sample_caption_and_mentions(a, rng) for a in chosen]
    return PairBatch([caption for caption, _ in said], pixels, describes(chosen, [m for _, m in said]))


def describes(attributes: list[Attributes], mentions: list[frozenset[str]]) -> torch.Tensor:
    """(B, B) bool: caption i (stating `mentions[i]` of `attributes[i]`) is true of image j (`attributes[j]`)."""
    n = len(attributes)
    out = torch.ones(n, n, dtype=torch.bool)
    for name in sorted(ALL_ATTRIBUTES):
        values = [getattr(a, name) for a in attributes]
        ids = torch.tensor([sorted(set(values)).index(v) for v in values])
        same = ids[:, None] == ids[None, :]
        stated = torch.tensor([name in m for m in mentions])[:, None]
        out &= same | ~stated
    return out


def multi_positive_clip_loss(logits_per_text: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy against targets spread evenly over every true (caption, image) pair.

    With only the diagonal true this is CLIP's loss. `positives` must hold the diagonal (each caption describes the
    image it was written for), so no row or column is empty.
    """
    target = positives.float()
    text_to_image = -(target / target.sum(1, keepdim=True) * logits_per_text.log_softmax(1)).sum(1).mean()
    image_to_text = -(target.T / target.T.sum(1, keepdim=True) * logits_per_text.T.log_softmax(1)).sum(1).mean()
    return (text_to_image + image_to_text) / 2


@torch.no_grad()
def retrieval_accuracy(
    clip: CLIPModel, input_ids: torch.Tensor, pixels: torch.Tensor, attributes: list[Attributes]
) -> dict[str, float]:
    """Caption -> image retrieval among the given images: exact top-1, and how often the retrieved image has each
    attribute the caption asked for (all captions here are full ones)."""
    was_training = clip.training
    clip.eval()
    logits = clip(input_ids=input_ids, pixel_values=pixels).logits_per_text
    clip.train(was_training)
    best = logits.argmax(1).tolist()
    out = {"top1": float(np.mean([b == i for i, b in enumerate(best)]))}
    for name in sorted(ALL_ATTRIBUTES):
        out[name] = float(np.mean([getattr(attributes[b], name) == getattr(attributes[i], name) for i, b in enumerate(best)]))
    return out


def eval_pairs(combos: list[Attributes], resolution: int, seed: int) -> tuple[list[str], torch.Tensor]:
    """One rendered image and the canonical caption for each combination (fixed jitter from `seed`)."""
    rng = random.Random(seed)
    pixels = torch.cat([pil_to_tensor(render(a, resolution, rng)) for a in combos])
    return [canonical_caption(a) for a in combos], pixels
