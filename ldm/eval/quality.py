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

For a training loop, the three steps stand alone: `open_extractors` and `features_of` the reference images once;
every N steps, `features_of` the images of the same prompts and seeds, and `measure`.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, replace
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldm.errors import UserError
from ldm.eval import metrics as m
from ldm.eval.features import ImageFeatures, TextImageFeatures, batches

log = logging.getLogger("ldm.eval")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FEATURES = ("standard", "demo")
KID_SEED = 0  # the subsets KID draws: fixed, so the same features give the same KID


@dataclass
class Extractors:
    """What each metric runs on: `images` for FID and KID, `clip` (images and captions) for CLIP score and CMMD."""

    images: ImageFeatures | None = None
    clip: TextImageFeatures | None = None


@dataclass
class Features:
    """One image set's feature rows, in a fixed order (file order, or prompt then seed): `images` (N, D) for FID/KID,
    `clip` (N, E) L2-normalised image embeddings, `texts` (N, E) their captions' embeddings (generated sets only)."""

    images: torch.Tensor | None = None
    clip: torch.Tensor | None = None
    texts: torch.Tensor | None = None

    def __len__(self) -> int:
        return next((len(t) for t in (self.images, self.clip, self.texts) if t is not None), 0)

    @staticmethod
    def cat(parts: list[Features], extractors: Extractors, with_texts: bool) -> Features:
        """The rows of `parts` one after the other (empty tensors of the right width for no parts)."""
        def rows(name: str, extractor) -> torch.Tensor | None:
            if extractor is None or (name == "texts" and not with_texts):
                return None
            return torch.cat([getattr(p, name) for p in parts]) if parts else torch.zeros(0, extractor.dim)

        return Features(rows("images", extractors.images), rows("clip", extractors.clip),
                        rows("texts", extractors.clip))


def open_extractors(metrics: tuple[str, ...], features: str, inception: str | None, clip_model: str | None,
                    device: torch.device | str = "cpu") -> Extractors:
    """The extractors `metrics` need, loaded; a missing or wrong weights file is a one-line `UserError`."""
    from ldm.eval.features import ClipFeatures, DemoFeatures, InceptionFeatures, find_inception

    need_images = bool({"fid", "kid"} & set(metrics))
    need_clip = bool({"clip", "cmmd"} & set(metrics))
    if features == "demo":
        demo = DemoFeatures(device)
        return Extractors(demo if need_images else None, demo if need_clip else None)
    if need_clip and clip_model is None:
        names = "/".join(n for n in metrics if n in ("clip", "cmmd"))
        raise UserError(f"--metrics {names} need a CLIP model: pass --clip-model DIR (a local transformers CLIPModel "
                        "directory; CMMD as published uses openai/clip-vit-large-patch14-336), or --features demo")
    images = InceptionFeatures(find_inception(inception), device) if need_images else None
    return Extractors(images, ClipFeatures.from_dir(clip_model, device) if need_clip else None)


def list_reference(directory: str | Path) -> list[Path]:
    """The image files under `directory` (recursively), sorted by path: the reference set, in a fixed order."""
    root = Path(directory)
    if not root.is_dir():
        raise UserError(f"--reference '{directory}' is not a directory: pass a directory of reference images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"--reference '{directory}' holds no images ({', '.join(IMAGE_SUFFIXES)}): pass a directory "
                        "of reference images")
    return files


def to_chw(image) -> torch.Tensor:
    """A PIL RGB image -> uint8 (3, H, W)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def features_of(extractors: Extractors, images: Iterable[torch.Tensor], prompts: list[str] | None = None,
                batch_size: int = 32) -> Features:
    """Every extractor's rows for `images` ((3, H, W) uint8 each, read lazily: one batch in memory at a time), and
    the caption embeddings of `prompts` (one per image) when there is a CLIP extractor."""
    parts = []
    for batch in batches(images, batch_size):
        parts.append(Features(None if extractors.images is None else extractors.images(batch).float().cpu(),
                              None if extractors.clip is None else extractors.clip(batch).float().cpu()))
    out = Features.cat(parts, extractors, with_texts=False)
    if extractors.clip is not None and prompts is not None:
        texts = [extractors.clip.embed_texts(prompts[i: i + batch_size]) for i in range(0, len(prompts), batch_size)]
        out.texts = torch.cat(texts) if texts else torch.zeros(0, extractors.clip.dim)
    return out


def measure(metrics: tuple[str, ...], reference: Features, generated: Features, *, kid_subsets: int = m.KID_SUBSETS,
            kid_subset_size: int | None = None) -> tuple[dict[str, Any], list[str]]:
    """The numbers of `metrics` and the warnings a reader needs beside them. KID's subset size defaults to
    min(1000, both set sizes), said in the numbers; one given and too large is refused."""
    numbers: dict[str, Any] = {}
    warnings: list[str] = []
    n_ref, n_gen = len(reference), len(generated)
    if "fid" in metrics:
        numbers["fid"] = m.fid(reference.images, generated.images)
        warning = m.fid_warning(n_ref, n_gen, reference.images.shape[1])
        warnings += [warning] if warning else []
    if "kid" in metrics:
        size = kid_subset_size or min(m.KID_SUBSET_SIZE, n_ref, n_gen)
        mean, std = m.kid(reference.images, generated.images, subsets=kid_subsets, subset_size=size, seed=KID_SEED)
        numbers["kid"] = {"mean": mean, "std": std, "subsets": kid_subsets, "subset_size": size, "seed": KID_SEED}
    if "clip" in metrics:
        numbers["clip_score"] = m.clip_score(generated.clip, generated.texts)
    if "cmmd" in metrics:
        numbers["cmmd"] = m.cmmd(reference.clip, generated.clip)
        numbers["cmmd_unbiased"] = m.cmmd(reference.clip, generated.clip, unbiased=True)
    return numbers, warnings


def _gathered(accelerator, mine: Features, order: list[int]) -> Features:
    """Every process's rows on every process, sorted by their global index `order` (this process's indices)."""
    from ldm.parallel.collective import gather_rows

    index = gather_rows(accelerator, torch.tensor(order, dtype=torch.long)[:, None])[:, 0]  # (N,)
    sort = torch.argsort(index)
    rows = {k: None if t is None else gather_rows(accelerator, t)[sort] for k, t in vars(mine).items()}
    return Features(**rows)


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
    reference = _gathered(accelerator, held["reference"], mine_ref)
    t_reference = time.perf_counter() - start

    pipe, error = attempt(lambda: Pipeline.open(spec, device, loras=[parse_lora_option(v) for v in args.lora]))
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
    generated = _gathered(accelerator, held["generated"], order)
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
