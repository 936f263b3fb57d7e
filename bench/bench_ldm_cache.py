"""U-Net training throughput (samples/s) with cached latents versus encoding the images with the VAE every step.

    python bench/bench_ldm_cache.py [--unet small] [--vae small-f4] [--resolution 32] [--batch-size 32] \
        [--steps 5] [--warmup 2] [--rounds 3] [--text-hidden 64] [--device cpu] \
        [--max-load 0.1] [--retries 3] [--max-seconds 150]

Both variants take the same step as train/train_ldm.py: captions encoded by the frozen text encoder under no_grad
(10% replaced by the empty prompt), `diffusion_loss` at random timesteps, backward, gradient clipping at 1.0 and an
AdamW step; same U-Net, text encoder, batch and optimizer. They differ only in where the latents come from:

- cached (ours): z = (mean + std * eps) * scaling_factor from a cached posterior (`sample_latents`), no VAE call;
- in-loop (diffusers' train_text_to_image.py): `vae.encode(pixels).latent_dist.sample() * scaling_factor` under
  no_grad, every step.

The posteriors (and the pixels they were encoded from: random images, a pool of 4 batches) are made once by this
process and handed to the workers in a temporary file, as the latent cache is built once before training. Each
variant lives in its own worker subprocess, which builds the models (the two side by side), then takes its warm-up
steps (one worker at a time). Then the workers take turns, one at a time, timing `--steps` steps each per round, in
rounds that alternate which variant goes first, so machine noise hits both alike; the table gives the median over
rounds. A round during which other processes used more than `--max-load` of the machine's CPU (from /proc/stat,
minus the worker's own CPU time; shown in brackets per round) is left out of the median and repeated, at most
`--retries` times and not after `--max-seconds`: on a shared machine a busy neighbour can slow a 2-thread step
several-fold. Both workers hold the frozen VAE (train_ldm.py keeps it for sample grids), so the "baseline" (models
and data, before the first step) is the same and the memory difference is the VAE's activations. Memory on CPU is
each worker's peak resident set (VmHWM from /proc/self/status; not ru_maxrss, which after fork+exec reports the
parent's peak when that is higher); on CUDA it is `torch.cuda.max_memory_allocated`.
"peak - baseline" includes AdamW's moments (2x the U-Net's weights). No EMA, fp32, torch's default thread count.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ldm.latents.cache import sample_latents
from ldm.text.tiny import tiny_clip_text_encoder
from ldm.unet.objective import NoiseConfig, build_noise_scheduler, diffusion_loss, drop_captions
from ldm.unet.presets import build_unet
from ldm.vae.presets import build_vae, downsampling_factor

VARIANTS = ("cached", "in-loop")
POOL_BATCHES = 4  # distinct batches the steps cycle through
CAPTION_DROPOUT = 0.1
MAX_GRAD_NORM = 1.0
WORDS = (["red", "green", "blue", "yellow", "white"], ["circle", "square", "triangle", "star"],
         ["small", "large"], ["on a black background", "on a white background", ""])


def captions(n: int) -> list[str]:
    colour, shape, size, background = WORDS
    return [f"a {size[i % 2]} {colour[i % 5]} {shape[i % 4]} {background[i % 3]}".strip() for i in range(n)]


def mib(kib: float) -> float:
    return kib / 1024


def machine_busy_s() -> float:
    """CPU-seconds all processes on this machine spent busy so far (all cores), from /proc/stat; 0 without it."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    busy = sum(ticks[:8]) - idle  # user nice system idle iowait irq softirq steal (guest is counted in user)
    return busy / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system  # all threads of this process


def rss_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process in KiB; ru_maxrss where /proc is missing."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


# ----------------------------------------------------------------------------------------------------------------
# Worker: one variant, driven over stdin/stdout
# ----------------------------------------------------------------------------------------------------------------


def send(message: dict[str, float]) -> None:
    print(json.dumps(message), flush=True)


