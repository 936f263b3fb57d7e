"""`ldm-generate --prompts-file FILE`: many prompts in one run, resumable, and split across processes.

The file (UTF-8) holds one job a line: a plain prompt, or a JSON object with per-line settings:

    a red car at night
    {"prompt": "a blue door", "negative": "blurry", "seed": 7, "cfg": 5, "steps": 30, "width": 512, "count": 4}

Blank lines and lines starting with `#` are skipped. JSON keys (`ldm.pipeline.request.PROMPTS_FILE_KEYS`): prompt
(required), negative, seed, cfg, steps, sampler, schedule, eta, width, height, count (images of that line); a key
left out takes the command line's value (`--cfg`, `--num-images`, ...), and the command line's hires fix and
IP-Adapters (`--ip-adapter`, `--ip-image`) and ControlNet units (`--controlnet`, `--control-image`, ...) apply to
every line; `control_image` (a path, or a list of one path per --controlnet; relative to the current directory, as
the options' paths) replaces a line's control images. Every line is checked before any model weight is read; one
bad line refuses the whole file (`prompts file 'F' line 3: ...`), and nothing is written.

Seeds: the line's `seed`, else `--seed`, else a number derived from the prompt text (sha256): never random, so the
same file gives the same images. Image i of a line uses seed + i.

Names: `<line>-<seed>-<prompt slug>-<hash>.png`, `hash` = the first 8 hex digits of the sha256 of the image's PNG
`parameters` text (prompt, settings, model) and of its control images' pixels. A name is thus a function of what
the image is: a rerun skips the images that are already there, and an edited line (another cfg, another model)
gets new names instead of being taken for done. PNGs are written atomically (`ldm.files.atomic_write_bytes`): a
killed run leaves at most a `.tmp-` file, which the next run deletes, never a half PNG under a final name.

Processes: under `accelerate launch -m ldm.generate --prompts-file F ...` the main process lists the images still
missing, and the work units (one line's consecutive seeds, up to `--batch-size` images) are dealt round-robin by
index (`share`), so no two processes write the same file. For several nodes, `--outdir` must be on a shared file
system. Each process reports its outcome through `ldm.parallel.collective` (a failure on one is raised on all, none
hangs), and the main process prints the summary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ldm.errors import UserError
from ldm.pipeline.request import PROMPTS_FILE_ALIASES, PROMPTS_FILE_KEYS, GenerationRequest, ModelFacts

log = logging.getLogger("ldm.generate")


@dataclass(frozen=True)
class Line:
    """One line of the file: its number (1-based) and its request, resolved against the model."""

    number: int
    request: GenerationRequest


def default_seed(prompt: str) -> int:
    """A seed from the prompt text alone, stable across runs and machines (not Python's salted hash)."""
    return int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:4], "big")


def read_prompts_file(path: str | Path, cli: dict[str, Any], model: ModelFacts,
                      lora_dir: str | Path | None = None, embeddings=None) -> list[Line]:
    """Every line parsed, layered over the command line's request fields `cli`, resolved against `model` and
    checked; the first bad line (and how many others are bad) refused in one message. `embeddings`: the
    `EmbeddingLibrary` (ldm/text/embedding_files.py) that lines' `embedding:NAME` must name."""
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
            lines.append(Line(number, _line_request(raw, cli, model, lora_dir, embeddings)))
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


def _line_request(raw: str, cli: dict[str, Any], model: ModelFacts, lora_dir, embeddings) -> GenerationRequest:
    from ldm.lora.prompt_tags import check_lora_inputs
    from ldm.text.embeddings import check_references

    text = raw.strip()
    if text.startswith("{"):
        try:
            item = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(item, dict):
            raise UserError("a JSON line must be an object")
        item = {PROMPTS_FILE_ALIASES.get(k, k): v for k, v in item.items()}
        unknown = [k for k in item if k not in PROMPTS_FILE_KEYS and k != "control_image"]
        if unknown:
            raise UserError(f"unknown key '{unknown[0]}'; known keys: {', '.join(PROMPTS_FILE_KEYS)}, control_image")
    else:
        item = {"prompt": text}
    control_images = item.pop("control_image", None)
    line = {PROMPTS_FILE_KEYS[k][0]: _typed(k, v) for k, v in item.items()}
    if control_images is not None:
        line["controlnets"] = _line_control(control_images, cli.get("controlnets", ()))
    if not line.get("prompt", "").strip():
        raise UserError("no prompt (a JSON line needs a non-empty \"prompt\")")
    if line.get("seed") == -1:
        del line["seed"]
    request = GenerationRequest.layered(line, cli)
    if request.seed == -1:  # no seed given: never random, so the same file gives the same images
        request = replace(request, seed=default_seed(line["prompt"]))
    check_lora_inputs([], request.prompt, lora_dir)  # <lora:NAME:W> tags name files in --lora-dir
    resolved = request.resolve(model)
    check_references(embeddings, [request.prompt, request.negative_prompt], model.arch,  # embedding:NAME
                     getattr(model, "unet_config", {}).get("cross_attention_dim"))
    return resolved


