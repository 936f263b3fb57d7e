"""`ldm-generate`: text-to-image, img2img and inpainting from the command line.

    ldm-generate "a large red circle in the center on a black background"   # the bundled 32-px shapes demo
    ldm-generate "a red car" --model DIR --cfg 7.5 --negative "blurry"
    ldm-generate "a red car at night" --model DIR --init-image car.png --strength 0.6
    ldm-generate "a blue door" --model DIR --init-image house.png --mask door-mask.png
    ldm-generate --from-png outputs/00012-42-a-red-car.png --model DIR      # replay an image's settings
    ldm-generate "a red car" --model DIR --hires-scale 2 --hires-strength 0.5   # hires fix: 512 -> 1024 px
    ldm-generate "a red car" --model DIR --lora lcm-lora.safetensors --sampler lcm --steps 4 --cfg 1   # few-step
    ldm-generate "a cat" --model DIR --ip-adapter ip-adapter_sd15.safetensors --ip-image cat.png --ip-scale 0.6
    ldm-generate --prompts-file prompts.txt --model DIR --outdir out      # many prompts; a rerun resumes
    ldm-generate "a house" --model DIR --controlnet canny-cn/ --control-image photo.png --control-preprocess canny

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

from ldm.errors import OneLineArgumentParser, UserError, exit_on_user_error
from ldm.pipeline.request import FIELDS, GenerationRequest

log = logging.getLogger("ldm.generate")

def build_parser() -> argparse.ArgumentParser:
    from ldm.ip_adapter.options import add_arguments as add_ip_adapter_arguments
    from ldm.pipeline.hires import HIRES_STRENGTH, MAX_SCALE
    from ldm.pipeline.samplers import SAMPLERS, SCHEDULES
    from ldm.pipeline.validation import MAX_SIZE, MIN_SIZE

    p = OneLineArgumentParser(
        prog="ldm-generate",
        description="Generate images with a Stable Diffusion 1.x/2.x or SDXL model: txt2img, img2img "
        "(--init-image) and inpainting (--init-image --mask). Writes PNGs with A1111-style 'parameters' metadata "
        "and prints their paths on stdout.",
        epilog="examples:\n" + "\n".join(l for l in __doc__.splitlines() if l.startswith("    ldm-generate")),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("prompt", nargs="?", default=None,
                   help="what to draw, in A1111 syntax: (word:1.2), (word), [word], BREAK; any length (see the "
                   "docs/inference.md, 'Prompt syntax'). May come from --from-png instead")
    p.add_argument("--negative", "--negative-prompt", dest="negative_prompt", default=None,
                   help="negative prompt: used as the unconditional branch of guidance (default: empty)")
    p.add_argument("--model", default=None,
                   help="diffusers-format model directory (model_index.json, unet/, vae/, text_encoder/, tokenizer/, "
                   "scheduler/; SDXL: text_encoder_2/ too), a single SD 1.x/2.x or SDXL .safetensors file in the original "
                   "layout, or a hub id; weights "
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
                   "AUTOMATIC1111's name for one, case-insensitive: 'Euler a', 'DPM++ 2M Karras', 'DDIM', 'LCM', ...")
    g.add_argument("--schedule", default=None,
                   help=f"where the steps fall: {', '.join(SCHEDULES)} (A1111's Schedule type, ComfyUI's scheduler; "
                   "sgm_uniform for SDXL-Lightning/Turbo/Hyper-SD), or '' for the sampler's own (default)")
    g.add_argument("--karras", dest="schedule", action="store_const", const="karras",
                   help="= --schedule karras (euler, dpmpp_2m, unipc, lms, heun)")
    g.add_argument("--no-karras", dest="schedule", action="store_const", const="",
                   help="= --schedule '': the sampler's own spacing, overriding a --from-png's schedule")
    g.add_argument("--eta", type=float, default=None,
                   help="the tcd sampler's gamma in [0, 1]: 0 = deterministic, higher = more noise re-injected per "
                   "step (default 0.3; raise it with more steps)")
    g.add_argument("--clip-skip", type=int, default=None,
                   help="A1111's Clip skip: N > 1 uses the text encoder's hidden state N - 1 layers before its usual "
                   "one, then its final layer norm (default 1 = the usual layer; 2 is common for anime SD 1.x models); SDXL: "
                   "both towers' hidden state max(N, 2) from the end, as Forge (1 and 2 are SDXL's own layer)")
    g.add_argument("--seed", type=int, default=None,
                   help="seed of the first image; image i uses seed + i whatever the batch size (default/-1: random)")
    g.add_argument("--num-images", type=int, default=None, help="how many images (default 1)")
    g.add_argument("--batch-size", type=int, default=None, help="images per U-Net batch: memory vs speed, same pixels (default 1)")
    g.add_argument("--height", type=int, default=None,
                   help=f"pixels, a multiple of the VAE factor (8 for SD), {MIN_SIZE}..{MAX_SIZE} (default: the init "
                   "image's size rounded down to that multiple, else the model's native size, 512 for SD 1.x)")
    g.add_argument("--width", type=int, default=None, help="as --height")
    h = p.add_argument_group("hires fix (txt2img at --width x --height, then img2img at the scaled size)")
    h.add_argument("--hires-scale", type=float, default=None,
                   help=f"scale the image by this factor in [1, {MAX_SCALE:g}] with a second, img2img pass "
                   "(A1111's 'Hires upscale'); each side becomes int(side x scale) rounded down to the VAE factor")
    h.add_argument("--hires-strength", type=float, default=None,
                   help=f"the second pass's denoising strength in (0, 1] (default {HIRES_STRENGTH})")
    h.add_argument("--hires-steps", type=int, default=None,
                   help="steps the second pass runs, as A1111's Hires steps (default 0 = --steps)")
    h.add_argument("--hires-upscaler", default=None,
                   help="latent (default: bilinear on the latents) or lanczos (decode, resize, encode again)")
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
    x = p.add_argument_group("SDXL (micro-conditioning as diffusers takes it; sizes are HEIGHT WIDTH)")
    x.add_argument("--refiner", default=None, metavar="MODEL",
                   help="an SDXL refiner (directory or single file) that finishes the base's images from "
                   "--refiner-switch on (A1111's Refiner); '' replays a --from-png without its refiner")
    x.add_argument("--refiner-switch", type=float, default=None,
                   help="share of the schedule the base runs before the refiner takes over, in (0, 1) (default 0.8)")
    for name, what in (("original-size", "the size the model is told the image was before cropping (default: "
                        "the generation size)"), ("crop-top-left", "TOP LEFT: the crop the model is told was "
                        "taken (default 0 0)"), ("target-size", "the size the model is told to aim for (default: "
                        "the generation size)")):
        x.add_argument(f"--{name}", type=int, nargs=2, default=None, metavar=("A", "B"), help=what)
        x.add_argument(f"--negative-{name}", type=int, nargs=2, default=None, metavar=("A", "B"),
                       help=f"the negative branch's --{name} (default: the positive branch's; a crop 0 0)")
    x.add_argument("--aesthetic-score", type=float, default=None, help="the refiner's aesthetic score (default 6)")
    x.add_argument("--negative-aesthetic-score", type=float, default=None,
                   help="the refiner's negative-branch aesthetic score (default 2.5)")
    lo = p.add_argument_group("LoRA adapters")
    lo.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                    help="merge a LoRA (.safetensors, diffusers/peft or kohya layout) at SCALE (default 1); repeat "
                    "to stack several. Recorded in the PNG as a <lora:NAME:SCALE> tag and its 'Lora hashes' entry")
    lo.add_argument("--lora-dir", default=None,
                    help="where A1111 tags in the prompt, <lora:NAME:WEIGHT>, find NAME.safetensors (searched "
                    "below too); a --from-png replay of an image made with LoRAs needs it")
    e = p.add_argument_group("textual-inversion embeddings (used by writing their name in a prompt, as in A1111)")
    e.add_argument("--embeddings-dir", default=None, metavar="DIR",
                   help="A1111's embeddings/ folder: every .safetensors (and .pt/.bin of plain tensors) below it is "
                   "an embedding named by its file's stem, or by ComfyUI's embedding:NAME")
    e.add_argument("--embedding", action="append", default=[], metavar="FILE",
                   help="an embedding file, named by its stem; repeat for several")
    add_ip_adapter_arguments(p)  # --ip-adapter, --ip-image, --ip-scale, --ip-image-encoder
    c = p.add_argument_group("ControlNet (repeat --controlnet for several, their residuals summed; each option "
                             "below once for all units or once per --controlnet, in order)")
    c.add_argument("--controlnet", action="append", default=[], metavar="MODEL",
                   help="a ControlNet: a diffusers directory (config.json + diffusion_pytorch_model.safetensors), a "
                   ".safetensors file (original or diffusers names), or a name in --controlnet-dir")
    c.add_argument("--control-image", action="append", default=[], metavar="FILE",
                   help="the control image of each --controlnet (not stored in the PNG: a --from-png replay needs it)")
    c.add_argument("--control-weight", action="append", type=float, metavar="W",
                   help="residual scale in [0, 2] (default 1)")
    c.add_argument("--control-start", action="append", type=float, metavar="S",
                   help="share of the steps before the ControlNet acts, in [0, 1) (default 0)")
    c.add_argument("--control-end", action="append", type=float, metavar="E",
                   help="share of the steps after which it stops, in (0, 1] (default 1)")
    c.add_argument("--control-preprocess", action="append", metavar="NAME",
                   help="none (default: the image is the control map) or canny (edges, as A1111's canny module)")
    c.add_argument("--canny-low", action="append", type=float, metavar="N",
                   help="canny's low threshold, 1..255 (default 100)")
    c.add_argument("--canny-high", action="append", type=float, metavar="N",
                   help="canny's high threshold, 1..255 (default 200)")
    c.add_argument("--control-mode", action="append", metavar="MODE",
                   help="balanced (default), prompt ('My prompt is more important') or control ('ControlNet is more "
                   "important': the ControlNet on the conditional branch only, diffusers' guess mode)")
    c.add_argument("--control-resize", action="append", metavar="MODE",
                   help="a control image of another aspect ratio: crop (default: crop the centre, then resize), just "
                   "(stretch) or fill (fit inside, pad)")
    c.add_argument("--controlnet-dir", default=None, metavar="DIR",
                   help="where --controlnet names and a --from-png's ControlNet models are found (by file stem or "
                   "directory name, searched below too)")
    d = p.add_argument_group("device and precision")
    d.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu; the default), cpu, cuda, cuda:N, mps")
    d.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="auto (default) = fp16 on a GPU; on the CPU bf16 if it has native bf16 (AVX512-BF16 or AMX), "
                   "else fp32; fp32 = exact fp32 anywhere. fp16 on the CPU falls back to fp32 with a warning. An fp16 "
                   "VAE decode that gives NaN is redone in fp32")
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
    p.add_argument_group("prompt lists").add_argument(
        "--prompts-file", default=None, metavar="FILE",
        help="generate for every line of FILE: a prompt, or a JSON object such as {\"prompt\": \"a red car\", "
        "\"seed\": 7, \"cfg\": 5, \"width\": 512, \"count\": 4}. Resumable (a rerun skips the images already "
        "written) and split across processes under `accelerate launch -m ldm.generate`")
    return p


# options named like a request field that hold something else: the images' paths (the request holds them decoded)
NOT_REQUEST = {"init_image", "mask"}


def typed_layer(args: argparse.Namespace) -> dict[str, Any]:
    """The request fields the user typed (every option's default is None, so typed can be told from left out)."""
    for side in ("height", "width"):
        value = getattr(args, side)
        if value is not None and value <= 0:
            raise UserError(f"--{side} {value} is not a size: give pixels (a multiple of the VAE factor), or leave "
                            "it out for the init image's or the model's size")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()
            if k in FIELDS and k not in NOT_REQUEST and v is not None}


