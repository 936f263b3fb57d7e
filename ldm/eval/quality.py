"""`ldm-eval --metrics fid,kid,clip,cmmd`: generate from a fixed prompts file and fixed seeds, then measure the images
against a directory of reference images (docs/evaluation.md says what each number means and where it stops).

    ldm-eval --metrics fid,kid,clip,cmmd --reference data/val --prompts val-prompts.txt --model M \
        --inception pt_inception-2015-12-05-6726825d.pth --clip-model clip-vit-large-patch14-336
    ldm-eval --metrics fid,kid,clip,cmmd --features demo --reference shapes-val --prompts shapes.txt   # offline

The prompts file is `ldm-generate --prompts-file`'s (`ldm.prompts_file`): one prompt or JSON line each, `--seed` or a
seed derived from the prompt's text, `--num-per-prompt` images per line (seeds s, s+1, ...): the same file gives the
same images on the same device. Everything a run needs (metric names, the reference directory and its images, the
prompts file, the feature extractors' weights) is checked before the model is opened; nothing is written but the
report (and `--json`).

Under `accelerate launch -m ldm.eval ...` the work units (one line's consecutive seeds) are dealt over the processes
as `ldm-generate --prompts-file` deals them (`ldm.prompts_file.seed_runs` + `share`), and so are the reference
images; each process extracts the features of its own images, and the main process gathers the rows
(`ldm.parallel.collective.gather_rows`), puts them back in file and prompt order, and computes the numbers.

The features and the numbers are `ldm.quality.measure`'s, which training runs use too (`sample.metrics`).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from ldm.errors import UserError
from ldm.quality import metrics as m
from ldm.quality.measure import Features, features_of, gathered, list_reference, measure, open_extractors, to_chw

log = logging.getLogger("ldm.eval")


def check_args(args: argparse.Namespace) -> tuple[str, ...]:
    """The quality run's own options, before anything is loaded; the metric names."""
    metrics = m.parse_metrics(args.metrics)
    for option in ("quick", "new_color", "seeds"):
        if getattr(args, option):
            raise UserError(f"--{option.replace('_', '-')} belongs to the prompt-adherence report: drop it, or drop "
                            "--metrics")
    if args.reference is None or args.prompts is None:
        raise UserError("--metrics needs --reference DIR (the real images) and --prompts FILE (what to generate)")
    if args.num_per_prompt < 1:
        raise UserError(f"--num-per-prompt must be at least 1, got {args.num_per_prompt}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.kid_subsets < 1:
        raise UserError(f"--kid-subsets must be at least 1, got {args.kid_subsets}")
    if args.kid_subset_size is not None and args.kid_subset_size < 2:
        raise UserError(f"--kid-subset-size must be at least 2 (an MMD needs pairs), got {args.kid_subset_size}")
    if args.features == "demo" and (args.inception or args.clip_model):
        raise UserError("--features demo measures with the shapes demo's own image tower: drop --inception and "
                        "--clip-model, or use --features standard")
    return metrics


def run_quality(args: argparse.Namespace) -> dict[str, Any] | None:
    """Check, generate, extract, gather, measure. The report (see `ldm.eval.report.format_quality_report`) on the
    main process, None on the others."""
    from accelerate import Accelerator

    from ldm.image_io import open_image
    from ldm.lora.prompt_tags import parse_lora_option
    from ldm.models.spec import inspect_model
    from ldm.parallel.collective import attempt, raise_if_any_failed, run_on_all
    from ldm.pipeline.device import dtype_name, pick_device
    from ldm.pipeline.pipeline import Pipeline
    from ldm.prompts_file import read_prompts_file, seed_runs, share

    metrics = check_args(args)
    files = list_reference(args.reference)
    spec = inspect_model(args.model, vae=args.vae)
    cli = {k: v for k, v in (("steps", args.steps), ("cfg", args.cfg), ("sampler", args.sampler),
                             ("seed", args.seed), ("num_images", args.num_per_prompt)) if v is not None}
    lines = read_prompts_file(args.prompts, cli, spec)
    n_gen = sum(line.request.num_images for line in lines)
    if min(len(files), n_gen) < 2:
        raise UserError(f"--metrics compare two sets of at least 2 images each, got {len(files)} reference and {n_gen} "
                        "to generate: add images, or raise --num-per-prompt")
    if args.kid_subset_size is not None and "kid" in metrics:
        m.check_kid_subset(args.kid_subset_size, len(files), n_gen)

    accelerator = Accelerator(cpu=args.device == "cpu")
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device if world > 1 else pick_device(args.device)
    extractors, error = attempt(lambda: open_extractors(metrics, args.features, args.inception, args.clip_model,
                                                        device))
    raise_if_any_failed(accelerator, error, what="loading the feature extractors")
    held: dict[str, Features] = {}  # this process's rows, from the work below (run_on_all passes JSON only)

    start = time.perf_counter()
    mine_ref = list(range(len(files)))[rank::world]  # the reference images, dealt as the prompts' work units are
    run_on_all(accelerator, lambda: held.update(reference=features_of(
        extractors, (to_chw(open_image(files[i], f"reference image '{files[i]}'")) for i in mine_ref),
        batch_size=args.batch_size)), what="reading the reference images")
    reference = gathered(accelerator, held["reference"], mine_ref)
    t_reference = time.perf_counter() - start

    loras = [parse_lora_option(v) for v in args.lora]
    pipe, error = attempt(lambda: Pipeline.open(spec, device, args.dtype, loras=loras))
    raise_if_any_failed(accelerator, error, what="loading the model")
    offsets = np.cumsum([0] + [line.request.num_images for line in lines]).tolist()  # first global index per line
    units = [[i, first, n] for i, line in enumerate(lines)
             for first, n in seed_runs(list(range(line.request.seed, line.request.seed + line.request.num_images)),
                                       args.batch_size)]
    mine = share(units, rank, world)
    order = [offsets[i] + first - lines[i].request.seed + j for i, first, n in mine for j in range(n)]
    start = time.perf_counter()

    def work() -> None:
        parts = []
        for i, first, n in mine:  # features right after each unit: no more than one unit's images in memory
            request = replace(lines[i].request, seed=first, num_images=n, batch_size=n)
            with torch.inference_mode():
                result = pipe.generate(request, show_progress=False)
            parts.append(features_of(extractors, [to_chw(im) for im in result.images], [request.prompt] * n,
                                     args.batch_size))
        held["generated"] = Features.cat(parts, extractors, with_texts=True)

    run_on_all(accelerator, work, what="generating and extracting features")
    generated = gathered(accelerator, held["generated"], order)
    t_generate = time.perf_counter() - start
    if not accelerator.is_main_process:
        return None

    start = time.perf_counter()
    numbers, warnings = measure(metrics, reference, generated, kid_subsets=args.kid_subsets,
                                kid_subset_size=args.kid_subset_size)
    for warning in warnings:
        log.warning("warning: %s", warning)
    first = lines[0].request  # resolved by read_prompts_file; per-line JSON settings may differ
    model = str(spec.root) + (f" + VAE {args.vae}" if args.vae else "") + "".join(f" + LoRA {v}" for v in args.lora)
    return {
        "kind": "quality", "metrics": list(metrics), "model": model, "device": str(device),
        "dtype": dtype_name(pipe.dtype), "processes": world, "features": args.features,
        "extractors": {"fid_kid": getattr(extractors.images, "name", None),
                       "clip_cmmd": getattr(extractors.clip, "name", None)},
        "reference": {"dir": str(args.reference), "images": len(files)},
        "generated": {"prompts_file": str(args.prompts), "lines": len(lines), "images": n_gen,
                      "num_per_prompt": args.num_per_prompt, "seed": args.seed, "steps": first.steps,
                      "cfg": first.cfg, "sampler": first.sampler, "size": [first.width, first.height]},
        "numbers": numbers, "warnings": warnings,
        "seconds": {"reference": round(t_reference, 2), "generation": round(t_generate, 2),
                    "metrics": round(time.perf_counter() - start, 2)},
    }
