"""Throughput of `ldm-generate --prompts-file` with 1 process and with N processes (`accelerate launch`).

    python bench/bench_prompts_file.py                         # tiny random model, CPU, 1 and 2 processes
    python bench/bench_prompts_file.py --model DIR --device cuda --processes 1 8 --lines 64 --size 512 --steps 25

Each run starts from an empty output directory and generates every line of the same prompts file; the table gives
the generation throughput the run reports (images / seconds from the first to the last image, model loading
excluded) and the wall time of the whole command (interpreter start, imports, model loading included). On the
CPU every process gets `--threads` torch threads (OMP_NUM_THREADS), so N processes use N x threads cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUMMARY = re.compile(r"(\d+) image\(s\) written.*images in ([\d.]+) s \(([\d.]+) images/s\)")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def command(processes: int, args: list[str]) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "ldm.generate", *args]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(port), "-m", "ldm.generate", *args]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="diffusers-format model directory (default: a tiny random model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--lines", type=int, default=16)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process on the CPU")
    args = ap.parse_args()
    load = os.getloadavg()[0]

    work = Path(tempfile.mkdtemp(prefix="bench-prompts-"))
    model = args.model
    if model is None:
        from ldm.pipeline.tiny import save_tiny_model

        model = str(save_tiny_model(work / "model"))
    prompts = work / "prompts.txt"
    prompts.write_text("".join(f"shape number {i} on a plain background\n" for i in range(args.lines)))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    rows = []
    for n in args.processes:
        outdir = work / f"out-{n}"
        cli = ["--prompts-file", str(prompts), "--model", model, "--device", args.device, "--steps", str(args.steps),
               "--height", str(args.size), "--width", str(args.size), "--seed", "0", "--outdir", str(outdir), "-q"]
        start, cpu = time.perf_counter(), _children_cpu()
        done = subprocess.run(command(n, cli), capture_output=True, text=True, env=env)
        wall, cpu = time.perf_counter() - start, _children_cpu() - cpu
        if done.returncode != 0:
            sys.exit(f"{n} process(es) failed:\n{done.stderr[-3000:]}")
        made, seconds, rate = SUMMARY.search(done.stderr).groups()
        rows.append((n, int(made), float(seconds), float(rate), wall, cpu))
        print(f"{n} process(es): {made} images in {seconds} s ({rate} images/s), wall {wall:.1f} s, CPU {cpu:.1f} s",
              file=sys.stderr)

    base = rows[0][3]
    print(f"Command: `python {shlex.join(['bench/bench_prompts_file.py', *sys.argv[1:]])}`\n")
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores; {args.device}, "
          f"{args.threads} torch thread(s) per process; model {args.model or 'tiny random SD'}; {args.lines} lines, "
          f"{args.size}x{args.size}, {args.steps} steps, euler_a, cfg 7.5\n")
    print(f"Load average before the runs: {load:.1f} (other jobs on the machine)\n")
    print("| processes | images | generation s | images/s | speed-up | wall s (whole command) | CPU s (all processes) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n, made, seconds, rate, wall, cpu in rows:
        print(f"| {n} | {made} | {seconds:.1f} | {rate:.2f} | {rate / base:.2f}x | {wall:.1f} | {cpu:.1f} |")


if __name__ == "__main__":
    main()
