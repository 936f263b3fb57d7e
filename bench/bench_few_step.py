"""Few-step vs ordinary sampling: seconds per image for 4-step LCM at cfg 1 (what an LCM-LoRA, SDXL-Lightning or
Turbo model is run with) against the baseline, 25-step Euler a at cfg 7.5, on the same model, in the same process.

    python bench/bench_few_step.py                      # SD 1.5-sized random model (bench/random_models.py), 256 px
    python bench/bench_few_step.py --size 512 --device cuda --repeats 3
    python bench/bench_few_step.py --tiny               # ldm/pipeline/tiny.py's model at 64 px: seconds

The model is random (the FLOPs of SD 1.5, not its images): an LCM-LoRA merged into the U-Net (`--lora`) costs
nothing per step, so the timing of the LCM sampler on these weights is the timing with one. What the few-step run
saves is U-Net work: 4 calls on one branch (cfg 1 skips the unconditional one) against 25 calls on two, counted as
U-Net batch rows in the table; the text encoder and the VAE decode cost the same in both, so the time ratio is
above 4 / 50. Runs alternate (baseline, few-step, ...) after one short warm-up; the median of `--repeats` is
reported, wall and process CPU time (the steadier one on a shared machine). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
import warnings

import torch

from random_models import sd15_pipeline  # noqa: E402  (bench/ is on sys.path when this script runs)

# (label, sampler, steps, cfg): the baseline first
RUNS = (("baseline: Euler a, 25 steps, cfg 7.5", "euler_a", 25, 7.5), ("LCM, 4 steps, cfg 1", "lcm", 4, 1.0))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the tiny random model at 64 px (seconds)")
    ap.add_argument("--size", type=int, default=None, help="image side in px (default 256; 64 with --tiny)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--repeats", type=int, default=1, help="timed runs of each setting (median reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)

    from ldm.models.components import Components
    from ldm.pipeline.device import DTYPES
    from ldm.pipeline.pipeline import Pipeline
    from ldm.text.encoder import FrozenTextEncoder

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    size = args.size or (64 if args.tiny else 256)
    start = time.perf_counter()
    ref = sd15_pipeline("tiny" if args.tiny else "full", device, dtype)
    print(f"model built in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    parts = Components(unet=ref.unet, vae=ref.vae, scheduler_config=dict(ref.scheduler.config), name="random",
                       text_encoder=FrozenTextEncoder.from_clip(ref.tokenizer, ref.text_encoder))
    pipe = Pipeline(parts, device, dtype)
    rows_seen: list[int] = []
    unet = pipe._unet_fn
    pipe._unet_fn = lambda x, t, **kw: rows_seen.append(x.shape[0]) or unet(x, t, **kw)  # counts batch rows

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run(sampler: str, steps: int, cfg: float) -> tuple[float, float, int]:
        """One image -> (wall s, process CPU s, U-Net batch rows)."""
        rows_seen.clear()
        sync()
        wall, cpu = time.perf_counter(), time.process_time()
        pipe("a red car on a wet street at night", "blurry", steps=steps, cfg=cfg, sampler=sampler, seed=42,
             height=size, width=size, show_progress=False)
        sync()
        return time.perf_counter() - wall, time.process_time() - cpu, sum(rows_seen)

    run("lcm", 1, 1.0)  # warm-up: allocator, kernels, lazy imports (one U-Net call and a decode)
    times: dict[str, list[tuple[float, float, int]]] = {label: [] for label, *_ in RUNS}
    for _ in range(args.repeats):
        for label, sampler, steps, cfg in RUNS:
            times[label].append(run(sampler, steps, cfg))
            print(f"{label}: {times[label][-1][0]:.1f} s", file=sys.stderr, flush=True)

    results = []
    for label, sampler, steps, cfg in RUNS:
        wall = statistics.median(t[0] for t in times[label])
        cpu = statistics.median(t[1] for t in times[label])
        results.append({"label": label, "sampler": sampler, "steps": steps, "cfg": cfg, "rows": times[label][0][2],
                        "wall": wall, "cpu": cpu})
    base = results[0]
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{cpu_name()}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads"
    print(f"Command: `python {shlex.join(['bench/bench_few_step.py', *sys.argv[1:]])}`\n")
    print(f"Machine: {where}; torch {torch.__version__}, Python {platform.python_version()}")
    print(f"Model: {'tiny random SD' if args.tiny else 'random SD 1.5-sized (U-Net 860M)'}; {size}x{size}, "
          f"{args.dtype} on {args.device}, batch 1, seed 42; median of {args.repeats} run(s) after one warm-up\n")
    print("| run | U-Net batch rows | s/image (wall) | s/image (process CPU) | ratio to baseline (wall) | ratio (CPU) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['label']} | {r['rows']} | {r['wall']:.2f} | {r['cpu']:.2f} | {r['wall'] / base['wall']:.3f} | "
              f"{r['cpu'] / base['cpu']:.3f} |")
    return results


if __name__ == "__main__":
    main()
