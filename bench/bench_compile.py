"""`torch.compile` of the U-Net: eager vs whole-model vs regional (diffusers' `compile_repeated_blocks`), static vs
dynamic shapes. Warm-up (first call, compile included), steady seconds per image, a new size, and pixel agreement.

    python bench/bench_compile.py                      # the tiny random model on the CPU, 64x64, batch 8
    python bench/bench_compile.py --model DIR --device cuda --dtype fp16 --height 512 --width 512

Each mode gets a freshly loaded U-Net (regional compilation compiles the blocks in place), `torch._dynamo.reset()`
and an empty inductor cache directory, so every first call is a cold compile and no mode profits from another's
code. CPU times include the C++ compiler's (child processes; compilation runs in-process, see below). "new size" is the first call at `--new-size` after
the warm-up: a static-shape compile recompiles there, a dynamic one should not. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

# compile in this process, so that its CPU time is counted (inductor's default is a pool of worker processes, whose
# time getrusage does not see while they live); read when torch is imported
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

MODES = ["eager", "full", "full-dynamic", "regional", "regional-dynamic"]


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (inductor may compile C++ in worker processes): on a
    shared machine a steadier measure of compile cost than the wall clock."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="diffusers-format model directory (default: a tiny random model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--new-size", type=int, default=48, help="square size of the recompile probe (default 48)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)

    from ldm.models.load import load_components
    from ldm.models.spec import inspect_model
    from ldm.pipeline.device import DTYPES
    from ldm.pipeline.pipeline import Pipeline

    model = args.model
    if model is None:
        from ldm.pipeline.tiny import save_tiny_model

        model = str(save_tiny_model(Path(tempfile.mkdtemp(prefix="bench-compile-"))))
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    spec = inspect_model(model)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    rows, reference = [], None
    for mode in args.modes:
        torch._dynamo.reset()
        # a cold compile for every mode: no kernels from an earlier mode or run (inductor reads this per use)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"inductor-{mode}-")
        pipe = Pipeline(load_components(spec, device, dtype), device, dtype)
        if mode.startswith("full"):
            pipe._unet_fn = torch.compile(pipe.unet, dynamic=mode.endswith("dynamic"))
        elif mode.startswith("regional"):
            pipe.unet.compile_repeated_blocks(dynamic=mode.endswith("dynamic"))

        def run(size: tuple[int, int]) -> tuple[float, np.ndarray]:
            sync()
            run.cpu = cpu_seconds()
            start = time.perf_counter()
            out = pipe("a red circle", "blurry", steps=args.steps, cfg=7.5, sampler="euler", seed=1,
                       num_images=args.batch_size, batch_size=args.batch_size, height=size[0], width=size[1],
                       show_progress=False).decoded
            sync()
            run.cpu = cpu_seconds() - run.cpu
            return time.perf_counter() - start, out

        size = (args.height, args.width)
        first, images = run(size)
        first_cpu = run.cpu
        steady_runs = [(run(size)[0], run.cpu) for _ in range(args.repeats)]
        steady = statistics.median(t for t, _ in steady_runs)
        steady_cpu = statistics.median(c for _, c in steady_runs)
        new_size = run((args.new_size, args.new_size))[0]
        new_size_cpu = run.cpu
        if reference is None:
            reference = images
        diff = float(np.abs(images - reference).max())
        rows.append((mode, first, first_cpu, steady / args.batch_size, steady_cpu / args.batch_size, new_size,
                     new_size_cpu, diff))
        print(f"{mode}: first {first:.1f}s ({first_cpu:.1f} s CPU), steady {steady / args.batch_size:.4f} s/image "
              f"({steady_cpu / args.batch_size:.4f} CPU), "
              f"new size {new_size:.1f}s ({new_size_cpu:.1f} s CPU), max abs diff {diff:.1e}", file=sys.stderr,
              flush=True)

    eager = next((r[4] for r in rows if r[0] == "eager"), None)
    print(f"Command: `python {shlex.join(['bench/bench_compile.py', *sys.argv[1:]])}`\n")
    print(f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; torch "
          f"{torch.__version__}; {args.dtype} on {args.device}; {args.height}x{args.width}, batch {args.batch_size}, "
          f"{args.steps} steps (euler, cfg 7.5); steady = median of {args.repeats}\n")
    print("| mode | first call: wall s (CPU s), compile included | steady s/image: wall (CPU) | CPU vs eager | "
          "first call at a new size: wall s (CPU s) | max abs diff vs eager |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode, first, first_cpu, per_image, per_image_cpu, new_size, new_size_cpu, diff in rows:
        ratio = f"{per_image_cpu / eager:.2f}x" if eager else "-"
        print(f"| {mode} | {first:.1f} ({first_cpu:.1f}) | {per_image:.4f} ({per_image_cpu:.4f}) | {ratio} | "
              f"{new_size:.1f} ({new_size_cpu:.1f}) | {diff:.1e} |")


if __name__ == "__main__":
    main()
