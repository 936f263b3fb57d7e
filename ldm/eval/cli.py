"""`ldm-eval`: how well does a shapes-domain model follow its prompts? Prints a markdown report, optionally JSON.
With `--metrics`, sample quality instead: FID, KID, CLIP score, CMMD against reference images (`ldm.eval.quality`).

    ldm-eval --model runs/demo/model --json eval.json
    ldm-eval --model runs/demo/model --quick            # a smoke test in a minute, clearly labelled as such
    ldm-eval --lora runs/demo/lora-pink/lora/pink.safetensors --new-color pink   # with a LoRA; a new colour too
    ldm-eval --metrics fid,kid,clip,cmmd --reference DIR --prompts FILE --inception FILE --clip-model DIR
    ldm-eval --metrics fid,kid,clip,cmmd --reference DIR --prompts FILE --features demo   # shapes demo, offline

Sections: the attribute reader on rendered ground truth (is the judge right?), the model's VAE reconstructions (the
ceiling for generation), prompt adherence on held-out and training combinations at the guidance scale and at the
baseline scale, a negative prompt, img2img recolouring and inpainting. All prompts and seeds are fixed
(`ldm.demo.prompts`), so a model gets the same numbers every run on the same device.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ldm.errors import OneLineArgumentParser, UserError, exit_on_user_error

log = logging.getLogger("ldm.eval")

DEFAULT_STEPS, QUICK_STEPS = 25, 10
DEFAULT_SEEDS, QUICK_SEEDS = 4, 1
READER_SEED = 0  # the jitter of the reader check's renders
QUICK_VAE_IMAGES = 63


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="ldm-eval", description=__doc__.split("\n\n")[0],
                epilog="\n".join(line for line in __doc__.splitlines() if line.startswith("    ldm-eval")),
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="diffusers-format model directory (default: as ldm-generate)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"denoising steps (default {DEFAULT_STEPS}; {QUICK_STEPS} with --quick)")
    p.add_argument("--cfg", type=float, default=7.5, help="guidance scale under test (default 7.5)")
    p.add_argument("--baseline-cfg", type=float, default=1.0,
                   help="the comparison scale (default 1.0 = no guidance): guidance must beat it")
    p.add_argument("--seeds", type=int, default=None,
                   help=f"images per prompt, seeds 0..N-1 (default {DEFAULT_SEEDS}; {QUICK_SEEDS} with --quick)")
    p.add_argument("--sampler", default=None, help="sampler name (default: the pipeline's default)")
    p.add_argument("--device", default="auto", help="auto (the default), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="as ldm-generate: auto = fp16 on a GPU, on the CPU bf16 where it has native bf16, else fp32; "
                   "fp32 gives the same numbers on every CPU (and equals training's fp32 sample metrics)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write every number to this JSON file")
    p.add_argument("--vae", default=None, metavar="FILE|DIR",
                   help="a VAE replacing the model's (as ldm-generate --vae): a .safetensors file or a directory")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="apply a LoRA to the model under test (as ldm-generate --lora); repeatable")
    p.add_argument("--new-color", action="append", default=[], metavar="NAME",
                   help="a colour outside the training spec (ldm.demo.shapes.NEW_COLORS, e.g. pink) that the reader "
                        "also knows, with its own prompt section; repeatable")
    p.add_argument("--quick", action="store_true",
                   help="a few prompts per test, 1 seed, fewer steps: a smoke test, labelled as one")
    q = p.add_argument_group("sample quality (--metrics; docs/evaluation.md)")
    q.add_argument("--metrics", default=None, metavar="LIST",
                   help="comma-separated: fid, kid, clip, cmmd. Generates from --prompts, compares with --reference")
    q.add_argument("--reference", default=None, metavar="DIR", help="the real images (any size; searched recursively)")
    q.add_argument("--prompts", default=None, metavar="FILE",
                   help="what to generate: an ldm-generate --prompts-file (one prompt or JSON line each)")
    q.add_argument("--num-per-prompt", type=int, default=1, metavar="K", help="images per line, seeds s..s+K-1")
    q.add_argument("--seed", type=int, default=None,
                   help="the first seed of every line (default: the line's own, else one derived from its text)")
    q.add_argument("--features", choices=("standard", "demo"), default="standard",
                   help="standard: Inception (FID, KID) and --clip-model (CLIP score, CMMD); demo: the shapes demo's "
                        "image tower for all four, offline (not comparable with published numbers)")
    q.add_argument("--inception", default=None, metavar="FILE",
                   help="the FID Inception weights, pt_inception-2015-12-05-6726825d.pth (for fid, kid)")
    q.add_argument("--clip-model", default=None, metavar="DIR",
                   help="a local transformers CLIPModel directory (for clip, cmmd; CMMD's: clip-vit-large-patch14-336)")
    q.add_argument("--kid-subsets", type=int, default=100, help="KID's random subsets (default 100)")
    q.add_argument("--kid-subset-size", type=int, default=None,
                   help="images per KID subset (default min(1000, images in each set))")
    q.add_argument("--batch-size", type=int, default=16, help="images per generation and feature batch (default 16)")
    return p


def _check_args(args: argparse.Namespace) -> None:
    """Everything that needs no model, before the model is loaded."""
    from ldm.pipeline.samplers import check_sampler

    if args.sampler is not None:
        check_sampler(args.sampler)
    for name in ("steps", "seeds"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("cfg", "baseline_cfg"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    from ldm.demo.shapes import NEW_COLORS

    for name in args.new_color:
        if name not in NEW_COLORS:
            raise UserError(f"--new-color {name!r} is not one of {', '.join(NEW_COLORS)} (ldm.demo.shapes.NEW_COLORS)")
    if args.json is not None and not Path(args.json).absolute().parent.is_dir():
        raise UserError(f"--json '{args.json}': directory '{Path(args.json).absolute().parent}' does not exist")


def _timed(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one section, recording its wall time in the result; one log line per section."""
    start = time.perf_counter()
    result = fn()
    result["seconds"] = round(time.perf_counter() - start, 2)
    log.info("%s done in %.1fs", name, result["seconds"])
    return result


