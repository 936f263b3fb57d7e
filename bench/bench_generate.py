"""Seconds per image: ldm's pipeline vs diffusers' StableDiffusionPipeline, same components, sampler, steps and seeds.

    python bench/bench_generate.py                      # a tiny random model on the CPU (built in a temp dir)
    python bench/bench_generate.py --model DIR --device cuda --dtype fp16 --height 512 --width 512 --batch-size 1 8

Both pipelines share the very same U-Net, VAE and text encoder objects; runs alternate (ours, diffusers, ours, ...)
after a warm-up each, so drift in machine load hits both alike, and the median of `--repeats` runs is reported. The
outputs are compared too: a speed-up that changed the pixels would not count. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="diffusers-format model directory (default: a tiny random model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--height", type=int, default=None, help="default: 64 for the tiny model, else the model's size")
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--sampler", default="dpmpp_2m")
    ap.add_argument("--batch-size", type=int, nargs="+", default=[1])
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per pipeline and batch size (median reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # diffusers' torch_dtype -> dtype rename notice
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers import StableDiffusionPipeline
    from diffusers import __version__ as diffusers_version

    from ldm.models.components import Components
    from ldm.pipeline.device import DTYPES
    from ldm.pipeline.pipeline import Pipeline
    from ldm.pipeline.samplers import make_scheduler
    from ldm.text.encoder import FrozenTextEncoder

    model = args.model
    if model is None:
        from ldm.pipeline.tiny import save_tiny_model

        model = str(save_tiny_model(Path(tempfile.mkdtemp(prefix="bench-tiny-sd-"))))
        args.height, args.width = args.height or 64, args.width or 64
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    ref = StableDiffusionPipeline.from_pretrained(
        model, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False, use_safetensors=True
    ).to(device)
    ref.set_progress_bar_config(disable=True)
    components = Components(
        unet=ref.unet, vae=ref.vae, text_encoder=FrozenTextEncoder.from_clip(ref.tokenizer, ref.text_encoder),
        scheduler_config=dict(ref.scheduler.config), name=args.model or "tiny",
    )
    ours = Pipeline(components, device, dtype)
    height = args.height or ours.default_size
    width = args.width or ours.default_size
    prompt, negative, seed = "a red car on a wet street at night", "blurry", 42

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run_ours(n: int) -> np.ndarray:
        return ours(prompt, negative, steps=args.steps, cfg=args.cfg, sampler=args.sampler, seed=seed, num_images=n,
                    batch_size=n, height=height, width=width, show_progress=False).decoded

    def run_diffusers(n: int) -> np.ndarray:
        ref.scheduler = make_scheduler(args.sampler, ours.scheduler_config)
        gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]
        return ref(prompt, negative_prompt=negative, num_inference_steps=args.steps, guidance_scale=args.cfg,
                   height=height, width=width, num_images_per_prompt=n, generator=gens, output_type="np").images

    def timed(fn, n: int) -> tuple[float, float, np.ndarray]:
        """-> (wall seconds per image, process CPU seconds per image, images)"""
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        out = fn(n)
        sync()
        return (time.perf_counter() - start) / n, (time.process_time() - cpu_start) / n, out

    rows = []
    for n in args.batch_size:
        timed(run_ours, n), timed(run_diffusers, n)  # warm-up (allocator, kernels, lazy imports)
        t_ours, t_ref, diff = [], [], 0.0
        for _ in range(args.repeats):
            *a, img_a = timed(run_ours, n)
            *b, img_b = timed(run_diffusers, n)
            t_ours.append(a)
            t_ref.append(b)
            diff = max(diff, float(np.abs(img_a - img_b).max()))
        wall_ours, cpu_ours = (statistics.median(t[i] for t in t_ours) for i in (0, 1))
        wall_ref, cpu_ref = (statistics.median(t[i] for t in t_ref) for i in (0, 1))
        rows.append((n, wall_ours, wall_ref, wall_ours / wall_ref, cpu_ours / cpu_ref, diff))

    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{cpu_name()}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads"
    print(f"Command: `python {shlex.join(['bench/bench_generate.py', *sys.argv[1:]])}`\n")
    print(f"Machine: {where}; torch {torch.__version__}, diffusers {diffusers_version}, Python {platform.python_version()}")
    print(f"Model: {args.model or 'tiny random SD (U-Net 32/64 ch, VAE f=2, CLIP hidden 32)'}; {height}x{width}, "
          f"{args.dtype} on {args.device}, sampler {args.sampler}, {args.steps} steps, cfg {args.cfg}, seed {seed}; "
          f"median of {args.repeats} alternating runs after one warm-up each\n")
    # the CPU-time ratio is the steadier one on a shared machine (other jobs' load barely moves it)
    print("| batch | ldm s/image | diffusers s/image | ratio (wall) | ratio (process CPU time) | max abs diff |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n, a, b, r, rc, d in rows:
        print(f"| {n} | {a:.4f} | {b:.4f} | {r:.3f} | {rc:.3f} | {d:.1e} |")


if __name__ == "__main__":
    main()