def control_units(args: argparse.Namespace, from_png: tuple = ()) -> tuple:
    """The ControlNet units of --controlnet (or a --from-png's) with their --control-image files decoded."""
    from ldm.controlnet.unit import OPTION_FIELDS, units_from_options
    from ldm.pipeline import images as im

    images = [im.load_image(path, "control image") for path in args.control_image]
    return units_from_options(args.controlnet, images, {k: getattr(args, k) for k in OPTION_FIELDS}, from_png,
                              args.from_png or "")


def build_request(args: argparse.Namespace) -> GenerationRequest:
    """Typed options > the --from-png image's values > the request's defaults; the init image and mask decoded."""
    from ldm.ip_adapter.options import ip_adapter_units
    from ldm.pipeline import images as im

    typed = typed_layer(args)
    from_png: dict[str, Any] = {}
    if args.from_png:
        from ldm.pipeline.a1111 import replay_values

        from_png = replay_values(args.from_png, set(typed) | ({"controlnets"} if args.controlnet else set()))
        if from_png.get("strength") is not None and not args.init_image:
            raise UserError(
                f"'{args.from_png}' was made from an init image (Denoising strength: {from_png['strength']}): pass "
                "--init-image FILE (and --mask FILE if it was inpainted) to replay it"
            )
        if from_png.get("mask_blur") is not None and not args.mask:
            raise UserError(f"'{args.from_png}' was inpainted (it has a Mask blur): pass --mask FILE to replay it")
    if "prompt" not in typed and "prompt" not in from_png:
        raise UserError('no prompt given: ldm-generate "a red car" --model DIR (or --from-png FILE)')
    ip_units = ip_adapter_units(args, from_png.get("ip_adapters", ()), args.from_png)  # images decoded
    if ip_units is not None:
        typed["ip_adapters"] = ip_units
    images = {"init_image": im.load_image(args.init_image) if args.init_image else None,
              "mask": im.load_mask(args.mask) if args.mask else None}
    units = control_units(args, from_png.pop("controlnets", ()))
    typed.update({"controlnets": units} if units else {})
    return GenerationRequest.layered(typed, from_png, {k: v for k, v in images.items() if v is not None})


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


