"""LoRA training against full fine-tuning of the same U-Net: trainable parameters, samples/s and peak memory.

    python bench/bench_lora.py [--unet shapes] [--batch-size 32] [--resolution 32] [--steps 4] [--warmup 2] \
        [--rounds 3] [--rank 4] [--targets to_q,to_k,to_v,to_out.0] [--mixed-precision no] [--device cpu]

Both variants take train/train_ldm.py's step on random latents and text states (`diffusion_loss` at random
timesteps, backward, clipping at 1.0, AdamW): "full" trains every U-Net weight; "lora" freezes them and trains the
adapters `ldm.lora.train.add_lora` adds (under --mixed-precision fp16/bf16 the frozen base is held in that dtype,
as in training, and autocast is on). Each variant runs in its own subprocess, one after the other (so neither's
memory counts in the other's), and reports the median samples/s over `--rounds` rounds of `--steps` steps after
`--warmup` steps. Memory: on CPU the worker's peak resident set (VmHWM) above its baseline after the U-Net is built
(weights, then gradients, AdamW's two moments and activations on top); on CUDA `torch.cuda.max_memory_allocated`
above the memory held after the build. Prints a markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from bench_ldm_cache import rss_kib  # noqa: E402  (bench/ is on sys.path when this script runs)
from ldm.lora.config import LoRAConfig
from ldm.lora.train import add_lora
from ldm.unet.objective import NoiseConfig, build_noise_scheduler, diffusion_loss
from ldm.unet.presets import build_unet

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def worker(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    side = args.resolution // args.vae_factor
    unet = build_unet(args.unet, sample_size=side, latent_channels=4, cross_attention_dim=args.text_hidden)
    unet.to(device).train()
    total = sum(p.numel() for p in unet.parameters())
    if args.variant == "lora":
        cfg = LoRAConfig(enabled=True, rank=args.rank, alpha=args.rank, targets=args.targets.split(","))
        params = add_lora(unet, cfg, base_dtype=DTYPES[args.mixed_precision])
    else:
        params = list(unet.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    scheduler, noise = build_noise_scheduler(NoiseConfig()), NoiseConfig()
    scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")
    autocast = torch.autocast(device.type, dtype=DTYPES[args.mixed_precision], enabled=args.mixed_precision != "no")
    b = args.batch_size
    x0 = torch.randn(4 * b, 4, side, side, device=device)  # a pool of 4 batches of latents
    text = torch.randn(4 * b, 77, args.text_hidden, device=device)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        baseline = rss_kib("VmRSS") * 1024

    def step(i: int) -> None:
        k = i % 4
        with autocast:
            loss = diffusion_loss(unet, scheduler, x0[k * b:(k + 1) * b], text[k * b:(k + 1) * b], noise)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    for i in range(args.warmup):
        step(i)
    rates = []
    for _ in range(args.rounds):
        sync()
        start = time.perf_counter()
        for i in range(args.steps):
            step(i)
        sync()
        rates.append(args.steps * b / (time.perf_counter() - start))
    peak = torch.cuda.max_memory_allocated(device) if cuda else rss_kib("VmHWM") * 1024
    return {"variant": args.variant, "total": total, "trainable": sum(p.numel() for p in params),
            "samples_per_s": statistics.median(rates), "rounds": rates, "peak_mib": (peak - baseline) / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--unet", default="shapes")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--vae-factor", type=int, default=2)
    p.add_argument("--text-hidden", type=int, default=32)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--targets", default="to_q,to_k,to_v,to_out.0")
    p.add_argument("--mixed-precision", choices=list(DTYPES), default="no")
    p.add_argument("--device", default="cpu")
    p.add_argument("--_worker", dest="variant", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant is not None:
        print(json.dumps(worker(args)))
        return
    results = []
    for variant in ("full", "lora"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--_worker", variant]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    print(f"U-Net `{args.unet}`, batch {args.batch_size}, {args.resolution} px (latents {args.resolution // args.vae_factor}"
          f"), {args.device}, mixed precision {args.mixed_precision}, LoRA rank {args.rank} on {args.targets}\n")
    print("| variant | trainable parameters | of total | samples/s (median) | peak - baseline (MiB) |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['trainable']:,} | {100 * r['trainable'] / r['total']:.2f}% | "
              f"{r['samples_per_s']:.2f} ({', '.join(f'{x:.2f}' for x in r['rounds'])}) | {r['peak_mib']:.0f} |")
    full, lora = results
    print(f"\nLoRA / full: {lora['samples_per_s'] / full['samples_per_s']:.2f}x samples/s, "
          f"{lora['peak_mib'] / max(full['peak_mib'], 1e-9):.2f}x peak memory above baseline")


if __name__ == "__main__":
    main()