def _reader_check(size: int, new_colors: tuple[str, ...] = ()) -> dict[str, Any]:
    """The judge on ground truth: jittered renders of all 630 combinations (and the 90 of each new colour), which it
    should read ~100% right."""
    from ldm.demo.reader import attribute_accuracy, read_attributes
    from ldm.demo.shapes import all_combinations, new_color_combinations, render

    rng = random.Random(READER_SEED)
    combos = all_combinations() + [a for name in new_colors for a in new_color_combinations(name)]
    pairs = [(a, read_attributes(render(a, size, rng), new_colors)) for a in combos]
    return {"images": len(pairs), "accuracy": attribute_accuracy(pairs)}


def _vae_check(vae, size: int, quick: bool, new_colors: tuple[str, ...] = ()) -> dict[str, Any]:
    """The VAE's reconstructions of 2 jittered renders of each of the 630 combinations (and the 90 of each new
    colour; --quick: 63 of them, once)."""
    from ldm.demo.prompts import spread
    from ldm.demo.shapes import all_combinations, new_color_combinations
    from ldm.demo.vae_check import reconstruction_accuracy

    combos = all_combinations() + [a for name in new_colors for a in new_color_combinations(name)]
    combos = spread(combos, QUICK_VAE_IMAGES) if quick else combos
    repeats = 1 if quick else 2
    accuracy = reconstruction_accuracy(vae, combos, size=size, repeats=repeats, new_colors=new_colors)
    return {"images": repeats * len(combos), "accuracy": accuracy}


def _adherence(pipe, sets, s, baseline_cfg: float) -> dict[str, Any]:
    """Rows heldout/train x cfg/baseline, and guidance's gain in points of all-five accuracy per set."""
    from ldm.demo.adherence import prompt_adherence

    rows, gains = [], {}
    for name in ("heldout", "train"):
        for cfg in (s.cfg, baseline_cfg):
            row = prompt_adherence(pipe, getattr(sets, name), s, cfg, desc=f"{name} @ cfg {cfg:g}")
            rows.append({"set": name, **row})
        gains[name] = round(100 * (rows[-2]["accuracy"]["all"] - rows[-1]["accuracy"]["all"]), 2)
    return {"rows": rows, "guidance_gain_points": gains}