def model_spec(args: argparse.Namespace, model: str | None):
    """The model's spec (`ldm.models.spec.inspect_model`); a model named only by --from-png says so when missing."""
    from ldm.models.spec import inspect_model

    try:
        return inspect_model(model or None, prediction_type=args.prediction_type, vae=args.vae)
    except UserError as e:
        if args.from_png and args.model is None and model:
            from ldm.pipeline.a1111 import model_hint

            raise model_hint(e, args.from_png, model) from None
        raise


def refiner_spec(args: argparse.Namespace, request: GenerationRequest, spec):
    """The spec of the refiner the request names (--refiner, or a --from-png's 'Refiner'), checked against the
    base; None without one."""
    if not request.refiner:
        return None
    from ldm.models.spec import inspect_model
    from ldm.pipeline.refiner import check_refiner_pair

    try:
        refiner = inspect_model(request.refiner)
    except UserError as e:
        if args.refiner is None:  # named by the PNG only
            raise UserError(f"{e} (the refiner '{request.refiner}' comes from '{args.from_png}': pass --refiner "
                            "MODEL to replay it, or --refiner '' to replay without it)") from None
        raise
    check_refiner_pair(spec, refiner)
    return refiner


def run(args: argparse.Namespace) -> list[Path]:
    """Validate everything, then load the model, generate and save. Returns the written paths."""
    if args.prompts_file:
        return run_prompts(args)
    import torch

    from ldm.controlnet.load import check_units
    from ldm.demo import NAME as DEMO_NAME
    from ldm.demo import NOTICE as DEMO_NOTICE
    from ldm.lora.prompt_tags import check_lora_inputs, parse_lora_hashes
    from ldm.models.ip_adapter import inspect_ip_adapters
    from ldm.pipeline.device import dtype_name, pick_device, pick_dtype
    from ldm.pipeline.output import check_writable, save_png
    from ldm.pipeline.pipeline import Pipeline
    from ldm.pipeline.refiner import check_refiner_pair
    from ldm.text.embeddings import check_embedding_inputs

    # 1. the request and the model's spec (headers and configs only), checked against each other
    request = build_request(args)
    spec = model_spec(args, request.model)
    check_refiner_pair(spec, None)  # a refiner given as --model, named
    request = request.resolve(spec)
    refiner = refiner_spec(args, request, spec)
    ip_adapters = inspect_ip_adapters([u.model for u in request.ip_adapters], spec, args.ip_image_encoder or ())
    # 2. the rest of the inputs: ControlNets, device, output directory, LoRA files (all before any weight is loaded)
    if request.controlnets:
        check_units(request.controlnets, spec.unet_config, spec.vae_factor, args.controlnet_dir)
    device = pick_device(args.device)
    outdir = check_writable(args.outdir)
    loras = check_lora_inputs(args.lora, request.prompt, args.lora_dir, parse_lora_hashes(request.lora_hashes))
    check_embedding_inputs(args.embeddings_dir, args.embedding, [request.prompt, request.negative_prompt], spec.arch,
                           spec.unet_config["cross_attention_dim"])
    if spec.name == DEMO_NAME:
        log.info(DEMO_NOTICE)
    dtype = pick_dtype(args.dtype, device)

    # 3. the work
    start = time.perf_counter()
    log.info("loading %s on %s (%s)", spec.name, device, dtype_name(dtype))
    pipe = Pipeline.open(spec, device, dtype, loras=loras, lora_dir=args.lora_dir, vae_tiling=args.vae_tiling,
                         compile_unet=args.compile, refiner=refiner, embeddings_dir=args.embeddings_dir,
                         embeddings=args.embedding, ip_adapters=ip_adapters, controlnet_dir=args.controlnet_dir)
    log.info("loaded in %.1fs; generating %d image(s) at %dx%d, seeds %d..%d", time.perf_counter() - start,
             request.num_images, request.width, request.height, request.seed, request.seed + request.num_images - 1)
    written: list[Path] = []

    def save(image, params) -> None:
        path = save_png(image, params, outdir)
        written.append(path)
        print(path, flush=True)  # the only thing on stdout

    start = time.perf_counter()
    with torch.inference_mode():
        pipe.generate(request, show_progress=not args.quiet, on_image=save)
    seconds = time.perf_counter() - start
    log.info("%d image(s) in %.1fs (%.2f s/image)", len(written), seconds, seconds / max(1, len(written)))
    return written


