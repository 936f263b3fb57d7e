"""`ldm-generate --prompts-file FILE`: many prompts in one run, resumable, and split across processes.

The file (UTF-8) holds one job a line: a plain prompt, or a JSON object with per-line settings:

    a red car at night
    {"prompt": "a blue door", "negative": "blurry", "seed": 7, "cfg": 5, "steps": 30, "width": 512, "count": 4}

Blank lines and lines starting with `#` are skipped. JSON keys: prompt (required), negative, seed, cfg, steps,
sampler, width, height, count (images of that line); a key left out takes the command line's value (`--cfg`,
`--num-images`, ...), and the command line's hires fix applies to every line. Every line is checked before any
model weight is read; one bad line refuses the whole file (`prompts file 'F' line 3: ...`), and nothing is written.

Seeds: the line's `seed`, else `--seed`, else a number derived from the prompt text (sha256): never random, so the
same file gives the same images. Image i of a line uses seed + i.

Names: `<line>-<seed>-<prompt slug>-<hash>.png`, `hash` = the first 8 hex digits of the sha256 of the image's PNG
`parameters` text (prompt, settings, model). A name is thus a function of what the image is: a rerun skips the
images that are already there, and an edited line (another cfg, another model) gets new names instead of being
taken for done. PNGs are written atomically (`ldm.files.atomic_write_bytes`): a killed run leaves at most a `.tmp-`
file, which the next run deletes, never a half PNG under a final name.

Processes: under `accelerate launch -m ldm.generate --prompts-file F ...` the main process lists the images still
missing, and the work units (one line's consecutive seeds, up to `--batch-size` images) are dealt round-robin by
index, so no two processes write the same file. For several nodes, `--outdir` must be on a shared file system. Each
process reports its outcome through `ldm.parallel.collective` (a failure on one is raised on all, none hangs), and
the main process prints the summary.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldm.errors import UserError

log = logging.getLogger("ldm.generate")

KEYS = ("prompt", "negative", "seed", "cfg", "steps", "sampler", "width", "height", "count")
ALIASES = {"negative_prompt": "negative", "num_images": "count", "cfg_scale": "cfg"}


@dataclass(frozen=True)
class Line:
    """One line of the file, every value filled in and checked."""

    number: int  # 1-based line number in the file
    prompt: str
    negative: str
    seed: int
    cfg: float
    steps: int
    sampler: str
    karras: bool
    width: int
    height: int
    count: int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument_group("prompt lists").add_argument(
        "--prompts-file", default=None, metavar="FILE",
        help="generate for every line of FILE: a prompt, or a JSON object such as {\"prompt\": \"a red car\", "
        "\"seed\": 7, \"cfg\": 5, \"width\": 512, \"count\": 4}. Resumable (a rerun skips the images already "
        "written) and split across processes under `accelerate launch -m ldm.generate`")


def default_seed(prompt: str) -> int:
    """A seed from the prompt text alone, stable across runs and machines (not Python's salted hash)."""
    return int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:4], "big")


