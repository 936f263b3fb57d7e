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

Each trainer runs unmodified in its own subprocess, through a small wrapper (bench/peer_runner.py, shared with the
stage-1 twin bench_vs_diffusers_vae.py) that sets the thread count and times every optimizer step with torch's global
step hook (`register_optimizer_step_post_hook`); samples/s is the batch size over the median step time after
`--warmup` steps, so start-up (imports, model loading, dataset preparation, our latent cache build, the final save) is
excluded and shown separately as "start -> first step". Peak memory is the process's peak resident set (VmHWM) at its
last timed step on CPU, `torch.cuda.max_memory_allocated` on CUDA.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from peer_runner import child_main, peer_script, print_speed_table, run_child, speed

ROOT = Path(__file__).resolve().parents[1]
RAW_URL = "https://raw.githubusercontent.com/huggingface/diffusers/v{version}/examples/text_to_image/train_text_to_image.py"
ARMS = ("ours", "diffusers")


# ---------------------------------------------------------------------------------------------------- the inputs


def diffusers_script(path: str | None, work: Path) -> Path:
    import diffusers

    return peer_script(
        path, RAW_URL.format(version=diffusers.__version__), work / f"train_text_to_image-v{diffusers.__version__}.py",
        "fetch examples/text_to_image/train_text_to_image.py at a released tag by hand (e.g. `git show "
        "v0.40.0:examples/text_to_image/train_text_to_image.py > t2i.py` in a diffusers clone) and pass "
        "--diffusers-script t2i.py",
    )


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
    shutil.rmtree(out / name, ignore_errors=True)
    data = run_child(Path(__file__), name, argv, args.threads, args.device, out)
    if len(data["steps"]) < args.warmup + args.steps + 1:
        sys.exit(f"error: the {name} trainer took {len(data['steps'])} optimizer steps, expected "
                 f"{args.warmup + args.steps + 1}")
    return speed(data, args.warmup, args.steps, args.batch_size, args.device)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        child_main(sys.argv[2:])
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
    print_speed_table(med, ARMS)
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
