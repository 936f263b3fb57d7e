"""The GPU suite: SD 1.5 and SDXL inference (ours vs diffusers, eager and compiled), U-Net training throughput and
MFU, and the peak memory of an SDXL LoRA step. Under 10 minutes on one H100; `bench/gpu_suite.sh` runs it.

    python bench/gpu_suite.py --size full --device cuda [--dtype bf16] [--steps 20] [--record]
    python bench/gpu_suite.py --size tiny --device cpu --no-compile      # every row in seconds (tests/test_gpu_suite.py)

Models are random, built from the published configs (`bench/random_models.py`): the FLOPs, memory and kernels of
SD 1.5 and SDXL base, not their images. Sections:

(a) inference, seconds per image at 512 px (SD 1.5) and 1024 px (SDXL), euler_a, cfg 7.5, `--steps` steps, batch 1:
    diffusers' StableDiffusion(XL)Pipeline, and ours opened as a user opens it (`Pipeline.open(inspect_model(DIR))`)
    from the same weights saved to DIR; eager, then with the U-Net compiled the way `ldm-generate --compile` does
    (diffusers' regional `compile_repeated_blocks(dynamic=True)`, applied to both). The first call (compile
    included) and the median of `--repeats` after it; runs alternate ours/diffusers. diffusers' first call compiles
    first, so ours may reuse its compiled block code (the same diffusers classes): compare the compiled steady
    figures, not the first calls. "max diff" compares the two pipelines' images (decoded floats in [0, 1]).
(b) U-Net training: one step of train_ldm.py's loss (`diffusion_loss`) + backward + AdamW on random tensors shaped
    as cached latents and text states (SDXL: with its pooled text and 6 time ids), fp32 weights under bf16 autocast;
    samples/s over `--train-steps` after 2 warm-up steps. MFU = 3 x forward FLOPs per sample x samples/s / peak,
    peak = `--peak-tflops` (989 for an H100's dense bf16). Forward FLOPs per sample: the issue's figures at full size
    (SD 1.5 @ 512 px 0.80 TFLOP, SDXL @ 1024 px 6.76 TFLOP); the table also counts them with torch's FlopCounterMode
    (on the meta device: no memory, any size), forward and forward + backward, which checks both the given figures
    and the factor 3. At tiny size the counted figure is used (the MFU of a tiny model on a CPU against an H100's
    peak only shows that the arithmetic runs).
(c) SDXL LoRA step memory: our `ldm.lora.train.add_lora` (peft, rank 16 on to_q/to_k/to_v/to_out.0, frozen base in
    bf16, fp32 adapters), batch 1 at 1024 px, bf16 autocast, with gradient checkpointing off and on: peak
    `torch.cuda.max_memory_allocated` over one step (on a CPU: the process's peak resident set, never reset, so only
    a smoke figure).

Prints markdown tables; `--record` appends them to bench/RESULTS.md with the date, machine and command.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from random_models import sd15_pipeline, sdxl_pipeline  # noqa: E402  (bench/ is on sys.path when this runs)

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
# forward FLOPs per sample at the full sizes, as issue 25 gives them (checked against FlopCounterMode in the table)
GIVEN_FORWARD_FLOPS = {"sd15": 0.80e12, "sdxl": 6.76e12}
# (image side in px, latent side) per model and size; tiny models have a factor-2 VAE
SIDES = {("sd15", "full"): 512, ("sdxl", "full"): 1024, ("sd15", "tiny"): 64, ("sdxl", "tiny"): 64}
FACTOR = {"full": 8, "tiny": 2}
NAMES = {"sd15": "SD 1.5", "sdxl": "SDXL"}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM), MiB: the CPU's stand-in for peak GPU memory."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build(model: str, size: str, device: torch.device, dtype: torch.dtype):
    return (sd15_pipeline if model == "sd15" else sdxl_pipeline)(size, device, dtype)


# ---------------------------------------------------------------------------------------------- (a) inference

def inference_rows(model: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict]:
    from ldm.models.spec import inspect_model
    from ldm.pipeline.pipeline import Pipeline
    from ldm.pipeline.samplers import make_scheduler

    side = SIDES[(model, args.size)]
    steps = args.steps if args.size == "full" else min(args.steps, 2)
    prompt, negative, seed = "a red car on a wet street at night", "blurry", 42
    ref = build(model, args.size, device, dtype)
    ref.set_progress_bar_config(disable=True)
    directory = Path(tempfile.mkdtemp(prefix=f"gpu-suite-{model}-"))
    ref.save_pretrained(directory, safe_serialization=True)

    def open_ours() -> tuple[Pipeline | None, str]:
        try:
            return Pipeline.open(inspect_model(str(directory)), device, dtype), ""
        except Exception as e:  # noqa: BLE001 - our SDXL pipeline may not be there yet: say so in the row
            if model == "sdxl":
                return None, f"ours: SDXL not available ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
            raise

    ours, note = open_ours()
    shutil.rmtree(directory)  # loaded: the files (5 GB for SDXL in bf16) are not needed any more
    scheduler_config = dict(ref.scheduler.config)

    def run_ours() -> np.ndarray:
        return ours(prompt, negative, steps=steps, cfg=7.5, sampler="euler_a", seed=seed, num_images=1,
                    height=side, width=side, show_progress=False).decoded

    def run_diffusers() -> np.ndarray:
        ref.scheduler = make_scheduler("euler_a", scheduler_config)
        gen = torch.Generator("cpu").manual_seed(seed)
        return ref(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=7.5, height=side,
                   width=side, generator=gen, output_type="np").images

    def timed(fn) -> tuple[float, np.ndarray]:
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        return time.perf_counter() - start, out

    rows = []
    for mode in ("eager", "compile"):
        row = dict(section="inference", model=NAMES[model], mode=mode, px=side, steps=steps, note=note)
        if mode == "compile" and args.no_compile:
            rows.append({**row, "note": "not run (--no-compile)"})
            continue
        if mode == "compile":
            # what `Pipeline(compile_unet=True)` / `ldm-generate --compile` does, to both pipelines' U-Nets
            torch._dynamo.reset()
            ref.unet.compile_repeated_blocks(dynamic=True)
            if ours is not None:
                ours.unet.compile_repeated_blocks(dynamic=True)
        first_ref, img_ref = timed(run_diffusers)
        first_ours, img_ours = timed(run_ours) if ours is not None else (math.nan, None)
        t_ref, t_ours = [], []
        for _ in range(args.repeats):
            t_ref.append(timed(run_diffusers)[0])
            if ours is not None:
                t_ours.append(timed(run_ours)[0])
        rows.append({
            **row, "diffusers_first": first_ref, "diffusers_s": statistics.median(t_ref),
            "ours_first": first_ours, "ours_s": statistics.median(t_ours) if t_ours else math.nan,
            "max_diff": float(np.abs(img_ours - img_ref).max()) if img_ours is not None else math.nan,
        })
        print(f"inference {model} {mode}: {rows[-1]}", file=sys.stderr, flush=True)
    return rows  # the models go with this frame; main() frees the device's cache


# ---------------------------------------------------------------------------------------------- (b) training

class WithAddedCond(nn.Module):
    """An SDXL U-Net called as `diffusion_loss` calls an SD one, with its pooled text and time ids fixed."""

    def __init__(self, unet: nn.Module, added: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.unet, self.added = unet, added

    def forward(self, x, t, encoder_hidden_states):
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=self.added)


def training_inputs(unet: nn.Module, batch: int, latent_side: int, device: torch.device) -> tuple[nn.Module, dict]:
    """The U-Net as `diffusion_loss` calls it, and random latents (B, 4, h, w) and text states (B, 77, D)."""
    cfg = unet.config
    inputs = dict(x0=torch.randn(batch, cfg.in_channels, latent_side, latent_side, device=device),
                  text=torch.randn(batch, 77, cfg.cross_attention_dim, device=device))
    if cfg.addition_embed_type != "text_time":
        return unet, inputs
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    side = latent_side * 8
    added = dict(text_embeds=torch.randn(batch, pooled, device=device),
                 time_ids=torch.tensor([[side, side, 0, 0, side, side]] * batch, device=device, dtype=torch.float32))
    return WithAddedCond(unet, added), inputs


def count_flops(unet_config: dict, latent_side: int) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs per sample of a U-Net with this config, counted on the meta device."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        model, inputs = training_inputs(unet, 1, latent_side, torch.device("meta"))
        t = torch.tensor([500])
        counter = FlopCounterMode(display=False)
        with counter:
            model(inputs["x0"], t, inputs["text"])
        forward = counter.get_total_flops()
        counter = FlopCounterMode(display=False)
        with counter:
            model(inputs["x0"].requires_grad_(), t, inputs["text"]).sample.sum().backward()
        return float(forward), float(counter.get_total_flops())


def training_rows(model: str, args: argparse.Namespace, device: torch.device) -> list[dict]:
    from ldm.unet.objective import NoiseConfig, build_noise_scheduler, diffusion_loss

    latent_side = SIDES[(model, args.size)] // FACTOR[args.size]
    unet = _unet(model, args.size, device)
    config = dict(unet.config)
    counted_fwd, counted_fwd_bwd = count_flops(config, latent_side)
    forward = GIVEN_FORWARD_FLOPS[model] if args.size == "full" else counted_fwd
    batch = args.batch_sd15 if model == "sd15" else args.batch_sdxl
    if args.size == "tiny":
        batch = 2
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=device.type == "cuda")
    scheduler, noise = build_noise_scheduler(NoiseConfig()), NoiseConfig()
    autocast = torch.autocast(device.type, dtype=args.train_dtype, enabled=args.train_dtype != torch.float32)
    def step(step_model: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
        with autocast:
            loss = diffusion_loss(step_model, scheduler, inputs["x0"], inputs["text"], noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    while True:
        try:
            step_model, inputs = training_inputs(unet, batch, latent_side, device)
            for _ in range(2):
                step(step_model, inputs)
            sync(device)
            start = time.perf_counter()
            for _ in range(args.train_steps):
                step(step_model, inputs)
            sync(device)
            seconds = time.perf_counter() - start
            break
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            free(device)
            if batch == 1:
                raise
            print(f"training {model}: batch {batch} out of memory, trying {batch // 2}", file=sys.stderr)
            batch //= 2
    samples_per_s = batch * args.train_steps / seconds
    row = dict(section="training", model=NAMES[model], batch=batch, px=latent_side * FACTOR[args.size],
               samples_per_s=samples_per_s, forward_flops=forward, counted_forward_flops=counted_fwd,
               counted_backward_ratio=counted_fwd_bwd / counted_fwd,
               mfu=3 * forward * samples_per_s / (args.peak_tflops * 1e12),
               params=sum(p.numel() for p in unet.parameters()))
    print(f"training {model}: {row}", file=sys.stderr, flush=True)
    return [row]


def _unet(model: str, size: str, device: torch.device) -> nn.Module:
    """The model's U-Net alone, fp32, on `device` (built there)."""
    if size == "tiny":
        return build(model, size, torch.device("cpu"), torch.float32).unet.to(device)
    from random_models import sd15_unet, sdxl_unet

    torch.manual_seed(0)
    with torch.device(device):
        return sd15_unet() if model == "sd15" else sdxl_unet()