def worker(args: argparse.Namespace) -> None:
    """Build one variant, then answer "warmup", "time" (time `--steps` steps) and "done" (memory; exit) on stdin."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    text_encoder = tiny_clip_text_encoder(hidden_size=args.text_hidden, layers=args.text_layers).to(device)
    vae = build_vae(args.vae, args.resolution).to(device).eval().requires_grad_(False)
    scaling = float(vae.config.scaling_factor)
    data = torch.load(args.data)
    if args.variant == "cached":
        means, stds = data["mean"].to(device), data["std"].to(device)  # (P, C, h, w)
    else:
        pixels = data["pixels"].to(device)  # (P, 3, H, W) in [-1, 1]
    del data
    latent_shape = (vae.config.latent_channels, args.resolution // downsampling_factor(args.vae))
    unet = build_unet(args.unet, sample_size=latent_shape[1], latent_channels=latent_shape[0],
                      cross_attention_dim=text_encoder.hidden_size).to(device).train()
    noise_cfg = NoiseConfig()
    scheduler = build_noise_scheduler(noise_cfg)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    params = list(unet.parameters())
    empty = text_encoder.empty_embedding()  # (1, 77, D)
    prompts = captions(POOL_BATCHES * args.batch_size)
    b = args.batch_size

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device) / 1024
    else:
        baseline = rss_kib("VmRSS")

    steps_done = 0

    def step() -> None:
        nonlocal steps_done
        k = steps_done % POOL_BATCHES
        rows = slice(k * b, (k + 1) * b)
        if args.variant == "cached":
            x0 = sample_latents(means[rows], stds[rows], scaling)
        else:
            with torch.no_grad():
                x0 = vae.encode(pixels[rows]).latent_dist.sample() * scaling
        with torch.no_grad():
            text = drop_captions(text_encoder.encode(prompts[rows]), empty, CAPTION_DROPOUT)  # (B, 77, D)
        loss = diffusion_loss(unet, scheduler, x0, text, noise_cfg)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps_done += 1

    send({
        "threads": torch.get_num_threads(),
        "latent_channels": latent_shape[0],
        "unet_params": sum(p.numel() for p in unet.parameters()),
        "vae_encoder_params": sum(p.numel() for m in (vae.encoder, vae.quant_conv) for p in m.parameters()),
    })
    for line in sys.stdin:
        if line.strip() == "warmup":
            for _ in range(args.warmup):
                step()
            sync()
            send({"warm": 1})
        elif line.strip() == "time":
            busy, own, start = machine_busy_s(), own_cpu_s(), time.perf_counter()
            for _ in range(args.steps):
                step()
            sync()
            seconds = time.perf_counter() - start
            # CPU the rest of the machine used meanwhile, as a share of all its cores: other jobs slow the step down
            others = (machine_busy_s() - busy) - (own_cpu_s() - own)
            send({"samples_per_s": args.steps * b / seconds,
                  "others_load": max(0.0, others) / (seconds * (os.cpu_count() or 1))})
        elif line.strip() == "done":
            break
    sync()
    peak = torch.cuda.max_memory_allocated(device) / 1024 if cuda else rss_kib("VmHWM")
    send({"baseline_kib": baseline, "peak_kib": peak})


# ----------------------------------------------------------------------------------------------------------------
# Driver: the cached posteriors, the rounds, the table
# ----------------------------------------------------------------------------------------------------------------


def make_data(args: argparse.Namespace, path: Path) -> None:
    """A pool of random images and their posteriors under the workers' VAE (same preset, same seed, same weights)."""
    torch.manual_seed(0)  # the text encoder's weights come from a forked RNG, so the VAE's draw the same numbers
    vae = build_vae(args.vae, args.resolution).eval()
    pixels = torch.rand(POOL_BATCHES * args.batch_size, 3, args.resolution, args.resolution) * 2 - 1
    with torch.no_grad():
        means, stds = [], []
        for chunk in pixels.split(args.batch_size):
            dist = vae.encode(chunk).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    torch.save({"pixels": pixels, "mean": torch.cat(means), "std": torch.cat(stds)}, path)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def settings_argv(args: argparse.Namespace) -> list[str]:
    return [
        "--unet", args.unet, "--vae", args.vae, "--resolution", str(args.resolution),
        "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--text-hidden", str(args.text_hidden), "--text-layers", str(args.text_layers), "--device", args.device,
    ]


