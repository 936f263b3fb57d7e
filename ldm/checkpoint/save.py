"""Saving a checkpoint: three collective phases (prepare, write, seal and publish), then rotation of old ones.

Every process writes its own RNG state; the main process writes everything else, then seals the directory with
its manifest and renames it into place (`ldm.files.replace_directory`). A failure on any process raises on all
of them (`ldm.parallel.collective.run_on_all`) and removes the temporary directory; earlier checkpoints are never
touched before the new one is complete.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ldm.checkpoint.codec import Encoder, Unencodable, encode_metadata
from ldm.checkpoint.layout import (
    COMPONENT_NAME, FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, SCRATCH_DIR, STATE_NAME, SUBDIRS, TRASH_PREFIX,
    complete_checkpoints, latest_checkpoint, read_manifest_or_none, step_dirname, temp_dirname,
)
from ldm.checkpoint.support import check_supported, class_name
from ldm.checkpoint.tensors import save_tensors
from ldm.errors import UserError
from ldm.files import (
    OLD_PREFIX, fsync_dir, fsync_tree, os_reason, remove_tree, replace_directory, sha256_file, write_synced,
)
from ldm.parallel.collective import run_on_all
from ldm.parallel.setup import backend_for

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

log = logging.getLogger(__name__)


def save_checkpoint(
    accelerator: Accelerator,
    root: str | Path,
    step: int,
    *,
    models: Mapping[str, torch.nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] = {},
    schedulers: Mapping[str, Any] = {},
    emas: Mapping[str, EMAModel] = {},
    state: Mapping[str, Any] = {},
    keep_last: int | None = 3,
) -> Path:
    """Write `root/step-<step>/` atomically on all processes and return its path.

    Models may be wrapped by `accelerator.prepare`; optimizers and schedulers may be accelerate's wrappers. `state`
    holds JSON-like values (numbers, strings, lists, tuples, dicts, tensors, numpy arrays) and is returned by
    `load_checkpoint`. With `keep_last=N`, only the N highest-step complete checkpoints are kept (the new one always).
    Write failures raise `UserError` on every process and leave earlier checkpoints untouched.
    """
    check_supported(accelerator, optimizers, models)
    _check_save_args(step, keep_last, models, optimizers, schedulers, emas)
    root = Path(root)
    final, tmp = root / step_dirname(step), root / temp_dirname(step)
    previous = latest_checkpoint(root)  # looked up before anything changes, for the error message
    is_main = accelerator.is_main_process

    def describe_write_failure(reason: str) -> str:
        return f"could not write checkpoint to {root}: {reason}; the previous checkpoint {previous or 'none'} is intact"

    def on_all(work: Any) -> list[Any]:
        # Collective: every process learns of every failure; on failure the temp dir goes and all processes raise.
        return run_on_all(
            accelerator, work, what="checkpoint operation", describe_os_error=describe_write_failure,
            on_failure=(lambda: remove_tree(tmp)) if is_main else None,
        )

    # Phase 1: the main process makes an empty temp directory that the others can write their RNG state into.
    on_all((lambda: _prepare_temp_dir(root, tmp)) if is_main else None)
    # Whole tensors on the main process (under FSDP or DeepSpeed a collective gather; otherwise the live state dicts).
    whole = _whole_states(accelerator, models, optimizers, emas) if is_main or backend_for(accelerator).sharded else {}

    # Phase 2: every process writes its own RNG state; the main process writes everything else.
    def write_contents() -> dict[str, list[str]]:
        write_rng(tmp / f"rng_{accelerator.process_index}.safetensors")
        if not is_main:
            return {}
        return _write_components(tmp, whole, schedulers, state)

    components = on_all(write_contents)[0]

    # Phase 3: the main process seals the checkpoint and renames it into place. The sync doubles as the barrier that
    # keeps every process from continuing before the checkpoint exists.
    on_all((lambda: _seal_and_publish(tmp, final, step, accelerator.num_processes, components)) if is_main else None)

    # Then the main process rotates old checkpoints. The new one is complete by now, so a failure here says so.
    def rotate() -> None:
        _warn_if_newer_checkpoints(root, step)
        if keep_last is not None:
            _rotate(root, keep_last, keep=final)

    run_on_all(accelerator, rotate if is_main else None, what="checkpoint rotation",
               describe_os_error=lambda reason: f"saved checkpoint {final}, but could not delete older ones: {reason}")
    if is_main:
        log.info("saved checkpoint %s", final)
    return final


def _check_save_args(step: int, keep_last: int | None, *named: Mapping[str, Any]) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise UserError(f"checkpoint step must be a non-negative integer, got {step!r}")
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise UserError(f"keep_last must be a positive integer or None (keep all), got {keep_last!r}")
    for group in named:
        for name in group:
            if not isinstance(name, str) or not COMPONENT_NAME.match(name):
                raise UserError(
                    f"checkpoint component name {name!r} is not a valid file name; use letters, digits, '_', '.', '-'"
                )


def _prepare_temp_dir(root: Path, tmp: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    _clean_scratch(root)
    remove_tree(tmp)
    if tmp.exists():
        raise OSError(errno.EEXIST, "a stale temporary checkpoint could not be removed", str(tmp))
    tmp.mkdir()
    for sub in SUBDIRS:
        (tmp / sub).mkdir()


def _clean_scratch(root: Path) -> None:
    """Remove leftovers of interrupted saves and deletions; put back a checkpoint moved aside by an interrupted
    re-save of the same step if its replacement never arrived."""
    for entry in sorted(root.iterdir()):
        if not entry.is_dir() or not SCRATCH_DIR.match(entry.name):
            continue
        if entry.name.startswith(OLD_PREFIX):
            original = root / entry.name[len(OLD_PREFIX) :]
            if not original.exists() and read_manifest_or_none(entry) is not None:
                os.rename(entry, original)
                log.warning("restored %s, which an interrupted save had moved aside", original)
                continue
        log.info("removing leftover %s from an interrupted save", entry)
        remove_tree(entry)


def _whole_states(
    accelerator: Accelerator,
    models: Mapping[str, torch.nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
    emas: Mapping[str, EMAModel],
) -> dict[str, dict[str, Any]]:
    """{"models": {name: state_dict}, "optimizers"|"emas": {name: (state_dict, class name)}} with whole tensors;
    complete on the main process (when sharded the others get empty states). Collective when sharded."""
    backend = backend_for(accelerator)
    emas_whole = {}
    for name, ema in emas.items():
        state = ema.state_dict()
        state["shadow_params"] = backend.full_tensors(list(state["shadow_params"]))
        emas_whole[name] = (state, class_name(ema))
    return {
        "models": {name: backend.model_state(model) for name, model in models.items()},
        "optimizers": {
            name: (backend.optimizer_state(models.get(name), optimizer), class_name(optimizer))
            for name, optimizer in optimizers.items()
        },
        "emas": emas_whole,
    }


def _write_components(
    tmp: Path,
    whole: Mapping[str, Mapping[str, Any]],
    schedulers: Mapping[str, Any],
    state: Mapping[str, Any],
) -> dict[str, list[str]]:
    for name, weights in whole["models"].items():
        save_tensors(tmp / "models" / f"{name}.safetensors", weights, {"format": "pt"})
    for name, (optimizer_state, cls) in whole["optimizers"].items():
        _save_structured(tmp / "optimizers" / f"{name}.safetensors", optimizer_state, cls, f"optimizer {name!r}")
    for name, scheduler in schedulers.items():
        _save_scheduler(tmp / "schedulers" / f"{name}.json", scheduler)
    for name, (ema_state, cls) in whole["emas"].items():
        _save_structured(tmp / "ema" / f"{name}.safetensors", ema_state, cls, f"EMA {name!r}")
    try:
        encoded_state = Encoder().encode(dict(state))
    except Unencodable as e:
        raise UserError(
            f"cannot save checkpoint state: {e}; store only numbers, strings, lists, dicts, tensors or numpy arrays"
        ) from e
    _write_json(tmp / STATE_NAME, encoded_state)
    return {kind: list(whole[kind]) for kind in ("models", "optimizers", "emas")} | {"schedulers": list(schedulers)}


def _write_json(path: Path, obj: Any) -> None:
    # allow_nan=False: strict JSON; non-finite floats are tagged by the encoder instead.
    write_synced(path, (json.dumps(obj, indent=1, allow_nan=False, sort_keys=False) + "\n").encode("utf-8"))


def _save_structured(path: Path, state_dict: Mapping[str, Any], cls: str, what: str) -> None:
    """Tensors into the safetensors body, everything else as JSON in its metadata."""
    tensors: dict[str, torch.Tensor] = {}
    try:
        structure = encode_metadata(Encoder(tensors), dict(state_dict))
    except Unencodable as e:
        raise UserError(
            f"cannot save {what}: {e}; only tensors, numbers, strings, lists and dicts can be stored"
        ) from e
    save_tensors(path, tensors, {"format": FORMAT_NAME, "class": cls, "structure": structure})


def _save_scheduler(path: Path, scheduler: Any) -> None:
    encoder = Encoder(drop_unencodable=True)
    encoded = encoder.encode(dict(scheduler.state_dict()))
    if encoder.dropped:
        # e.g. a callable stored on a custom scheduler: the live object's value is kept on load instead.
        log.warning("scheduler %s: not saving non-data entries %s", class_name(scheduler), encoder.dropped)
    _write_json(path, {"class": class_name(scheduler), "state_dict": encoded, "dropped": encoder.dropped})


def write_rng(path: Path) -> None:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda/{i}"] = cuda_state
    bit_generator, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    tensors["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))  # uint32 values, stored losslessly as int64
    numpy_rest = {"bit_generator": bit_generator, "pos": int(pos), "has_gauss": int(has_gauss)}
    numpy_rest["cached_gaussian"] = float(cached_gaussian)  # repr round-trips a float exactly
    version, internal, gauss_next = random.getstate()
    metadata = {
        "format": FORMAT_NAME,
        "numpy": json.dumps(numpy_rest),
        "python_random": json.dumps({"version": version, "internal": list(internal), "gauss_next": gauss_next}),
    }
    save_tensors(path, tensors, metadata)


def _seal_and_publish(tmp: Path, final: Path, step: int, world_size: int, components: dict[str, list[str]]) -> None:
    """Write the manifest (last, so its presence means "complete") and rename the directory into place."""
    files = {}
    for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
        rel = file.relative_to(tmp).as_posix()
        files[rel] = {"bytes": file.stat().st_size, "sha256": sha256_file(file)}
    fsync_tree(tmp)  # files and entries written by every process, before the manifest vouches for them
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "step": step,
        "world_size": world_size,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "components": components,
        "files": files,
    }
    _write_json(tmp / MANIFEST_NAME, manifest)
    fsync_dir(tmp)
    # An existing checkpoint of this step (a re-save after a resume) is moved aside and deleted only after the new
    # one is in place, so an interruption never loses both; `_clean_scratch` puts it back if need be.
    replace_directory(tmp, final)


def _warn_if_newer_checkpoints(root: Path, step: int) -> None:
    newer = [p.name for s, p in complete_checkpoints(root) if s > step]
    if newer:
        log.warning(
            "checkpoints beyond step %d exist (%s); --resume latest will pick %s, not this one",
            step,
            ", ".join(newer),
            newer[-1],
        )


def _rotate(root: Path, keep_last: int, *, keep: Path) -> None:
    """Delete the oldest complete checkpoints beyond `keep_last`, never `keep`. Failures only warn: the new
    checkpoint is already complete."""
    complete = complete_checkpoints(root)
    excess = len(complete) - keep_last
    candidates = [path for _, path in complete if path != keep]
    for path in candidates[: max(excess, 0)]:
        try:
            # Renamed out of the step-* namespace first, so a half-deleted checkpoint never looks complete.
            trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{os.getpid()}")
            os.rename(path, trash)
            shutil.rmtree(trash)
            log.info("deleted old checkpoint %s (keep_last=%d)", path, keep_last)
        except OSError as e:
            log.warning("could not delete old checkpoint %s: %s", path, os_reason(e))
