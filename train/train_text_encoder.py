"""Pre-train a small CLIP text encoder contrastively on shapes image-caption pairs (for the demo model; minutes on a CPU).

    python train/train_text_encoder.py --config configs/text/shapes-demo.yaml [key=value ...]

Each step renders a fresh batch of training-split pairs and trains a text tower and a small ViT image tower with a
CLIP loss whose targets count every image a (possibly partial) caption truly describes (ldm/demo/text_tower.py).
`output_dir/` is written in one atomic step when training ends: the text tower as a transformers `CLIPTextModel` with
the offline CLIP tokenizer (what an LDM config's `text_encoder.path` takes), `image_tower/` (the image tower, both
projections and the temperature: `ldm.demo.image_tower`), `config.yaml`, and `pretrain.json` with caption -> image
retrieval accuracy on the held-out combinations, which neither tower has seen. With `text.init_from=DIR` the text
tower is that saved encoder, frozen, and only the image side learns (configs/text/shapes-demo-image-tower.yaml).
A run takes minutes, so there are no checkpoints: an interrupted run leaves nothing behind and is simply started
again.
"""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

import torch
from diffusers.optimization import get_cosine_schedule_with_warmup

from ldm.config import save_config
from ldm.demo.shapes import heldout_combinations, train_combinations
from ldm.errors import UserError, exit_on_user_error
from ldm.files import atomic_directory
from ldm.demo.image_tower import save_image_tower
from ldm.demo.text_tower import (
    PretrainConfig,
    build_clip,
    eval_pairs,
    make_pairs,
    multi_positive_clip_loss,
    retrieval_accuracy,
    text_encoder_from,
)
from ldm.text.tokenizer import CONTEXT_LENGTH, offline_clip_tokenizer, tokenize_prompts
from ldm.training.args import parse_train_args
from ldm.training.logs import setup_logging

log = logging.getLogger("train_text_encoder")
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps its learned temperature at 100 (Radford et al. 2021, section 2.5)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    cfg, resume = parse_train_args(PretrainConfig, argv, description=__doc__.splitlines()[0])
    if resume is not None:
        raise UserError("--resume: this script keeps no checkpoints (a run takes minutes); run it again without it")
    out = Path(cfg.output_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output_dir '{out}' is not empty: choose a new directory or remove it")
    setup_logging(is_main_process=True, rank=0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    clip = build_clip(cfg).to(device).train()
    tokenizer = offline_clip_tokenizer()
    trainable = [p for p in clip.parameters() if p.requires_grad]  # all but a frozen text tower (text.init_from)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
    combos = train_combinations()
    heldout = heldout_combinations()
    eval_captions, eval_pixels = eval_pairs(heldout, cfg.resolution, seed=cfg.seed + 1)
    eval_ids = tokenize_prompts(tokenizer, eval_captions, CONTEXT_LENGTH).to(device)
    eval_pixels = eval_pixels.to(device)
    log.info(
        "text tower %.2fM parameters, image tower %.2fM; %d training combinations, %d held out; %d steps x %d on %s",
        sum(p.numel() for p in clip.text_model.parameters()) / 1e6,
        sum(p.numel() for p in clip.vision_model.parameters()) / 1e6,
        len(combos), len(heldout), cfg.steps, cfg.batch_size, device,
    )

    for step in range(1, cfg.steps + 1):
        batch = make_pairs(combos, cfg.batch_size, cfg.resolution, rng)
        ids = tokenize_prompts(tokenizer, batch.captions, CONTEXT_LENGTH).to(device)
        logits = clip(input_ids=ids, pixel_values=batch.pixels.to(device)).logits_per_text
        loss = multi_positive_clip_loss(logits, batch.positives.to(device))
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite contrastive loss at step {step}: lower lr (now {cfg.lr})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        if step % cfg.log_every == 0 or step == cfg.steps:
            acc = retrieval_accuracy(clip, eval_ids, eval_pixels, heldout)
            log.info(
                "step %d  loss %.4f  temperature 1/%.1f  held-out retrieval top-1 %.1f%%  (%s)",
                step, loss.item(), clip.logit_scale.exp().item(), 100 * acc["top1"],
                ", ".join(f"{k} {100 * v:.0f}%" for k, v in acc.items() if k != "top1"),
            )

    metrics = retrieval_accuracy(clip, eval_ids, eval_pixels, heldout)
    with atomic_directory(out) as tmp:
        text_encoder_from(clip).save_pretrained(tmp, safe_serialization=True)
        save_image_tower(clip, tmp / "image_tower")
        tokenizer.save_pretrained(tmp)
        save_config(cfg, tmp / "config.yaml")
        summary = {"final_loss": loss.item(), "heldout_retrieval": metrics, "heldout_combinations": len(heldout)}
        (tmp / "pretrain.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("wrote %s (held-out retrieval top-1 %.1f%%)", out, 100 * metrics["top1"])


if __name__ == "__main__":
    main()