# ---------------------------------------------------------------------------------------------- (c) LoRA memory

def lora_rows(args: argparse.Namespace, device: torch.device) -> list[dict]:
    from ldm.lora.config import LoRAConfig
    from ldm.lora.train import add_lora
    from ldm.unet.objective import NoiseConfig, build_noise_scheduler, diffusion_loss

    latent_side = SIDES[("sdxl", args.size)] // FACTOR[args.size]
    rows = []
    for checkpointing in (False, True):
        unet = _unet("sdxl", args.size, device)
        params = add_lora(unet, LoRAConfig(enabled=True, rank=16, alpha=16), base_dtype=args.train_dtype)
        unet.train()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        scheduler, noise = build_noise_scheduler(NoiseConfig()), NoiseConfig()
        step_model, inputs = training_inputs(unet, 1, latent_side, device)
        free(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=args.train_dtype, enabled=args.train_dtype != torch.float32):
            loss = diffusion_loss(step_model, scheduler, inputs["x0"], inputs["text"], noise)
        loss.backward()
        optimizer.step()
        sync(device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mib()
        rows.append(dict(section="lora", model="SDXL", checkpointing="on" if checkpointing else "off", batch=1,
                         px=latent_side * FACTOR[args.size], peak_mib=peak, step_s=seconds,
                         trainable=sum(p.numel() for p in params)))
        print(f"lora: {rows[-1]}", file=sys.stderr, flush=True)
        del unet, optimizer, params, step_model, inputs, loss
        free(device)
    return rows


# ---------------------------------------------------------------------------------------------- tables

def fmt(x: float, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def tables(rows: list[dict], args: argparse.Namespace) -> str:
    out = ["| model | px | steps | mode | ours s/image | diffusers s/image | ours / diffusers | first call ours / "
           "diffusers (s) | max diff | note |", "|---|---:|---:|---|---:|---:|---:|---|---:|---|"]
    for r in (r for r in rows if r["section"] == "inference"):
        ratio = r.get("ours_s", math.nan) / r["diffusers_s"] if "diffusers_s" in r else math.nan
        out.append(f"| {r['model']} | {r['px']} | {r['steps']} | {r['mode']} | {fmt(r.get('ours_s'))} | "
                   f"{fmt(r.get('diffusers_s'))} | {fmt(ratio)} | {fmt(r.get('ours_first'), 1)} / "
                   f"{fmt(r.get('diffusers_first'), 1)} | {fmt(r.get('max_diff'), 4)} | {r['note']} |")
    out += ["", f"| model | px | batch | samples/s | forward TFLOP/sample used | counted forward TFLOP | counted "
                f"(fwd+bwd) / fwd | MFU (peak {args.peak_tflops:g} TFLOP/s) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in (r for r in rows if r["section"] == "training"):
        out.append(f"| {r['model']} ({r['params'] / 1e6:.0f}M) | {r['px']} | {r['batch']} | "
                   f"{r['samples_per_s']:.2f} | {r['forward_flops'] / 1e12:.4g} | "
                   f"{r['counted_forward_flops'] / 1e12:.4g} | {r['counted_backward_ratio']:.2f} | "
                   f"{100 * r['mfu']:.3g}% |")
    memory = "peak GPU memory (MiB)" if args.device.startswith("cuda") else "process peak RSS (MiB; CPU: not reset)"
    out += ["", f"| model | px | batch | gradient checkpointing | trainable (LoRA r16) | {memory} | step s |",
            "|---|---:|---:|---|---:|---:|---:|"]
    for r in (r for r in rows if r["section"] == "lora"):
        out.append(f"| {r['model']} | {r['px']} | {r['batch']} | {r['checkpointing']} | {r['trainable']:,} | "
                   f"{r['peak_mib']:.0f} | {r['step_s']:.2f} |")
    return "\n".join(out)


def machine(device: torch.device) -> str:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    return f"{where}; torch {torch.__version__}"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "full"], default="full")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16",
                    help="inference dtype; training's autocast and the LoRA base use it too, bf16 for fp16 (fp32: "
                    "no autocast, for CPUs without native bf16, where bf16 convolutions are ~20x slower)")
    ap.add_argument("--steps", type=int, default=20, help="sampling steps (tiny: at most 2)")
    ap.add_argument("--repeats", type=int, default=3, help="timed images per pipeline and mode (median)")
    ap.add_argument("--train-steps", type=int, default=5, help="timed training steps (after 2 warm-up steps)")
    ap.add_argument("--batch-sd15", type=int, default=16, help="SD 1.5 training batch (halved on out-of-memory)")
    ap.add_argument("--batch-sdxl", type=int, default=4, help="SDXL training batch (halved on out-of-memory)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100: 989)")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled inference rows")
    ap.add_argument("--parts", nargs="+", choices=["inference", "training", "lora"],
                    default=["inference", "training", "lora"])
    ap.add_argument("--record", action="store_true", help="append the tables to bench/RESULTS.md")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()  # building, saving and loading models: bars on every step
    transformers_logging.disable_progress_bar()
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    args.train_dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    start = time.perf_counter()
    rows: list[dict] = []
    for model in ("sd15", "sdxl"):
        if "inference" in args.parts:
            rows += inference_rows(model, args, device, dtype)
            free(device)
    for model in ("sd15", "sdxl"):
        if "training" in args.parts:
            rows += training_rows(model, args, device)
            free(device)
    if "lora" in args.parts:
        rows += lora_rows(args, device)
    minutes = (time.perf_counter() - start) / 60
    command = shlex.join(["python", "bench/gpu_suite.py", *(sys.argv[1:] if argv is None else argv)])
    text = (f"Command: `{command}`\n\nMachine: {machine(device)}; {args.size} size, inference in {args.dtype}, training "
            f"{'in fp32' if args.dtype == 'fp32' else 'under bf16 autocast'}; "
            f"whole suite {minutes:.1f} min\n\n{tables(rows, args)}\n")
    print(text)
    if args.record:
        date = datetime.date.today().isoformat()
        with open(RESULTS, "a", encoding="utf-8") as f:
            f.write(f"\n### GPU suite, {date} (`bench/gpu_suite.py`)\n\n{text}")
    return rows


if __name__ == "__main__":
    main()