def read_prompts_file(
    path: str | Path, defaults: dict[str, Any], *, vae_factor: int, default_size: int, batch_size: int,
    num_images: int, max_steps: int, hires=None, lora_dir: str | Path | None = None,
) -> list[Line]:
    """Every line parsed and checked; the first bad line (and how many others are bad) refused in one message."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"prompts file '{path}' does not exist") from None
    except UnicodeDecodeError as e:
        raise UserError(f"prompts file '{path}' is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UserError(f"cannot read prompts file '{path}': {e.strerror or e}") from None
    lines, bad = [], []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        try:
            lines.append(_parse_line(number, raw, defaults, vae_factor, default_size, batch_size, num_images,
                                     max_steps, hires, lora_dir))
        except UserError as e:
            bad.append((number, str(e)))
    if bad:
        number, reason = bad[0]
        others = ", ".join(str(n) for n, _ in bad[1:6]) + (", ..." if len(bad) > 6 else "")
        more = f" (and {len(bad) - 1} more bad line(s): {others})" if len(bad) > 1 else ""
        raise UserError(f"prompts file '{path}' line {number}: {reason}{more}; nothing was generated: fix the file "
                        "and run again")
    if not lines:
        raise UserError(f"prompts file '{path}' has no prompts (blank lines and # comments are skipped)")
    return lines


def _parse_line(number, raw, defaults, vae_factor, default_size, batch_size, num_images, max_steps, hires,
                lora_dir) -> Line:
    from ldm.lora.prompt_tags import check_lora_inputs
    from ldm.pipeline.samplers import sampler_from_label
    from ldm.pipeline.validation import check_request
    from ldm.text.prompt_syntax import check_prompt

    text = raw.strip()
    if text.startswith("{"):
        try:
            item = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(item, dict):
            raise UserError("a JSON line must be an object")
        item = {ALIASES.get(k, k): v for k, v in item.items()}
        unknown = [k for k in item if k not in KEYS]
        if unknown:
            raise UserError(f"unknown key '{unknown[0]}'; known keys: {', '.join(KEYS)}")
    else:
        item = {"prompt": text}
    prompt = _typed(item, "prompt", str, None)
    if prompt is None or not prompt.strip():
        raise UserError("no prompt (a JSON line needs a non-empty \"prompt\")")
    negative = _typed(item, "negative", str, defaults["negative"])
    check_prompt(prompt, "prompt")
    check_prompt(negative, "negative prompt")
    check_lora_inputs([], prompt, lora_dir)  # <lora:NAME:W> tags name files in --lora-dir
    seed = _typed(item, "seed", int, defaults["seed"])
    seed = default_seed(prompt) if seed is None or seed == -1 else seed
    cfg = float(_typed(item, "cfg", (int, float), defaults["cfg"]))
    steps = _typed(item, "steps", int, defaults["steps"])
    sampler, karras = sampler_from_label(_typed(item, "sampler", str, defaults["sampler"]))
    karras = karras or ("sampler" not in item and bool(defaults["karras"]))
    width = _typed(item, "width", int, defaults["width"]) or default_size
    height = _typed(item, "height", int, defaults["height"]) or default_size
    count = _typed(item, "count", int, num_images)
    check_request(steps=steps, cfg=cfg, height=height, width=width, vae_factor=vae_factor, sampler=sampler,
                  karras=karras, num_images=count, batch_size=batch_size, seed=seed,
                  guidance_rescale=defaults["guidance_rescale"], max_steps=max_steps)
    if hires is not None:
        hires.check(steps, height, width, vae_factor)
    return Line(number, prompt, negative, seed, cfg, steps, sampler, karras, width, height, count)


def _typed(item: dict[str, Any], key: str, kind, default):
    if key not in item:
        return default
    value = item[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    not_finite = isinstance(value, float) and not math.isfinite(value)
    if isinstance(value, bool) or not isinstance(value, kinds) or not_finite:
        names = {str: "a string", int: "an integer", float: "a number"}
        raise UserError(f"\"{key}\" must be {names[kinds[-1]]}, got {json.dumps(value)}")
    return value


def image_name(params) -> str:
    """`<line>-<seed>-<slug>-<hash>.png` for the line number set by the caller; see the module docstring."""
    from ldm.pipeline.metadata import format_parameters
    from ldm.pipeline.output import slug

    digest = hashlib.sha256(format_parameters(params).encode("utf-8")).hexdigest()[:8]
    return f"{params.seed}-{slug(params.prompt)}-{digest}.png"


def line_params(line: Line, model_name: str, guidance_rescale: float, hires, clip_skip: int = 1, loras=()):
    """The line's settings as GenerationParams (first image; the others differ in the seed): what names its files.
    (The PNG's own text may add what the pipeline learns while generating, e.g. LoRA hashes; the name does not
    depend on it, so that the plan and the written files always agree.)"""
    from ldm.pipeline.metadata import GenerationParams

    prompt = line.prompt + "".join(f" <lora:{Path(path).stem}:{scale:g}>" for path, scale in loras)
    params = GenerationParams(
        prompt=prompt, negative_prompt=line.negative, steps=line.steps, sampler=line.sampler,
        karras=line.karras, cfg=line.cfg, seed=line.seed, width=line.width, height=line.height, model=model_name,
        guidance_rescale=guidance_rescale, clip_skip=clip_skip,
    )
    return params if hires is None else hires.record(params)


def plan(lines: list[Line], outdir: Path, batch_size: int, **settings) -> tuple[list[list[int]], int]:
    """The work still to do as units [line index, first seed, n] (n consecutive seeds, n <= batch_size), and the
    number of images already there."""
    units, done = [], 0
    for index, line in enumerate(lines):
        params = line_params(line, **settings)
        missing = []
        for seed in range(line.seed, line.seed + line.count):
            if (outdir / f"{line.number:05d}-{image_name(params.with_seed(seed))}").exists():
                done += 1
            else:
                missing.append(seed)
        start = 0
        while start < len(missing):  # runs of consecutive seeds, at most batch_size long
            end = start + 1
            while end < len(missing) and end - start < batch_size and missing[end] == missing[end - 1] + 1:
                end += 1
            units.append([index, missing[start], end - start])
            start = end
    return units, done


def remove_leftovers(outdir: Path) -> None:
    """Temporary PNGs of a killed run (`.tmp-*.png.*`, see ldm.files.temp_sibling): never complete, never kept."""
    from ldm.files import TMP_PREFIX

    for tmp in outdir.glob(f"{TMP_PREFIX}*.png.*"):
        log.info("removing leftover %s (from an interrupted run)", tmp)
        tmp.unlink(missing_ok=True)


def write_png(image, params, path: Path) -> None:
    from PIL import PngImagePlugin

    from ldm.files import atomic_write_bytes
    from ldm.pipeline.metadata import PNG_KEY, format_parameters

    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_KEY, format_parameters(params))
    atomic_write_bytes(path, lambda f: image.save(f, format="PNG", pnginfo=info))


def run_prompts_file(args: argparse.Namespace) -> list[Path]:
    """Check the file and everything else, load the model on every process, generate this process's share."""
    import torch
    from accelerate import Accelerator

    from ldm.generate import resolve_args
    from ldm.parallel.collective import attempt, raise_if_any_failed, run_on_all
    from ldm.pipeline import hires as hr
    from ldm.pipeline.device import pick_device, pick_dtype
    from ldm.pipeline.loading import DEFAULT_MODEL, check_model, load_components, read_default_size
    from ldm.pipeline.loading import read_vae_factor, resolve_model
    from ldm.pipeline.output import check_writable
    from ldm.pipeline.pipeline import Pipeline

    for option, value in (("a prompt", args.prompt), ("--from-png", args.from_png),
                          ("--init-image", args.init_image), ("--mask", args.mask)):
        if value:
            raise UserError(f"--prompts-file takes its prompts from the file: drop {option}")
    from ldm.lora.prompt_tags import check_lora_inputs

    v = resolve_args(args)
    if v["clip_skip"] < 1:
        raise UserError(f"--clip-skip must be at least 1 (1 = the text encoder's usual layer), got {v['clip_skip']}")
    loras = check_lora_inputs(args.lora, "", args.lora_dir)
    hires = hr.from_values(v)
    if args.seed is None:  # resolve_args drew a random one; a prompts file never does (see the docstring)
        v["seed"] = None
    outdir = check_writable(args.outdir)
    v["model"] = v["model"] or DEFAULT_MODEL
    root = resolve_model(v["model"])
    check_model(root)
    if args.vae:
        from ldm.singlefile.load import check_vae_source

        check_vae_source(args.vae)
    scheduler_json = root / "scheduler" / "scheduler_config.json"  # a single-file model has none: SD's 1000 steps
    max_steps = json.loads(scheduler_json.read_text()).get("num_train_timesteps", 1000) if root.is_dir() else 1000
    lines = read_prompts_file(
        args.prompts_file, v, vae_factor=read_vae_factor(root),
        default_size=read_default_size(root, args.prediction_type), batch_size=args.batch_size,
        num_images=args.num_images, max_steps=int(max_steps), hires=hires, lora_dir=args.lora_dir)

    accelerator = Accelerator(cpu=args.device == "cpu")
    device = accelerator.device if accelerator.num_processes > 1 else pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    rank, world = accelerator.process_index, accelerator.num_processes
    model_name = str(v["model"])  # what the PNGs name (Components.name), known before any weight is read
    settings = dict(model_name=model_name, guidance_rescale=v["guidance_rescale"], hires=hires,
                    clip_skip=v["clip_skip"], loras=loras)

    def listing():
        remove_leftovers(outdir)
        return plan(lines, outdir, args.batch_size, **settings)

    listed = run_on_all(accelerator, listing if accelerator.is_main_process else None, what="listing the work")
    units, done = listed[0]
    mine = units[rank::world]
    total = sum(n for _, _, n in units)
    if accelerator.is_main_process:
        log.info("prompts file: %d line(s), %d image(s) to generate, %d already there, on %d process(es)",
                 len(lines), total, done, world)
    start = time.perf_counter()
    pipe = None
    if total:
        def load():
            components = load_components(root, model_name, device, dtype, vae=args.vae,
                                         prediction_type=args.prediction_type)
            loaded = Pipeline(components, device, dtype, vae_tiling=args.vae_tiling, compile_unet=args.compile)
            for path, scale in loras:
                loaded.load_lora(path, scale)
            return loaded

        pipe, error = attempt(load)
        raise_if_any_failed(accelerator, error, what="loading the model")
    written: list[Path] = []
    loaded = time.perf_counter()

    def work() -> list[str]:
        for index, seed, n in mine:
            line = lines[index]
            named = line_params(line, **settings)

            def save(image, params, number=line.number, named=named) -> None:
                path = outdir / f"{number:05d}-{image_name(named.with_seed(params.seed))}"
                write_png(image, params, path)
                written.append(path)
                if world == 1:
                    print(path, flush=True)  # the only thing on stdout: as each image is written

            with torch.inference_mode():
                pipe(line.prompt, line.negative, steps=line.steps, cfg=line.cfg, sampler=line.sampler,
                     karras=line.karras, seed=seed, num_images=n, batch_size=n, height=line.height,
                     width=line.width, guidance_rescale=v["guidance_rescale"], hires=hires,
                     clip_skip=v["clip_skip"], lora_dir=args.lora_dir,
                     show_progress=not args.quiet and accelerator.is_main_process, on_image=save)
        return [str(path) for path in written]

    per_process = run_on_all(accelerator, work, what="generating from the prompts file",
                        describe_os_error=lambda reason: f"cannot write a PNG to '{outdir}': {reason}")
    seconds = time.perf_counter() - loaded
    if accelerator.is_main_process:
        if world > 1:  # one writer on stdout: the main process prints every process's paths, by rank
            for paths in per_process:
                if paths:
                    print("\n".join(paths), flush=True)
        made = sum(len(paths) for paths in per_process)
        timing = (f"model loaded in {loaded - start:.1f} s, images in {seconds:.1f} s ({made / seconds:.2f} images/s)"
                  if total else "nothing to generate")
        print(f"prompts file '{args.prompts_file}': {made} image(s) written, {done} already there (skipped), "
              f"{len(lines)} line(s), {world} process(es); {timing}", file=sys.stderr, flush=True)
    return written