def _line_control(paths: Any, units: tuple) -> tuple:
    """The command line's units with a line's own control images: a path (one unit) or one path per unit."""
    from ldm.pipeline import images as im

    paths = [paths] if isinstance(paths, str) else paths
    if not units:
        raise UserError("\"control_image\" only applies with --controlnet MODEL on the command line")
    if not isinstance(paths, list) or len(paths) != len(units) or not all(isinstance(p, str) for p in paths):
        raise UserError(f"\"control_image\" must be a path (one --controlnet) or a list of {len(units)} paths (one "
                        f"per --controlnet), got {json.dumps(paths)}")
    return tuple(replace(u, image=im.load_image(p, "control image")) for u, p in zip(units, paths))


def _typed(key: str, value: Any) -> Any:
    kinds = PROMPTS_FILE_KEYS[key][1]
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    not_finite = isinstance(value, float) and not math.isfinite(value)
    if isinstance(value, bool) or not isinstance(value, kinds) or not_finite:
        names = {str: "a string", int: "an integer", float: "a number"}
        raise UserError(f"\"{key}\" must be {names[kinds[-1]]}, got {json.dumps(value)}")
    return float(value) if key in ("cfg", "eta") else value


def image_name(params: GenerationRequest) -> str:
    """`<seed>-<slug>-<hash>.png` (the caller puts the line number first); see the module docstring."""
    from ldm.pipeline.metadata import format_parameters
    from ldm.pipeline.output import slug

    digest = hashlib.sha256(format_parameters(params).encode("utf-8"))
    for unit in params.controlnets:  # not in the text: another control image is another image
        if unit.image is not None:
            digest.update(unit.image.tobytes())
    return f"{params.seed}-{slug(params.prompt)}-{digest.hexdigest()[:8]}.png"


def named(line: Line, model_name: str, loras=()) -> GenerationRequest:
    """The line's settings as its first image records them (the others differ in the seed): what names its files.
    (The PNG's own text may add what the pipeline learns while generating, e.g. LoRA hashes; the name does not
    depend on it, so that the plan and the written files always agree.)"""
    prompt = line.request.prompt + "".join(f" <lora:{Path(path).stem}:{scale:g}>" for path, scale in loras)
    return replace(line.request, prompt=prompt, model=model_name)


def plan(lines: list[Line], outdir: Path, batch_size: int, model_name: str, loras=()) -> tuple[list[list[int]], int]:
    """The work still to do as units [line index, first seed, n] (n consecutive seeds, n <= batch_size), and the
    number of images already there."""
    units, done = [], 0
    for index, line in enumerate(lines):
        params = named(line, model_name, loras)
        missing = []
        first = line.request.seed
        for seed in range(first, first + line.request.num_images):
            if (outdir / f"{line.number:05d}-{image_name(params.with_seed(seed))}").exists():
                done += 1
            else:
                missing.append(seed)
        units += [[index, first_seed, n] for first_seed, n in seed_runs(missing, batch_size)]
    return units, done


def seed_runs(seeds: list[int], batch_size: int) -> list[tuple[int, int]]:
    """Ascending `seeds` as runs (first seed, n) of consecutive seeds, each at most `batch_size` long: the work
    units, one `Pipeline.generate` call each."""
    runs, start = [], 0
    while start < len(seeds):
        end = start + 1
        while end < len(seeds) and end - start < batch_size and seeds[end] == seeds[end - 1] + 1:
            end += 1
        runs.append((seeds[start], end - start))
        start = end
    return runs


def share(units: list, rank: int, world: int) -> list:
    """This process's units: dealt round-robin by index, so every unit goes to exactly one process (the same split
    for `ldm-generate --prompts-file` and `ldm-eval --metrics`)."""
    return units[rank::world]


def remove_leftovers(outdir: Path) -> None:
    """Temporary PNGs of a killed run (`.tmp-*.png.*`, see ldm.files.temp_sibling): never complete, never kept."""
    from ldm.files import TMP_PREFIX

    for tmp in outdir.glob(f"{TMP_PREFIX}*.png.*"):
        log.info("removing leftover %s (from an interrupted run)", tmp)
        tmp.unlink(missing_ok=True)


def write_png(image, params: GenerationRequest, path: Path) -> None:
    from ldm.files import atomic_write_bytes
    from ldm.pipeline.metadata import png_info

    atomic_write_bytes(path, lambda f: image.save(f, format="PNG", pnginfo=png_info(params)))


