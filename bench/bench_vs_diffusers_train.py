"""Our train/train_ldm.py against diffusers' own example trainer (train_text_to_image.py), side by side in one run.

    python bench/bench_vs_diffusers_train.py [--diffusers-script PATH] [--unet shapes] [--vae shapes-f4] \
        [--resolution 32] [--batch-size 16] [--images 256] [--steps 30] [--warmup 5] [--rounds 1] \
        [--threads 2] [--text-hidden 64] [--text-layers 2] [--device cpu] [--ours-extra KEY=VALUE ...]

diffusers' script is not in the wheel. Without `--diffusers-script` it is downloaded from raw.githubusercontent.com at
the tag of the installed diffusers (v<diffusers.__version__>) into the work folder (never into this repository);
offline that fails with a message saying how to fetch it by hand (e.g. `git show v0.40.0:examples/text_to_image/
train_text_to_image.py > /tmp/t2i.py` in a diffusers clone).

Both trainers get the same inputs, built here in code: a diffusers-layout model folder (`model_index.json`, `unet/`
from `ldm.unet.presets`, `vae/` from `ldm.vae.presets`, `text_encoder/`: a random transformers CLIPTextModel from
`ldm.text.tiny`, `tokenizer/`: the CLIP tokenizer built offline from open_clip's vocabulary, `scheduler/`: our DDPM
schedule), and a local imagefolder of the synthetic shapes with a metadata.jsonl of captions. Same batch size,
fp32 (or `--precision`), AdamW lr 1e-4 constant without warmup, weight decay 1e-2, gradient clipping 1.0, no EMA,
no caption dropout, no validation, loader workers 0, centre crop without flips, `--threads` torch threads.

Each trainer runs unmodified in its own subprocess, through a small wrapper that sets the thread count and times
every optimizer step with torch's global step hook (`register_optimizer_step_post_hook`); samples/s is the batch
size over the median step time after `--warmup` steps, so start-up (imports, model loading, dataset preparation, our
latent cache build, the final save) is excluded and shown separately as "start -> first step". Peak memory is the
process's peak resident set (VmHWM) at its last timed step on CPU, `torch.cuda.max_memory_allocated` on CUDA.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAW_URL = "https://raw.githubusercontent.com/huggingface/diffusers/v{version}/examples/text_to_image/train_text_to_image.py"
ARMS = ("ours", "diffusers")


# ---------------------------------------------------------------------------------------------------- the child


def child(out: str, threads: int, script: str, argv: list[str]) -> None:
    """Run `script argv` as __main__ in this process, timing each optimizer step; results go to `out` at exit."""
    import atexit
    import runpy

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    start, steps, peak = time.perf_counter(), [], {"rss_kib": 0, "cuda_bytes": 0}

    def on_step(optimizer, args, kwargs) -> None:
        if cuda:
            torch.cuda.synchronize()
            peak["cuda_bytes"] = torch.cuda.max_memory_allocated()
        steps.append(time.perf_counter())
        peak["rss_kib"] = peak_rss_kib()

    register_optimizer_step_post_hook(on_step)
    atexit.register(lambda: Path(out).write_text(json.dumps({"start": start, "steps": steps, **peak})))
    sys.argv = [script, *argv]
    sys.path.insert(0, str(Path(script).parent))
    runpy.run_path(script, run_name="__main__")


def peak_rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


# ---------------------------------------------------------------------------------------------------- the inputs


def diffusers_script(path: str | None, work: Path) -> Path:
    if path:
        script = Path(path).expanduser()
        if not script.is_file():
            sys.exit(f"error: --diffusers-script {path} does not exist")
        return script
    import diffusers

    url = RAW_URL.format(version=diffusers.__version__)
    target = work / f"train_text_to_image-v{diffusers.__version__}.py"
    try:
        with urllib.request.urlopen(url, timeout=15) as response:
            target.write_bytes(response.read())
    except (urllib.error.URLError, OSError) as error:
        sys.exit(
            f"error: cannot download diffusers' example trainer from {url} ({error}; offline?): fetch "
            "examples/text_to_image/train_text_to_image.py at a released tag by hand (e.g. `git show "
            "v0.40.0:examples/text_to_image/train_text_to_image.py > t2i.py` in a diffusers clone) and pass "
            "--diffusers-script t2i.py"
        )
    return target


def build_model_dir(args: argparse.Namespace, directory: Path) -> None:
    """A diffusers-layout folder both trainers start from (the same U-Net weights, VAE, text encoder, tokenizer)."""
    import torch
    from diffusers import StableDiffusionPipeline

    from ldm.text.tiny import tiny_clip_text_encoder
    from ldm.unet.objective import NoiseConfig, build_noise_scheduler
    from ldm.unet.presets import build_unet
    from ldm.vae.presets import build_vae, downsampling_factor

    torch.manual_seed(0)
    text = tiny_clip_text_encoder(hidden_size=args.text_hidden, layers=args.text_layers)
    vae = build_vae(args.vae, args.resolution)
    unet = build_unet(args.unet, sample_size=args.resolution // downsampling_factor(args.vae),
                      latent_channels=vae.config.latent_channels, cross_attention_dim=text.hidden_size)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text.model, tokenizer=text.tokenizer, unet=unet,
                                   scheduler=build_noise_scheduler(NoiseConfig()), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(directory, safe_serialization=True)
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in
              (("unet", unet), ("vae", vae), ("text_encoder", text.model))}
    (directory / "bench_params.json").write_text(json.dumps(counts) + "\n")


def commands(args: argparse.Namespace, script: Path, model: Path, data: Path, out: Path) -> dict[str, list[str]]:
    """The two trainers' command lines (after `python`), with matching settings."""
    total = args.warmup + args.steps + 1
    ours = [
        str(ROOT / "train" / "train_ldm.py"), "--config", str(ROOT / "configs" / "ldm" / "tiny.yaml"),
        f"model.pretrained={model}", "text_encoder.kind=clip", f"text_encoder.path={model}",
        f"cache.vae={model / 'vae'}", f"cache.dir={out / 'ours' / 'latents'}", f"data.path={data}",
        f"data.resolution={args.resolution}", "data.center_crop=true", "data.random_flip=false", "data.num_workers=0",
        f"train.output_dir={out / 'ours'}", f"train.max_steps={total}", f"train.batch_size={args.batch_size}",
        f"train.mixed_precision='{args.precision}'", "train.ema_decay=0", "train.caption_dropout=0",
        f"train.log_every={total}", f"train.checkpoint_every={total}", "sample.every=0", "optim.lr=1e-4",
        "optim.warmup_steps=0", "optim.schedule=constant", "optim.weight_decay=1e-2", "optim.max_grad_norm=1.0",
        f"train.cpu={'true' if args.device == 'cpu' else 'false'}", *args.ours_extra,
    ]
    theirs = [
        str(script), f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}",
        "--image_column=image", "--caption_column=text", f"--resolution={args.resolution}", "--center_crop",
        f"--train_batch_size={args.batch_size}", f"--max_train_steps={total}", "--learning_rate=1e-4",
        "--lr_scheduler=constant", "--lr_warmup_steps=0", "--adam_weight_decay=1e-2", "--max_grad_norm=1.0",
        f"--mixed_precision={args.precision}", "--dataloader_num_workers=0", f"--output_dir={out / 'diffusers'}",
        f"--cache_dir={out / 'hf-datasets'}", "--checkpointing_steps=1000000", "--seed=0", "--report_to=tensorboard",
    ]
    return {"ours": ours, "diffusers": theirs}


