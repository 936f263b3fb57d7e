"""fp32 vs bf16 on the CPU: seconds per image (ours and diffusers' StableDiffusionPipeline on the same weights) and
how close the bf16 image is to the fp32 one. The measurement behind `--dtype auto` (ldm/pipeline/device.py).

    python bench/bench_cpu_dtype.py                # SD 1.5-sized random model, 256 px, 4 steps of euler_a, cfg 7.5
    python bench/bench_cpu_dtype.py --tiny         # ldm/pipeline/tiny.py's model, 64 px: seconds (the test's mode)

Both pipelines share the very same modules (cast in place from fp32 to bf16, so the bf16 weights are the fp32 ones
rounded); runs alternate (ours, diffusers, ...) after one warm-up each, and the median of `--repeats` is reported,
wall and process CPU time (the steadier one on a shared machine).

bf16 speed is only timed where the CPU multiplies bf16 in hardware (`cpu_has_native_bf16`) or with
`--time-bf16 yes`: elsewhere torch's bf16 convolutions take a generic path some 100x slower than fp32 (the table's
first line measures one), and an SD 1.5 image would take over an hour. The closeness check still runs
there, with every bf16 convolution computed in fp32 from the bf16 inputs and weights and rounded back to bf16: what
a native bf16 kernel does (bf16 products are exact in fp32, accumulation is fp32), up to summation order.

Closeness on random weights: a random U-Net does not pull the latents towards images, and a random VAE decodes to
low-contrast noise, so a whole-image PSNR with peak 255 says little by itself. Three figures make it readable:
- the bf16 image against the fp32 one (PSNR, max abs diff in uint8 levels), next to the same PSNR between two
  unrelated images (fp32, seeds s and s + 1): the floor, what "no resemblance at all" scores on this model;
- the VAE decoder alone (bf16 decode of the fp32 run's final latents against the fp32 decode): the part of the error
  that does not pass through the sampler, as it would on trained weights;
- one U-Net call on the same input, bf16 against fp32: ||eps_bf16 - eps_fp32|| / ||eps_fp32||, to set against
  bf16's rounding unit 2^-8 = 0.39%.
"""

from __future__ import annotations

import argparse
import copy
import platform
import shlex
import statistics
import sys
import time
import warnings
from contextlib import nullcontext
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from random_models import sd15_pipeline  # noqa: E402  (bench/ is on sys.path when this script runs)