def run_prompts_file(
    path: str, spec, cli: dict[str, Any], *, outdir: str, loras: list[str], lora_dir: str | None, device: str,
    dtype: str, vae_tiling: bool = False, compile_unet: str | None = None, quiet: bool = False, refiner=None,
    embeddings_dir: str | None = None, embeddings: list[str] = (), ip_adapters=(), controlnet_dir: str | None = None,
) -> list[Path]:
    """Check the file and everything else against `spec` (`ldm.models.spec.ModelSpec`), open the model on every
    process, generate this process's share. `cli` holds the request fields typed on the command line; `refiner`
    is the spec of the SDXL refiner they name; `embeddings_dir` and `embeddings` the textual-inversion embeddings
    every line may use; `ip_adapters` the specs of their IP-Adapters (`ldm.models.ip_adapter`); `controlnet_dir` is
    where their ControlNets are found."""
    import torch
    from accelerate import Accelerator

    from ldm.controlnet.load import check_units
    from ldm.lora.prompt_tags import check_lora_inputs
    from ldm.parallel.collective import attempt, raise_if_any_failed, run_on_all
    from ldm.pipeline.device import pick_device, pick_dtype
    from ldm.pipeline.output import check_writable
    from ldm.pipeline.pipeline import Pipeline
    from ldm.text.embeddings import check_embedding_inputs

    GenerationRequest.layered(cli).check()  # the command line's own values, before the file's lines
    if cli.get("controlnets"):
        check_units(cli["controlnets"], spec.unet_config, spec.vae_factor, controlnet_dir)
    lora_files = check_lora_inputs(loras, "", lora_dir)
    library = check_embedding_inputs(embeddings_dir, embeddings, [], spec.arch, spec.unet_config["cross_attention_dim"])
    out = check_writable(outdir)
    lines = read_prompts_file(path, cli, spec, lora_dir=lora_dir, embeddings=library)
    batch_size = cli.get("batch_size", 1)

    accelerator = Accelerator(cpu=device == "cpu")
    dev = accelerator.device if accelerator.num_processes > 1 else pick_device(device)
    dt = pick_dtype(dtype, dev)
    rank, world = accelerator.process_index, accelerator.num_processes

    def listing():
        remove_leftovers(out)
        return plan(lines, out, batch_size, spec.name, lora_files)

    listed = run_on_all(accelerator, listing if accelerator.is_main_process else None, what="listing the work")
    units, done = listed[0]
    mine = share(units, rank, world)
    total = sum(n for _, _, n in units)
    if accelerator.is_main_process:
        log.info("prompts file: %d line(s), %d image(s) to generate, %d already there, on %d process(es)",
                 len(lines), total, done, world)
    start = time.perf_counter()
    pipe = None
    if total:
        pipe, error = attempt(lambda: Pipeline.open(spec, dev, dt, loras=lora_files, lora_dir=lora_dir,
                                                    vae_tiling=vae_tiling, compile_unet=compile_unet,
                                                    refiner=refiner, embeddings_dir=embeddings_dir,
                                                    embeddings=embeddings, ip_adapters=ip_adapters,
                                                    controlnet_dir=controlnet_dir))
        raise_if_any_failed(accelerator, error, what="loading the model")
    written: list[Path] = []
    loaded = time.perf_counter()

    def work() -> list[str]:
        for index, seed, n in mine:
            line = lines[index]
            first = named(line, spec.name, lora_files)

            def save(image, params, number=line.number, first=first) -> None:
                target = out / f"{number:05d}-{image_name(first.with_seed(params.seed))}"
                write_png(image, params, target)
                written.append(target)
                if world == 1:
                    print(target, flush=True)  # the only thing on stdout: as each image is written

            with torch.inference_mode():
                pipe.generate(replace(line.request, seed=seed, num_images=n, batch_size=n),
                              show_progress=not quiet and accelerator.is_main_process, on_image=save)
        return [str(p) for p in written]

    per_process = run_on_all(accelerator, work, what="generating from the prompts file",
                             describe_os_error=lambda reason: f"cannot write a PNG to '{out}': {reason}")
    seconds = time.perf_counter() - loaded
    if accelerator.is_main_process:
        if world > 1:  # one writer on stdout: the main process prints every process's paths, by rank
            for paths in per_process:
                if paths:
                    print("\n".join(paths), flush=True)
        made = sum(len(paths) for paths in per_process)
        timing = (f"model loaded in {loaded - start:.1f} s, images in {seconds:.1f} s ({made / seconds:.2f} images/s)"
                  if total else "nothing to generate")
        print(f"prompts file '{path}': {made} image(s) written, {done} already there (skipped), "
              f"{len(lines)} line(s), {world} process(es); {timing}", file=sys.stderr, flush=True)
    return written