def _new_colors(pipe, s, quick: bool) -> dict[str, Any]:
    """Per new colour: prompts of its 9 held-out combinations and of 27 of its training ones (for a LoRA that taught
    it, ldm.demo.new_color), at the guidance scale."""
    from ldm.demo.adherence import prompt_adherence
    from ldm.demo.prompts import QUICK_PROMPTS, spread
    from ldm.demo.shapes import new_color_combinations

    rows = []
    for name in s.new_colors:
        for split, n in (("heldout", 9), ("train", 27)):
            combos = spread(new_color_combinations(name, split), QUICK_PROMPTS if quick else n)
            row = prompt_adherence(pipe, combos, s, s.cfg, desc=f"{name} {split} @ cfg {s.cfg:g}")
            rows.append({"set": f"{name} {split}", **row})
    return {"rows": rows}


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Validate, load the model, run every section; returns the report (see `ldm.eval.report`)."""
    from ldm.demo import adherence as ad
    from ldm.demo.prompts import FIRST_SEED, prompt_sets
    from ldm.lora.prompt_tags import parse_lora_option
    from ldm.models.spec import inspect_model
    from ldm.pipeline.device import dtype_name, pick_device
    from ldm.pipeline.pipeline import Pipeline
    from ldm.pipeline.request import GenerationRequest

    _check_args(args)
    device = pick_device(args.device)
    spec = inspect_model(args.model, vae=args.vae)  # the same default as ldm-generate
    root = spec.root
    start = time.perf_counter()
    pipe = Pipeline.open(spec, device, args.dtype, loras=[parse_lora_option(value) for value in args.lora])
    log.info("loaded %s on %s in %.1fs", root, device, time.perf_counter() - start)

    s = ad.Settings(
        steps=args.steps or (QUICK_STEPS if args.quick else DEFAULT_STEPS), cfg=args.cfg,
        seeds=args.seeds or (QUICK_SEEDS if args.quick else DEFAULT_SEEDS), sampler=args.sampler,
        size=pipe.default_size, progress=True, new_colors=tuple(args.new_color),
    )
    sets = prompt_sets(quick=args.quick)
    report: dict[str, Any] = {
        "quick": args.quick, "model": str(root) + (f" + VAE {args.vae}" if args.vae else "")
                                   + "".join(f" + LoRA {spec}" for spec in args.lora),
        "device": str(device), "dtype": dtype_name(pipe.dtype),
        "settings": {"steps": s.steps, "cfg": s.cfg, "baseline_cfg": args.baseline_cfg, "seeds": s.seeds,
                     "first_seed": FIRST_SEED, "sampler": s.sampler or GenerationRequest.sampler, "size": s.size},
    }
    start = time.perf_counter()
    report["reader"] = _timed("reader check", lambda: _reader_check(s.size, s.new_colors))
    report["vae"] = _timed("VAE reconstruction", lambda: _vae_check(pipe.vae, s.size, args.quick, s.new_colors))
    report["adherence"] = _timed("prompt adherence", lambda: _adherence(pipe, sets, s, args.baseline_cfg))
    if s.new_colors:
        report["new_colors"] = _timed("new colours", lambda: _new_colors(pipe, s, args.quick))
    report["negative"] = _timed("negative prompt", lambda: ad.negative_prompt_test(pipe, sets.negative, s))
    report["img2img"] = _timed("img2img", lambda: ad.img2img_test(pipe, sets.img2img, s))
    report["inpaint"] = _timed("inpainting", lambda: ad.inpaint_test(pipe, sets.inpaint, s))
    report["total_seconds"] = round(time.perf_counter() - start, 2)
    return report


def _setup_logging() -> Callable[[], None]:
    """Section lines from ldm.eval on stderr; the pipeline's per-call info lines (one per img2img call) off.
    Returns a function that undoes it (main() may run many times in one process, e.g. in tests)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("ldm")
    saved = (root.level, root.propagate, log.level)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    root.propagate = False
    log.setLevel(logging.INFO)

    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()  # per-file "Loading weights" bars
    transformers.utils.logging.disable_progress_bar()

    def restore() -> None:
        root.removeHandler(handler)
        root.level, root.propagate, log.level = saved

    return restore


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    """Console script `ldm-eval`: the report on stdout, logs and progress bars on stderr."""
    from ldm.eval.report import format_report, write_json

    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    _check_quality_options(args)
    restore_logging = _setup_logging()
    try:
        if args.metrics is not None:
            from ldm.eval.quality import run_quality

            report = run_quality(args)
        else:
            report = evaluate(args)
    finally:
        restore_logging()
    if report is None:  # not the main process of a multi-process quality run: it prints nothing
        return
    if args.metrics is not None:
        from ldm.eval.report import format_quality_report

        print(format_quality_report(report), flush=True)
    else:
        print(format_report(report), flush=True)
    if args.json is not None:
        write_json(report, args.json)


QUALITY_ONLY = ("reference", "prompts", "seed", "inception", "clip_model", "kid_subset_size")


def _check_quality_options(args: argparse.Namespace) -> None:
    """Options of one report refused with the other (never silently ignored); --json's directory checked first."""
    if args.metrics is None:
        given = [name for name in QUALITY_ONLY if getattr(args, name) is not None]
        if given or args.features != "standard" or args.num_per_prompt != 1:
            name = given[0] if given else ("features" if args.features != "standard" else "num_per_prompt")
            raise UserError(f"--{name.replace('_', '-')} belongs to the sample-quality report: add --metrics LIST "
                            "(fid,kid,clip,cmmd), or drop it")
    elif args.json is not None and not Path(args.json).absolute().parent.is_dir():
        raise UserError(f"--json '{args.json}': directory '{Path(args.json).absolute().parent}' does not exist")


if __name__ == "__main__":
    main()