# ---------------------------------------------------------------------------------------------------- running


def run_arm(name: str, argv: list[str], args: argparse.Namespace, out: Path) -> dict[str, float]:
    from bench_ldm_cache import machine_busy_s  # noqa: PLC0415  (bench/ is on sys.path when run as a script)

    result = out / f"{name}.json"
    result.unlink(missing_ok=True)
    shutil.rmtree(out / name, ignore_errors=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=f"{ROOT}{os.pathsep}"
               + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", str(result), str(args.threads), *argv]
    busy0, t0 = machine_busy_s(), time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    busy = machine_busy_s() - busy0
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not result.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        sys.exit(f"error: the {name} trainer failed (exit {proc.returncode}); log {out / f'{name}.log'}:\n{tail}")
    data = json.loads(result.read_text())
    steps = data["steps"]
    if len(steps) < args.warmup + args.steps + 1:
        sys.exit(f"error: the {name} trainer took {len(steps)} optimizer steps, expected {args.warmup + args.steps + 1}")
    deltas = [b - a for a, b in zip(steps[args.warmup:], steps[args.warmup + 1:])][: args.steps]
    step_s = statistics.median(deltas)
    return {
        "samples_per_s": args.batch_size / step_s, "step_ms": 1000 * step_s, "min_step_ms": 1000 * min(deltas),
        "startup_s": steps[0] - data["start"], "wall_s": wall,
        "peak_mib": (data["cuda_bytes"] if args.device != "cpu" else data["rss_kib"] * 1024) / 2**20,
        # CPU-seconds used by everything on the machine during the run, per second of wall time (2 = 2 cores busy)
        "machine_load": busy / wall if wall > 0 else 0.0,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        child(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--diffusers-script", help="a local copy of examples/text_to_image/train_text_to_image.py")
    parser.add_argument("--unet", default="shapes", help="ldm.unet.presets name")
    parser.add_argument("--vae", default="shapes-f4", help="ldm.vae.presets name")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per trainer")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each trainer, alternating which goes first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--text-hidden", type=int, default=64)
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--precision", choices=("no", "fp16", "bf16"), default="no")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--ours-extra", nargs="*", default=[], help="more key=value overrides for train_ldm.py")
    parser.add_argument("--workdir", help="keep inputs and logs here (default: a temporary folder)")
    args = parser.parse_args()

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-vs-diffusers-"))
    work.mkdir(parents=True, exist_ok=True)
    script = diffusers_script(args.diffusers_script, work)
    import diffusers

    from bench_ldm_cache import cpu_model  # noqa: PLC0415
    from ldm.demo.shapes import write_dataset

    model, data = work / "model", work / "data"
    if not (model / "model_index.json").is_file():
        build_model_dir(args, model)
    if not (data / "metadata.jsonl").is_file():
        write_dataset(data, num_images=args.images, seed=0, size=args.resolution, overwrite=True)
    cmds = commands(args, script, model, data, work)
    results: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
    for r in range(args.rounds):
        for arm in ARMS if r % 2 == 0 else ARMS[::-1]:
            results[arm].append(run_arm(arm, cmds[arm], args, work))
            print(f"round {r + 1} {arm}: {results[arm][-1]['samples_per_s']:.1f} samples/s", file=sys.stderr)

    med = {arm: {k: statistics.median(x[k] for x in results[arm]) for k in results[arm][0]} for arm in ARMS}
    params = json.loads((model / "bench_params.json").read_text())
    print(f"date {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}, machine {cpu_model()} "
          f"({os.cpu_count()} CPUs), device {args.device}, torch threads {args.threads}, diffusers "
          f"{diffusers.__version__}, their script {script.name}")
    print(f"U-Net {args.unet} ({params['unet'] / 1e6:.2f} M), VAE {args.vae} ({params['vae'] / 1e6:.2f} M), text "
          f"encoder CLIP {args.text_hidden}x{args.text_layers} ({params['text_encoder'] / 1e6:.2f} M), "
          f"{args.resolution} px, batch {args.batch_size}, precision {args.precision}, {args.images} images, "
          f"median of {args.steps} steps after {args.warmup}, {args.rounds} round(s)")
    print("| trainer | samples/s (median step) | median step ms | fastest step ms | peak memory MiB | "
          "start -> first step s | machine load |")
    print("|---|---|---|---|---|---|---|")
    for arm in ARMS:
        m = med[arm]
        print(f"| {arm} | {m['samples_per_s']:.1f} | {m['step_ms']:.0f} | {m['min_step_ms']:.0f} | "
              f"{m['peak_mib']:.0f} | {m['startup_s']:.1f} | {m['machine_load']:.2f} |")
    # the two runs of one round ran back to back, so their ratio is the least disturbed by a changing machine load
    per_round = [o["samples_per_s"] / d["samples_per_s"] for o, d in zip(results["ours"], results["diffusers"])]
    ratio = statistics.median(per_round)
    fastest = med["diffusers"]["min_step_ms"] / med["ours"]["min_step_ms"]
    memory = med["ours"]["peak_mib"] / med["diffusers"]["peak_mib"]
    print(f"ratio ours/diffusers: {ratio:.2f}x samples/s (median over rounds of each round's ratio: "
          f"{', '.join(f'{r:.2f}' for r in per_round)}), {fastest:.2f}x by fastest step, {memory:.2f}x peak memory")
    print(json.dumps({"ratio": ratio, "per_round": per_round, "memory_ratio": memory, "results": results}))


if __name__ == "__main__":
    main()
