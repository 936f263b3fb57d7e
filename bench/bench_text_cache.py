"""U-Net training throughput (samples/s) with the text-embedding cache versus running the text encoder every step.

    python bench/bench_text_cache.py [--batch-size 32] [--steps 5] [--warmup 2] [--rounds 3] [--captions 256] \
        [--threads 0]

Two setups, each measured both ways in one run:

- demo: the bundled demo model (ldm/demo/shapes-32px): its U-Net (16x16x4 latents) and its tiny CLIP (width 32);
- sd-width: the demo U-Net's layout with cross_attention_dim 768 and a random CLIP text encoder of ViT-L/14's
  layout (SD 1.x's: width 768, 12 layers, 12 heads, 77 tokens; ~123M parameters).

Both variants take the step train/train_ldm.py takes: captions -> (B, 77, D) under no_grad (10% replaced by the empty
prompt), `diffusion_loss` at random timesteps on cached-posterior latents, backward, clipping at 1.0, AdamW. They
differ only in where the text states come from: `FrozenTextEncoder.encode` (uncached) or `TextEmbeddingCache.encode`
(a lookup in the file `build_text_cache` wrote for the caption pool). Variants alternate within each round (which one
goes first alternates too), so machine noise hits both alike; the table gives the median over rounds. fp32, torch's
default thread count (or --threads), one process. Disk per caption is the file's size over its captions (the empty
one included).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.latents.cache import sample_latents
from ldm.latents.text_cache import TextEmbeddingCache, build_text_cache, encoder_key
from ldm.text.config import TextEncoderConfig
from ldm.text.encoder import CLIPTextEncoder
from ldm.text.load_encoder import load_text_encoder
from ldm.text.tokenizer import offline_clip_tokenizer
from ldm.unet.objective import NoiseConfig, build_noise_scheduler, diffusion_loss, drop_captions

DEMO = Path(__file__).resolve().parents[1] / "ldm/demo/shapes-32px"
WORDS = (["red", "green", "blue", "yellow", "white", "purple", "orange", "black"],
         ["circle", "square", "triangle", "star"], ["small", "large", "tiny", "huge"],
         ["on a black background", "on a white background", "in the corner", "in the middle"])


def captions(n: int) -> list[str]:
    colour, shape, size, where = WORDS
    return [f"a {size[i // 32 % 4]} {colour[i % 8]} {shape[i // 8 % 4]} {where[i // 128 % 4]}, number {i}"
            for i in range(n)]


def vit_l14_text_encoder() -> CLIPTextEncoder:
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                            projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return CLIPTextEncoder(offline_clip_tokenizer(), CLIPTextModel(config))


def setups() -> dict[str, tuple[UNet2DConditionModel, CLIPTextEncoder]]:
    demo_unet = UNet2DConditionModel.from_pretrained(DEMO / "unet")
    demo_text = load_text_encoder(TextEncoderConfig(path=str(DEMO)))
    wide_unet = UNet2DConditionModel.from_config({**demo_unet.config, "cross_attention_dim": 768})
    return {"demo": (demo_unet, demo_text), "sd-width": (wide_unet, vit_l14_text_encoder())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--captions", type=int, default=256, help="distinct captions in the pool")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pool = captions(args.captions)
    noise_cfg = NoiseConfig()
    scheduler = build_noise_scheduler(noise_cfg)
    print(f"{datetime.date.today()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, batch {args.batch_size}, fp32")
    rows = []
    for name, (unet, text_encoder) in setups().items():
        channels, side = unet.config.in_channels, unet.config.sample_size
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "text-embeddings.safetensors"
            key = encoder_key(text_encoder)
            build_text_cache(path, text_encoder, key, pool)
            per_caption = path.stat().st_size / (len(pool) + 1)
            cache = TextEmbeddingCache.open(path, key, pool)
        variants = {"uncached (encoder every step)": (text_encoder.encode, text_encoder.empty_embedding()),
                    "text-embedding cache (ours)": (cache.encode, cache.empty_embedding())}
        generator = torch.Generator().manual_seed(0)
        mean = torch.randn(args.batch_size, channels, side, side, generator=generator)
        std = torch.full_like(mean, 0.1)

        def step(i: int, encode, empty) -> None:
            batch = [pool[(i * args.batch_size + j) % len(pool)] for j in range(args.batch_size)]
            with torch.no_grad():
                text = drop_captions(encode(batch), empty, 0.1)  # (B, 77, D)
            x0 = sample_latents(mean, std, 0.5)
            loss = diffusion_loss(unet, scheduler, x0, text, noise_cfg)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for encode, empty in variants.values():
            for i in range(args.warmup):
                step(i, encode, empty)
        rates: dict[str, list[float]] = {v: [] for v in variants}
        for r in range(args.rounds):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for variant in order:
                start = time.perf_counter()
                for i in range(args.steps):
                    step(r * args.steps + i, *variants[variant])
                rates[variant].append(args.steps * args.batch_size / (time.perf_counter() - start))
        text_params = sum(p.numel() for p in text_encoder.parameters()) / 1e6
        unet_params = sum(p.numel() for p in unet.parameters()) / 1e6
        medians = {v: statistics.median(rates[v]) for v in variants}
        for variant, rate in medians.items():
            rows.append((name, f"{unet_params:.1f}M U-Net, {text_params:.1f}M text encoder", variant, rate,
                         ", ".join(f"{x:.1f}" for x in rates[variant]), per_caption))
        cached, plain = medians["text-embedding cache (ours)"], medians["uncached (encoder every step)"]
        print(f"{name}: cached / uncached = {cached / plain:.2f}x")
    print("\n| setup | models | variant | samples/s (median) | rounds | disk per caption |")
    print("|---|---|---|---|---|---|")
    for name, models, variant, rate, rounds, per_caption in rows:
        print(f"| {name} | {models} | {variant} | {rate:.1f} | {rounds} | {per_caption / 1024:.1f} KiB |")


if __name__ == "__main__":
    main()
