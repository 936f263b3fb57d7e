"""`ldm-generate`: text-to-image, img2img and inpainting from the command line.

    ldm-generate "a large red circle in the center on a black background"   # the bundled 32-px shapes demo
    ldm-generate "a red car" --model DIR --cfg 7.5 --negative "blurry"
    ldm-generate "a red car at night" --model DIR --init-image car.png --strength 0.6
    ldm-generate "a blue door" --model DIR --init-image house.png --mask door-mask.png
    ldm-generate --from-png outputs/00012-42-a-red-car.png --model DIR      # replay an image's settings
    ldm-generate "a red car" --model DIR --hires-scale 2 --hires-strength 0.5   # hires fix: 512 -> 1024 px
    ldm-generate --prompts-file prompts.txt --model DIR --outdir out      # many prompts; a rerun resumes

stdout carries only the paths of the written PNGs, one a line (so `ldm-generate ... | xargs ...` works); logs,
warnings and the progress bar go to stderr. Every bad input is found before any work is done and reported in one
line (`error: ...`, exit code 2) without writing a file.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ldm.errors import UserError, exit_on_user_error

log = logging.getLogger("ldm.generate")

# defaults for every option that a --from-png replay may fill in (the parser's own defaults are None, so that an
# option the user typed can be told from one left out: explicit > PNG > these)
DEFAULTS: dict[str, Any] = {
    "negative": "", "steps": 25, "cfg": 7.5, "sampler": "euler_a", "karras": False, "seed": None,
    "height": None, "width": None, "strength": None, "mask_blur": 4, "guidance_rescale": 0.0, "model": None,
    "hires_scale": None, "hires_strength": None, "hires_steps": None, "hires_upscaler": None,
    "lora_hashes": None,
    "clip_skip": 1,
}
# GenerationParams field -> CLI option (dest) for the values a PNG can carry
PNG_TO_ARGS = {
    "prompt": "prompt", "negative_prompt": "negative", "steps": "steps", "sampler": "sampler", "karras": "karras",
    "cfg": "cfg", "seed": "seed", "width": "width", "height": "height", "model": "model", "strength": "strength",
    "mask_blur": "mask_blur", "guidance_rescale": "guidance_rescale", "lora_hashes": "lora_hashes",
    "clip_skip": "clip_skip",
    "hires_scale": "hires_scale", "hires_strength": "hires_strength", "hires_steps": "hires_steps",
    "hires_upscaler": "hires_upscaler",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit code 2 like every other bad input, not usage + error
        raise UserError(f"{message} (see ldm-generate --help)")


def build_parser() -> argparse.ArgumentParser:
    from ldm import prompts_file
    from ldm.pipeline import hires
    from ldm.pipeline.samplers import SAMPLERS
    from ldm.pipeline.validation import MAX_SIZE, MIN_SIZE

    p = _Parser(
        prog="ldm-generate",
        description="Generate images with a diffusers-format Stable Diffusion 1.x/2.x model: txt2img, img2img "
        "(--init-image) and inpainting (--init-image --mask). Writes PNGs with A1111-style 'parameters' metadata "
        "and prints their paths on stdout.",
        epilog="examples:\n" + "\n".join(l for l in __doc__.splitlines() if l.startswith("    ldm-generate")),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("prompt", nargs="?", default=None,
                   help="what to draw, in A1111 syntax: (word:1.2), (word), [word], BREAK; any length (see the "
                   "README's 'Prompt syntax'). May come from --from-png instead")
    p.add_argument("--negative", "--negative-prompt", dest="negative", default=None,
                   help="negative prompt: used as the unconditional branch of guidance (default: empty)")
    p.add_argument("--model", default=None,
                   help="diffusers-format model directory (model_index.json, unet/, vae/, text_encoder/, tokenizer/, "
                   "scheduler/), a single SD 1.x/2.x .safetensors file in the original layout, or a hub id; weights "
                   "must be safetensors (pickle .bin/.ckpt files are refused). Default: "
                   "shapes-32px-demo, the bundled 32-px toy model (one shape on a plain background)")
    p.add_argument("--vae", default=None,
                   help="replace the model's VAE: a VAE .safetensors file (original or diffusers names) or a "
                   "diffusers VAE directory")
    p.add_argument("--prediction-type", default=None, choices=["epsilon", "v_prediction"],
                   help="override what the U-Net predicts (SD 2.x 768 models: v_prediction); default: the model's "
                   "scheduler config, a NAME.yaml next to a single file, or the detected family's")
    g = p.add_argument_group("sampling")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default 25)")
    g.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance scale w >= 0 (default 7.5); 1 = no guidance (one U-Net branch)")
    g.add_argument("--guidance-rescale", type=float, default=None,
                   help="guidance rescale phi in [0, 1] (Lin et al. 2023; helps v-prediction models) (default 0)")
    g.add_argument("--sampler", default=None, help=f"one of: {', '.join(SAMPLERS)} (default euler_a), or "
                   "AUTOMATIC1111's name for one, case-insensitive: 'Euler a', 'DPM++ 2M Karras', 'DDIM', 'PLMS', ...")
    g.add_argument("--karras", action=argparse.BooleanOptionalAction, default=None,
                   help="Karras sigma spacing (euler, dpmpp_2m, unipc, lms, heun); --no-karras overrides a --from-png")
    g.add_argument("--clip-skip", type=int, default=None,
                   help="A1111's Clip skip: N > 1 uses the text encoder's hidden state N - 1 layers before its usual "
                   "one, then its final layer norm (default 1 = the usual layer; 2 is common for anime SD 1.x models)")
    g.add_argument("--seed", type=int, default=None,
                   help="seed of the first image; image i uses seed + i whatever the batch size (default/-1: random)")
    g.add_argument("--num-images", type=int, default=1, help="how many images (default 1)")
    g.add_argument("--batch-size", type=int, default=1, help="images per U-Net batch: memory vs speed, same pixels (default 1)")
    g.add_argument("--height", type=int, default=None,
                   help=f"pixels, a multiple of the VAE factor (8 for SD), {MIN_SIZE}..{MAX_SIZE} (default: the init "
                   "image's size rounded down to that multiple, else the model's native size, 512 for SD 1.x)")
    g.add_argument("--width", type=int, default=None, help="as --height")
    hires.add_arguments(p)
    i = p.add_argument_group("img2img and inpainting")
    i.add_argument("--init-image", default=None, help="start from this image (img2img); with --mask: inpainting")
    i.add_argument("--strength", type=float, default=None,
                   help="share of the schedule re-noised, in (0, 1]: strength 0.6 with 25 steps runs 15 steps "
                   "(default 0.75 for img2img, 1.0 for inpainting)")
    i.add_argument("--mask", default=None,
                   help="inpainting mask, white = repaint. A mask of another size than the init image is resized to "
                   "it (nearest neighbour) with a warning naming both sizes. Pixels outside the mask are kept "
                   "bit for bit: the result is pasted back onto the init image")
    i.add_argument("--mask-blur", type=int, default=None,
                   help="feather the paste-back over this many px inward from the mask edge, so pixels outside the "
                   "mask are never touched (default 4; 0 = hard edge)")
    lo = p.add_argument_group("LoRA adapters")
    lo.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                    help="merge a LoRA (.safetensors, diffusers/peft or kohya layout) at SCALE (default 1); repeat "
                    "to stack several. Recorded in the PNG as a <lora:NAME:SCALE> tag and its 'Lora hashes' entry")
    lo.add_argument("--lora-dir", default=None,
                    help="where A1111 tags in the prompt, <lora:NAME:WEIGHT>, find NAME.safetensors (searched "
                    "below too); a --from-png replay of an image made with LoRAs needs it")
    d = p.add_argument_group("device and precision")
    d.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu; the default), cpu, cuda, cuda:N, mps")
    d.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="auto (default) = fp16 on a GPU, fp32 on the CPU; fp16 on the CPU falls back to fp32 with a warning. "
                   "An fp16 VAE decode that gives NaN is redone in fp32")
    d.add_argument("--vae-tiling", action="store_true", help="decode in tiles (large images in less memory)")
    d.add_argument("--compile", nargs="?", const="regional", default=None, choices=["regional", "full"],
                   help="torch.compile the U-Net: regional (the default for a bare --compile: each transformer block "
                   "compiled once, seconds of warm-up) or full (the whole U-Net, a longer warm-up)")
    o = p.add_argument_group("output")
    o.add_argument("--outdir", default="outputs",
                   help="PNGs go here as NNNNN-<seed>-<prompt>.png, numbered after the highest existing one, never "
                   "overwriting (default outputs/)")
    o.add_argument("--from-png", default=None,
                   help="replay a PNG's 'parameters' (prompt, seed, sampler, ...); options given here override them")
    o.add_argument("--quiet", "-q", action="store_true", help="no progress bar or info logs (warnings still shown)")
    prompts_file.add_arguments(p)
    return p


def resolve_args(args: argparse.Namespace) -> dict[str, Any]:
    """Merge explicit options > --from-png values > defaults, into one dict of option values."""
    from ldm.pipeline.samplers import sampler_from_label

    values = dict(DEFAULTS)
    given = {k for k, v in vars(args).items() if v is not None}
    if args.from_png:
        from ldm.pipeline.a1111 import replay_values

        from_png = replay_values(args.from_png, given)
        if from_png.get("strength") is not None and not args.init_image:
            raise UserError(
                f"'{args.from_png}' was made from an init image (Denoising strength: {from_png['strength']}): pass "
                "--init-image FILE (and --mask FILE if it was inpainted) to replay it"
            )
        if from_png.get("mask_blur") is not None and not args.mask:
            raise UserError(f"'{args.from_png}' was inpainted (it has a Mask blur): pass --mask FILE to replay it")
        values.update({PNG_TO_ARGS[k]: v for k, v in from_png.items() if k in PNG_TO_ARGS})
    values.update({k: v for k, v in vars(args).items() if v is not None or k not in values})
    # A1111's sampler names ('DPM++ 2M Karras') -> ours; an explicit --sampler brings its own Karras choice
    values["sampler"], karras = sampler_from_label(values["sampler"])
    values["karras"] = karras or bool(values["karras"])
    for side in ("height", "width"):
        if values[side] is not None and values[side] <= 0:
            raise UserError(f"--{side} {values[side]} is not a size: give pixels (a multiple of the VAE factor), or "
                            "leave it out for the init image's or the model's size")
    if values.get("prompt") is None and not getattr(args, "prompts_file", None):
        raise UserError('no prompt given: ldm-generate "a red car" --model DIR (or --from-png FILE)')
    if values["seed"] is None or values["seed"] == -1:
        from ldm.pipeline.seeds import random_seed

        values["seed"] = random_seed()
    return values


def _setup_logging(quiet: bool) -> Callable[[], None]:
    """Our logs to stderr ('warning: ...' for warnings, plain text for info); library progress bars off.
    Returns a function that undoes the logger changes (main() may run many times in one process, e.g. in tests)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    root = logging.getLogger("ldm")
    saved = (root.level, root.propagate)
    root.addHandler(handler)
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.propagate = False

    def restore() -> None:
        root.removeHandler(handler)
        root.level, root.propagate = saved

    # per-file "Loading weights" bars from transformers/diffusers are noise next to ours
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    return restore


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        return msg if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {msg}"


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # warnings from our own code (e.g. a truncated prompt naming its dropped words) as one clean line
    print(f"warning: {message}", file=sys.stderr, flush=True)


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    restore_logging = _setup_logging(args.quiet)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            run(args)
    finally:
        restore_logging()