class Worker:
    """A worker subprocess for one variant; `ask` sends a command and returns its one-line JSON answer."""

    def __init__(self, args: argparse.Namespace, variant: str, data: Path) -> None:
        argv = [sys.executable, os.path.abspath(__file__), *settings_argv(args), "--variant", variant,
                "--data", str(data)]
        self.variant = variant
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def ask(self, command: str | None = None) -> dict[str, float]:
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        for line in self.proc.stdout:  # skip anything a library may print to stdout
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"the {self.variant} worker exited with status {self.proc.wait()} (see its stderr above)")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unet", default="small", help="U-Net preset (ldm.unet.presets)")
    parser.add_argument("--vae", default="small-f4", help="VAE preset (ldm.vae.presets)")
    parser.add_argument("--resolution", type=int, default=32, help="image side in pixels (e.g. 32 or 64)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (cached, in-loop), order alternating")
    parser.add_argument("--text-hidden", type=int, default=64, help="tiny CLIP text encoder width")
    parser.add_argument("--text-layers", type=int, default=2, help="tiny CLIP text encoder depth")
    parser.add_argument("--max-load", type=float, default=0.1,
                        help="a round during which other processes used more than this share of the machine's CPU "
                             "is repeated (CPU only)")
    parser.add_argument("--retries", type=int, default=3, help="at most this many repeated rounds")
    parser.add_argument("--max-seconds", type=float, default=150,
                        help="start no repeated round after this many seconds from the start")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # worker mode
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    factor = downsampling_factor(args.vae)
    if args.resolution % factor:
        parser.error(f"--resolution {args.resolution} is not a multiple of the {args.vae} VAE's factor {factor}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if args.variant:
        worker(args)
        return

    t0 = time.monotonic()
    cuda = args.device.startswith("cuda")
    results: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    memory: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_ldm_cache-") as tmp:
        data = Path(tmp) / "pool.pt"
        make_data(args, data)
        # both workers start side by side, then warm up and take turns timing, one at a time
        workers = {v: Worker(args, v, data) for v in VARIANTS}
        try:
            info = {v: w.ask() for v, w in workers.items()}
            for w in workers.values():  # one at a time: two multi-threaded jobs at once slow each other down a lot
                w.ask("warmup")
            clean = r = 0
            while clean < args.rounds and (
                r < args.rounds or (r < args.rounds + args.retries and time.monotonic() - t0 < args.max_seconds)
            ):
                for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                    time.sleep(0.5)  # let the other worker's OpenMP threads stop spinning
                    results[variant].append(workers[variant].ask("time"))
                busy = max(results[v][-1]["others_load"] for v in VARIANTS) > args.max_load and not cuda
                for v in VARIANTS:
                    results[v][-1]["contended"] = busy
                clean += not busy
                r += 1
            memory = {v: w.ask("done") for v, w in workers.items()}
        finally:
            for w in workers.values():
                w.close()

    first = info["cached"]
    rounds = len(results["cached"])
    contended = [i for i in range(rounds) if results["cached"][i]["contended"]]
    kept = [i for i in range(rounds) if i not in contended] or list(range(rounds))
    where = (f"{torch.cuda.get_device_name(args.device)}" if cuda
             else f"{cpu_model()}, {os.cpu_count()} cores")
    side = args.resolution // factor
    latent = f"{first['latent_channels']}x{side}x{side}"
    print(f"# {datetime.date.today().isoformat()}, {where}, torch {torch.__version__}, {first['threads']} threads, "
          f"device {args.device}; U-Net {args.unet} ({first['unet_params'] / 1e6:.1f}M), VAE {args.vae} "
          f"(encoder {first['vae_encoder_params'] / 1e6:.1f}M), {args.resolution} px -> latents {latent}, "
          f"CLIP text {args.text_hidden}x{args.text_layers} layers, batch {args.batch_size}, AdamW fp32, "
          f"{args.warmup} warm-up + {args.steps} timed steps per round")
    mem = "peak CUDA alloc" if cuda else "peak RSS"
    print(f"| variant | samples/s (median of {len(kept)} rounds) | samples/s per round (other jobs' CPU load) | "
          f"{mem} (MiB) | baseline (MiB) | peak - baseline (MiB) |")
    print("|---|---|---|---|---|---|")
    medians = {}
    for variant, label in zip(VARIANTS, ("cached latents (ours)", "VAE encode in loop (diffusers)")):
        runs = results[variant]
        medians[variant] = statistics.median(runs[i]["samples_per_s"] for i in kept)
        peak, base = memory[variant]["peak_kib"], memory[variant]["baseline_kib"]
        per_round = ", ".join(f"{'~~' * (i not in kept)}{run['samples_per_s']:.1f} ({run['others_load']:.0%})"
                              f"{'~~' * (i not in kept)}" for i, run in enumerate(runs))
        print(f"| {label} | {medians[variant]:.1f} | {per_round} | {mib(peak):.0f} | {mib(base):.0f} | "
              f"{mib(peak - base):.0f} |")
    if contended and len(kept) < rounds:
        print(f"{len(contended)} of {rounds} rounds left out (struck through): other jobs used more than "
              f"{args.max_load:.0%} of the machine's CPU meanwhile")
    elif contended:
        print(f"warning: other jobs used more than {args.max_load:.0%} of the machine's CPU in every round: "
              "these numbers are unreliable")
    print(f"cached / in-loop throughput ratio: {medians['cached'] / medians['in-loop']:.2f}x")


if __name__ == "__main__":
    main()
