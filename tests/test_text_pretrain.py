"""Contrastive pre-training of the demo's text encoder (ldm/demo/text_tower.py, train/train_text_encoder.py)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers.models.clip.modeling_clip import image_text_contrastive_loss

from ldm.demo.shapes import (
    ALL_ATTRIBUTES,
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SIZES,
    Attributes,
    sample_caption,
    sample_caption_and_mentions,
    train_combinations,
)
from ldm.text.config import TextEncoderConfig
from ldm.demo.text_tower import (
    PretrainConfig,
    build_clip,
    describes,
    make_pairs,
    multi_positive_clip_loss,
)
from ldm.text.load_encoder import load_text_encoder

SCRIPT = Path(__file__).parents[1] / "train" / "train_text_encoder.py"
VALUES = {"color": COLORS, "background": BACKGROUNDS, "size": SIZES, "position": POSITIONS}


def test_mentions_are_the_attributes_the_caption_states():
    """sample_caption is unchanged (same random stream), and the mentions name exactly the words that appear."""
    combos = train_combinations()
    rng_a, rng_b = random.Random(7), random.Random(7)
    partial = 0
    for i in range(600):
        a = combos[i % len(combos)]
        caption, mentions = sample_caption_and_mentions(a, rng_b)
        assert sample_caption(a, rng_a) == caption
        assert "shape" in mentions and mentions <= ALL_ATTRIBUTES
        partial += mentions != ALL_ATTRIBUTES
        for name, values in VALUES.items():
            said = [v for v in values if v in caption.replace(" background", "")] if name != "background" else [
                v for v in values if f"{v} background" in caption or f"on {v}" in caption
            ]
            assert (getattr(a, name) in said) == (name in mentions), (caption, name, sorted(mentions))
    assert 150 < partial < 250  # about a third of the captions leave something out


def test_describes_counts_every_image_a_partial_caption_fits():
    red_circle = Attributes("circle", "red", "black", "large", "center")
    red_circle_on_white = Attributes("circle", "red", "white", "small", "top left")
    blue_circle = Attributes("circle", "blue", "black", "large", "center")
    red_square = Attributes("square", "red", "black", "large", "center")
    images = [red_circle, red_circle_on_white, blue_circle, red_square]
    full = ALL_ATTRIBUTES
    mentions = [frozenset({"shape", "color"}), full, full, frozenset({"shape"})]
    got = describes(images, mentions)
    expected = torch.tensor([
        [True, True, False, False],  # "a red circle" fits both red circles
        [False, True, False, False],  # a full caption fits only its own combination
        [False, False, True, False],
        [False, False, False, True],  # "a square": the only square
    ])
    assert torch.equal(got, expected)


def test_loss_is_clips_with_one_positive_and_rewards_spreading_over_positives():
    torch.manual_seed(0)
    logits = torch.randn(6, 6) * 3
    assert torch.allclose(multi_positive_clip_loss(logits, torch.eye(6, dtype=torch.bool)), image_text_contrastive_loss(logits))
    positives = torch.eye(4, dtype=torch.bool)
    positives[0, 1] = positives[1, 0] = True  # captions 0 and 1 both fit images 0 and 1
    confident_wrong = torch.eye(4) * 10  # all mass on the own image: the other true image counts as a miss
    spread = confident_wrong.clone()
    spread[0, 1] = spread[1, 0] = 10
    assert multi_positive_clip_loss(spread, positives) < multi_positive_clip_loss(confident_wrong, positives) - 0.5


def test_pairs_are_fresh_training_pairs():
    combos = train_combinations()[:5]
    batch = make_pairs(combos, 16, 16, random.Random(0))
    assert batch.pixels.shape == (16, 3, 16, 16) and batch.pixels.min() >= -1 and batch.pixels.max() <= 1
    assert batch.positives.diagonal().all() and len(batch.captions) == 16
    again = make_pairs(combos, 16, 16, random.Random(0))
    assert again.captions == batch.captions and torch.equal(again.pixels, batch.pixels)


def test_text_tower_has_the_u_nets_width():
    clip = build_clip(PretrainConfig())
    assert clip.config.text_config.hidden_size == 32 and clip.config.text_config.vocab_size == 49408


@pytest.mark.slow
def test_script_writes_a_loadable_text_encoder(tmp_path):
    out = tmp_path / "te"
    cmd = [
        sys.executable, str(SCRIPT), f"output_dir={out}", "steps=4", "batch_size=8", "warmup_steps=1", "log_every=2",
        "image.hidden_size=16", "image.layers=1",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "held-out retrieval top-1" in result.stderr
    summary = json.loads((out / "pretrain.json").read_text())
    assert set(summary["heldout_retrieval"]) == {"top1", *ALL_ATTRIBUTES} and summary["heldout_combinations"] == 63
    encoder = load_text_encoder(TextEncoderConfig(path=str(out)))
    states = encoder.encode(["a red circle", "a blue circle"])
    assert states.shape == (2, 77, 32) and torch.isfinite(states).all()
    assert not torch.equal(states[0], states[1])

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # never overwrites a finished encoder
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1].startswith("error: output_dir")
    assert "Traceback" not in again.stderr
    bad = subprocess.run([*cmd[:2], f"output_dir={tmp_path / 'x'}", "batch_size=1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "batch_size" in bad.stderr and not (tmp_path / "x").exists()


def test_an_image_tower_learns_against_a_frozen_saved_text_encoder_and_loads_back_with_it(tmp_path):
    """text.init_from: the bundled text encoder, frozen; the image side saved alone and paired with it again."""
    from ldm.demo import MODEL_DIR
    from ldm.demo.image_tower import image_tower_state, load_demo_clip, save_image_tower
    from ldm.errors import UserError
    from transformers import CLIPTextModel

    cfg = PretrainConfig()
    cfg.text.init_from = str(MODEL_DIR / "text_encoder")
    cfg.image.hidden_size, cfg.image.layers = 16, 1
    clip = build_clip(cfg)
    saved = CLIPTextModel.from_pretrained(MODEL_DIR / "text_encoder").state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in clip.text_model.state_dict().items())
    assert not any(p.requires_grad for p in clip.text_model.parameters())
    assert all(p.requires_grad for p in clip.vision_model.parameters()) and clip.text_projection.weight.requires_grad
    assert not any(k.startswith("text_model.") for k in image_tower_state(clip))
    save_image_tower(clip, tmp_path / "tower")
    again = load_demo_clip(tmp_path / "tower")
    assert all(torch.equal(v, clip.state_dict()[k]) for k, v in again.state_dict().items())
    (tmp_path / "tower" / "config.json").unlink()
    with pytest.raises(UserError, match="has no config.json"):
        load_demo_clip(tmp_path / "tower")
    cfg.text.init_from = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match="text.init_from"):
        cfg.validate()