def run(args: argparse.Namespace) -> list[Path]:
    """Validate everything, then load the model, generate and save. Returns the written paths."""
    if args.prompts_file:
        from ldm.prompts_file import run_prompts_file

        return run_prompts_file(args)
    import torch

    from ldm.demo import NAME as DEMO_NAME
    from ldm.demo import NOTICE as DEMO_NOTICE
    from ldm.lora.prompt_tags import check_lora_inputs, parse_lora_hashes
    from ldm.pipeline import images as im
    from ldm.pipeline import hires as hr
    from ldm.pipeline.device import dtype_name, pick_device, pick_dtype
    from ldm.pipeline.loading import (
        DEFAULT_MODEL,
        check_model,
        load_components,
        read_default_size,
        read_vae_factor,
        resolve_model,
    )
    from ldm.pipeline.output import check_writable, save_png
    from ldm.pipeline.pipeline import DEFAULT_STRENGTH, Pipeline
    from ldm.pipeline.samplers import check_sampler
    from ldm.pipeline.validation import check_request, pick_size
    from ldm.text.prompt_syntax import check_prompt

    v = resolve_args(args)
    # 1. arguments that need no file: fail before touching the disk
    check_sampler(v["sampler"], bool(v["karras"]))
    check_prompt(v["prompt"], "prompt")
    check_prompt(v["negative"], "negative prompt")
    if v["clip_skip"] < 1:
        raise UserError(f"--clip-skip must be at least 1 (1 = the text encoder's usual layer), got {v['clip_skip']}")
    if args.mask and not args.init_image:
        raise UserError("--mask needs --init-image (the image to inpaint)")
    if v["strength"] is not None and not args.init_image:
        raise UserError("--strength only applies with --init-image")
    strength = v["strength"] if v["strength"] is not None else (
        None if not args.init_image else 1.0 if args.mask else DEFAULT_STRENGTH)
    hires = hr.from_values(v)
    if hires is not None:
        if args.init_image:
            raise UserError("the hires fix is for txt2img: drop --hires-scale or --init-image")
        hires.check(v["steps"], v["height"] or 8, v["width"] or 8, 1)  # again below, at the real size
    check_request(  # sizes checked again below, against the model's VAE factor
        steps=v["steps"], cfg=v["cfg"], height=v["height"] or 512, width=v["width"] or 512, vae_factor=1,
        strength=strength, sampler=v["sampler"], karras=bool(v["karras"]), num_images=args.num_images,
        batch_size=args.batch_size, seed=v["seed"], guidance_rescale=v["guidance_rescale"], mask_blur=v["mask_blur"],
    )
    device = pick_device(args.device)
    # 2. files: output directory, images, model (all before any weight is loaded)
    outdir = check_writable(args.outdir)
    init = im.load_image(args.init_image) if args.init_image else None
    mask = im.load_mask(args.mask) if args.mask else None
    lora_hashes = parse_lora_hashes(v["lora_hashes"] or "")
    loras = check_lora_inputs(args.lora, v["prompt"], args.lora_dir, lora_hashes)
    v["model"] = v["model"] or DEFAULT_MODEL
    try:
        root = resolve_model(v["model"])
        check_model(root)
    except UserError as e:
        if args.from_png and args.model is None and v["model"] != DEFAULT_MODEL:
            from ldm.pipeline.a1111 import model_hint

            raise model_hint(e, args.from_png, v["model"]) from None
        raise
    if args.vae:
        from ldm.singlefile.load import check_vae_source

        check_vae_source(args.vae)
    if v["model"] == DEMO_NAME:
        log.info(DEMO_NOTICE)
    factor = read_vae_factor(root)
    native = read_default_size(root, args.prediction_type)
    height, width = pick_size(init.size if init else None, v["height"], v["width"], factor, native)
    check_request(steps=v["steps"], cfg=v["cfg"], height=height, width=width, vae_factor=factor, strength=strength,
                  sampler=v["sampler"], karras=bool(v["karras"]), num_images=args.num_images,
                  batch_size=args.batch_size, seed=v["seed"])
    if hires is not None:
        hires.check(v["steps"], height, width, factor)
    dtype = pick_dtype(args.dtype, device)

    # 3. the work
    start = time.perf_counter()
    log.info("loading %s on %s (%s)", v["model"], device, dtype_name(dtype))
    components = load_components(root, str(v["model"]), device, dtype, vae=args.vae,
                                 prediction_type=args.prediction_type)
    pipe = Pipeline(components, device, dtype, vae_tiling=args.vae_tiling, compile_unet=args.compile)
    for path, scale in loras:
        pipe.load_lora(path, scale)
    log.info("loaded in %.1fs; generating %d image(s) at %dx%d, seeds %d..%d", time.perf_counter() - start,
             args.num_images, width, height, v["seed"], v["seed"] + args.num_images - 1)
    written: list[Path] = []

    def save(image, params) -> None:
        path = save_png(image, params, outdir)
        written.append(path)
        print(path, flush=True)  # the only thing on stdout

    start = time.perf_counter()
    with torch.inference_mode():
        pipe(
            v["prompt"], v["negative"], steps=v["steps"], cfg=v["cfg"], sampler=v["sampler"], karras=bool(v["karras"]),
            seed=v["seed"], num_images=args.num_images, batch_size=args.batch_size, height=height, width=width,
            init_image=init, mask=mask, strength=strength, mask_blur=v["mask_blur"],
            guidance_rescale=v["guidance_rescale"], clip_skip=v["clip_skip"], hires=hires,
            show_progress=not args.quiet, on_image=save, lora_dir=args.lora_dir, lora_hashes=lora_hashes,
        )
    seconds = time.perf_counter() - start
    log.info("%d image(s) in %.1fs (%.2f s/image)", len(written), seconds, seconds / max(1, len(written)))
    return written


if __name__ == "__main__":
    main()