def run_prompts(args: argparse.Namespace) -> list[Path]:
    """`--prompts-file`: every line of the file through `ldm.prompts_file`, on top of the typed options."""
    from ldm.ip_adapter.options import ip_adapter_units
    from ldm.models.ip_adapter import inspect_ip_adapters
    from ldm.prompts_file import run_prompts_file

    for option, value in (("a prompt", args.prompt), ("--from-png", args.from_png),
                          ("--init-image", args.init_image), ("--mask", args.mask)):
        if value:
            raise UserError(f"--prompts-file takes its prompts from the file: drop {option}")
    typed = typed_layer(args)
    ip_units = ip_adapter_units(args)  # every line's image prompts
    if ip_units is not None:
        typed["ip_adapters"] = ip_units
    units = control_units(args)
    typed.update({"controlnets": units} if units else {})
    spec = model_spec(args, typed.get("model"))
    refiner = refiner_spec(args, GenerationRequest.layered(typed), spec)
    ip_adapters = inspect_ip_adapters([u.model for u in ip_units or ()], spec, args.ip_image_encoder or ())
    return run_prompts_file(args.prompts_file, spec, typed, outdir=args.outdir, loras=args.lora,
                            lora_dir=args.lora_dir, device=args.device, dtype=args.dtype,
                            vae_tiling=args.vae_tiling, compile_unet=args.compile, quiet=args.quiet,
                            refiner=refiner, embeddings_dir=args.embeddings_dir, embeddings=args.embedding,
                            ip_adapters=ip_adapters, controlnet_dir=args.controlnet_dir)


if __name__ == "__main__":
    main()