class Bf16ConvInFp32(TorchFunctionMode):
    """bf16 convolutions computed in fp32 from the bf16 values and rounded back to bf16 (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d and args[0].dtype == torch.bfloat16:
            up = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
            return func(*up, **kwargs).to(torch.bfloat16)
        return func(*args, **kwargs)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """uint8 images -> PSNR in dB with peak 255 (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def conv_seconds(dtype: torch.dtype, channels: int, side: int) -> float:
    """One 3x3 convolution of SD's first U-Net block (batch 2: cfg's two branches), median of 3."""
    x = torch.randn(2, channels, side, side, dtype=dtype)
    w = torch.randn(channels, channels, 3, 3, dtype=dtype)
    times = []
    with torch.inference_mode():
        F.conv2d(x, w, padding=1)
        for _ in range(3):
            start = time.perf_counter()
            F.conv2d(x, w, padding=1)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the tiny random model at 64 px: seconds, for a test")
    ap.add_argument("--size", type=int, default=None, help="image side in px (default 256; 64 with --tiny)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--sampler", default="euler_a")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per pipeline and dtype (median reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--time-bf16", choices=["auto", "yes", "no"], default="auto",
                    help="time bf16 generation: auto = only on a CPU with native bf16 (default)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers import __version__ as diffusers_version
    from diffusers.utils import logging as diffusers_logging

    from ldm.models.components import Components
    from ldm.pipeline.device import cpu_has_native_bf16
    from ldm.pipeline.pipeline import Pipeline
    from ldm.pipeline.samplers import make_scheduler
    from ldm.pixels import float_to_uint8, tensor_to_float_images
    from ldm.text.encoder import FrozenTextEncoder

    diffusers_logging.set_verbosity_error()  # .to(bf16) of a model built in code warns that nothing is kept in fp32

    size = args.size or (64 if args.tiny else 256)
    native = cpu_has_native_bf16()
    time_bf16 = args.time_bf16 == "yes" or (args.time_bf16 == "auto" and native)
    cpu = torch.device("cpu")
    prompt, negative, seed = "a red car on a wet street at night", "blurry", 42

    start = time.perf_counter()
    ref = sd15_pipeline("tiny" if args.tiny else "full", cpu, torch.float32)
    ref.set_progress_bar_config(disable=True)
    print(f"model built in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    vae_fp32 = copy.deepcopy(ref.vae)  # the decoder-alone check decodes in both dtypes
    side = size // 2 ** (len(ref.vae.config.block_out_channels) - 1)  # the latents' side
    shape = (2, ref.unet.config.in_channels, side, side)  # (2, C, h, w): cfg's two branches
    torch.manual_seed(0)
    probe_x, probe_ctx = torch.randn(shape), torch.randn(2, 77, ref.unet.config.cross_attention_dim)
    probe_t = torch.tensor([500, 500])

    def ours_for(dtype: torch.dtype) -> Pipeline:
        ref.to(dtype=dtype)
        parts = Components(unet=ref.unet, vae=ref.vae, scheduler_config=dict(ref.scheduler.config), name="random",
                           text_encoder=FrozenTextEncoder.from_clip(ref.tokenizer, ref.text_encoder))
        return Pipeline(parts, cpu, dtype)

    def run_ours(pipe: Pipeline, s: int = seed):
        return pipe(prompt, negative, steps=args.steps, cfg=args.cfg, sampler=args.sampler, seed=s, num_images=1,
                    height=size, width=size, show_progress=False)

    def run_diffusers(pipe: Pipeline) -> np.ndarray:
        ref.scheduler = make_scheduler(args.sampler, pipe.scheduler_config)
        gen = torch.Generator("cpu").manual_seed(seed)
        return ref(prompt, negative_prompt=negative, num_inference_steps=args.steps, guidance_scale=args.cfg,
                   height=size, width=size, generator=gen, output_type="np").images

    def timed(fn) -> tuple[float, float, object]:
        wall, cpu_time = time.perf_counter(), time.process_time()
        out = fn()
        return time.perf_counter() - wall, time.process_time() - cpu_time, out

    def decode(vae, latents: torch.Tensor) -> np.ndarray:
        """Unscaled latents (1, C, h, w) -> uint8 image, decoded in the VAE's own dtype."""
        with torch.inference_mode():
            x = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return float_to_uint8(tensor_to_float_images(x))[0]

    rows, images, latents, eps = [], {}, {}, {}
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        pipe = ours_for(dtype)
        stand_in = Bf16ConvInFp32() if (dtype == torch.bfloat16 and not native) else nullcontext()
        with torch.inference_mode(), stand_in:
            eps[name] = ref.unet(probe_x.to(dtype), probe_t, probe_ctx.to(dtype)).sample.float()
        if dtype == torch.float32 or time_bf16:
            ours, theirs = partial(run_ours, pipe), partial(run_diffusers, pipe)
            timed(ours), timed(theirs)  # warm-up
            t_ours, t_ref = [], []
            for _ in range(args.repeats):
                *a, result = timed(ours)
                *b, _ = timed(theirs)
                t_ours.append(a)
                t_ref.append(b)
                print(f"{name}: ours {a[0]:.2f} s, diffusers {b[0]:.2f} s", file=sys.stderr, flush=True)
            wall_ours, cpu_ours = (statistics.median(t[i] for t in t_ours) for i in (0, 1))
            wall_ref, cpu_ref = (statistics.median(t[i] for t in t_ref) for i in (0, 1))
            rows.append(dict(dtype=name, ours=wall_ours, diffusers=wall_ref, ratio=wall_ours / wall_ref,
                             cpu_ratio=cpu_ours / cpu_ref, timed=True))
        else:
            with Bf16ConvInFp32():
                result = run_ours(pipe)
            rows.append(dict(dtype=name, timed=False))
        images[name], latents[name] = float_to_uint8(result.decoded)[0], result.latents
    ref.to(dtype=torch.float32)
    unrelated = float_to_uint8(run_ours(ours_for(torch.float32), seed + 1).decoded)[0]
    vae_bf16 = copy.deepcopy(vae_fp32).to(torch.bfloat16)
    with Bf16ConvInFp32() if not native else nullcontext():
        decoder_bf16 = decode(vae_bf16, latents["fp32"])
    decoder_fp32 = decode(vae_fp32, latents["fp32"])
    closeness = dict(
        image_psnr=psnr(images["bf16"], images["fp32"]),
        image_max_diff=int(np.abs(images["bf16"].astype(int) - images["fp32"].astype(int)).max()),
        unrelated_psnr=psnr(unrelated, images["fp32"]),
        decoder_psnr=psnr(decoder_bf16, decoder_fp32),
        decoder_max_diff=int(np.abs(decoder_bf16.astype(int) - decoder_fp32.astype(int)).max()),
        unet_rel_error=float((eps["bf16"] - eps["fp32"]).norm() / eps["fp32"].norm()),
        image_std=float(images["fp32"].std()),
    )
    channels = ref.unet.config.block_out_channels[0]
    conv = {name: conv_seconds(dt, channels, side) for name, dt in (("fp32", torch.float32),
                                                                        ("bf16", torch.bfloat16))}

    print(f"Command: `python {shlex.join(['bench/bench_cpu_dtype.py', *sys.argv[1:]])}`\n")
    caps = "native bf16 (AVX512-BF16 or AMX)" if native else "no native bf16"
    print(f"Machine: {platform.processor() or platform.machine()}, {caps}, {torch.get_num_threads()} torch threads; "
          f"torch {torch.__version__}, diffusers {diffusers_version}")
    print(f"Model: {'tiny random SD' if args.tiny else 'random SD 1.5-sized (U-Net 860M, VAE kl-f8, CLIP ViT-L/14)'}; "
          f"{size}x{size}, {args.sampler}, {args.steps} steps, cfg {args.cfg}, seed {seed}; median of "
          f"{args.repeats} alternating runs after one warm-up each\n")
    print(f"One {channels}-channel 3x3 convolution at {side}x{side}, batch 2: fp32 {conv['fp32']:.4f} s, "
          f"bf16 {conv['bf16']:.4f} s ({conv['bf16'] / conv['fp32']:.1f}x)\n")
    print("| dtype | ours s/image | diffusers s/image | ours / diffusers (wall) | ours / diffusers (CPU time) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        if r["timed"]:
            print(f"| {r['dtype']} | {r['ours']:.2f} | {r['diffusers']:.2f} | {r['ratio']:.3f} | {r['cpu_ratio']:.3f} |")
        else:
            print(f"| {r['dtype']} | not timed: no native bf16 | - | - | - |")
    if all(r["timed"] for r in rows):
        print(f"\nbf16 / fp32, ours: {rows[1]['ours'] / rows[0]['ours']:.2f}x seconds per image")
    c = closeness
    how = "native bf16 kernels" if native else "bf16 with convolutions computed in fp32 and rounded to bf16"
    print(f"\nCloseness of bf16 to fp32 ({how}; uint8 images, fp32 image std {c['image_std']:.1f} levels):\n")
    print("| comparison | PSNR dB | max abs diff |")
    print("|---|---:|---:|")
    print(f"| whole image, bf16 vs fp32 (same seed) | {c['image_psnr']:.1f} | {c['image_max_diff']} |")
    print(f"| floor: two unrelated fp32 images (seeds {seed}, {seed + 1}) | {c['unrelated_psnr']:.1f} | - |")
    print(f"| VAE decoder alone: bf16 vs fp32 decode of the same latents | {c['decoder_psnr']:.1f} | "
          f"{c['decoder_max_diff']} |")
    print(f"\nOne U-Net call, same input: ||eps_bf16 - eps_fp32|| / ||eps_fp32|| = {c['unet_rel_error']:.4f} "
          f"(bf16's rounding unit: 0.0039)")
    return [*rows, closeness]


if __name__ == "__main__":
    main()
