"""Loading a checkpoint into live training objects, all or nothing, and restoring each process's RNG state.

The checkpoint is validated first, and every model is checked against its file before anything changes, so a
checkpoint that does not fit leaves the models untouched. Under FSDP and DeepSpeed the whole tensors on disk are
scattered into this process's shards (`ldm.parallel`).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ldm.checkpoint.codec import decode
from ldm.checkpoint.layout import STATE_NAME, corrupt_message
from ldm.checkpoint.support import check_supported, class_name
from ldm.checkpoint.tensors import read_tensors
from ldm.checkpoint.validate import validate_checkpoint
from ldm.errors import UserError
from ldm.parallel.backend import keyed_by_name
from ldm.parallel.collective import run_on_all
from ldm.parallel.setup import backend_for

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

log = logging.getLogger(__name__)


def load_checkpoint(
    accelerator: Accelerator,
    path: str | Path,
    *,
    models: Mapping[str, torch.nn.Module] = {},
    optimizers: Mapping[str, torch.optim.Optimizer] = {},
    schedulers: Mapping[str, Any] = {},
    emas: Mapping[str, EMAModel] = {},
    check_state: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Restore the given objects and this process's RNG state from a checkpoint; return the saved `state`.

    Call on all processes, after `accelerator.prepare`. Any subset of the saved components may be loaded.
    A missing, incomplete or corrupt checkpoint, or one that does not fit the models, raises `UserError`;
    `check_state` sees the saved `state` before anything is loaded and may refuse it (a `UserError`) as well.
    """
    check_supported(accelerator, optimizers, models)
    path = Path(path)
    loaded: dict[str, Any] = {}

    def load() -> None:
        manifest = validate_checkpoint(path)
        if check_state is not None:
            check_state(_read_state(path))
        _check_requested_components(path, manifest, models, optimizers, schedulers, emas)
        # Check every model against its file before changing anything, so a mismatch leaves all models untouched.
        unwrapped = {name: _unwrap(accelerator, model) for name, model in models.items()}
        for name, model in unwrapped.items():
            _check_model_keys(path, name, model)
        for name, model in models.items():
            _load_model(accelerator, path, name, model)
        for name, optimizer in optimizers.items():
            _load_optimizer(accelerator, path, name, optimizer, models.get(name))
        for name, scheduler in schedulers.items():
            _load_scheduler(path, name, scheduler)
        for name, ema in emas.items():
            _load_ema(accelerator, path, name, ema)
        loaded.update(_read_state(path))
        # Last, so that nothing above can consume random numbers after the restore.
        _restore_rng(path, manifest, accelerator.process_index, accelerator.num_processes, accelerator.is_main_process)

    run_on_all(
        accelerator, load, what="checkpoint operation",
        describe_os_error=lambda reason: f"could not read checkpoint {path}: {reason}",
    )
    if accelerator.is_main_process:
        log.info("resumed from checkpoint %s", path)
    return loaded


def _check_requested_components(
    path: Path,
    manifest: Mapping[str, Any],
    models: Mapping[str, Any],
    optimizers: Mapping[str, Any],
    schedulers: Mapping[str, Any],
    emas: Mapping[str, Any],
) -> None:
    saved = manifest.get("components", {})
    for kind, requested in (("models", models), ("optimizers", optimizers), ("schedulers", schedulers), ("emas", emas)):
        available = saved.get(kind, [])
        for name in requested:
            if name not in available:
                raise UserError(
                    f"checkpoint {path} has no {kind[:-1]} {name!r} (it has: {', '.join(available) or 'none'}); "
                    f"resume from a checkpoint of the same training setup or start fresh with --resume none"
                )


def _unwrap(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    # Without torch.compile's wrapper, so keys never carry its "_orig_mod." prefix.
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def _few(keys: Iterable[str], n: int = 5) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:n])
    return f"{shown} (+{len(keys) - n} more)" if len(keys) > n else shown


def _check_model_keys(checkpoint: Path, name: str, model: torch.nn.Module) -> None:
    saved, _ = read_tensors(checkpoint, f"models/{name}.safetensors", header_only=True)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = expected.keys() - saved.keys(), saved.keys() - expected.keys()
    wrong_shape = [k for k in expected.keys() & saved.keys() if expected[k] != saved[k]]
    problems = []
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_few(unexpected)}")
    if wrong_shape:
        k = sorted(wrong_shape)[0]
        problems.append(f"{len(wrong_shape)} shape mismatches, e.g. {k} {list(saved[k])} vs model {list(expected[k])}")
    if problems:
        raise UserError(
            f"checkpoint {checkpoint} does not fit model {name!r}: {'; '.join(problems)}; "
            f"build the model with the config it was trained with, or start fresh with --resume none"
        )


def _load_model(accelerator: Accelerator, checkpoint: Path, name: str, model: torch.nn.Module) -> None:
    weights, _ = read_tensors(checkpoint, f"models/{name}.safetensors")
    current = _unwrap(accelerator, model).state_dict()
    cast = sorted(k for k, v in weights.items() if v.dtype != current[k].dtype)
    # under DeepSpeed the fp32 master weights get the saved values exactly, whatever dtype the module holds
    if cast and not backend_for(accelerator).fp32_masters:
        log.warning(
            "model %r: %d tensors are cast from the checkpoint's dtype (e.g. %s); resume is not bit-exact",
            name,
            len(cast),
            cast[0],
        )
    backend_for(accelerator).load_model_state(model, weights)


def _read_structured(checkpoint: Path, relpath: str, what: str, expected_class: str) -> dict[str, Any]:
    tensors, metadata = read_tensors(checkpoint, relpath)
    if metadata.get("class") != expected_class:
        raise UserError(
            f"checkpoint {checkpoint} holds a {metadata.get('class')} for {what}, but the training script built a "
            f"{expected_class}; use the same {what.split()[0]} settings as the checkpoint "
            f"or start fresh with --resume none"
        )
    try:
        return decode(json.loads(metadata["structure"]), tensors)
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(corrupt_message(checkpoint, relpath, f"has unreadable structure ({e})")) from e


def _load_optimizer(
    accelerator: Accelerator, checkpoint: Path, name: str, optimizer: torch.optim.Optimizer, model: Any
) -> None:
    what = f"optimizer {name!r}"
    state_dict = _read_structured(checkpoint, f"optimizers/{name}.safetensors", what, class_name(optimizer))
    if model is None and keyed_by_name(state_dict):
        raise UserError(f"checkpoint {checkpoint} holds {what} keyed by parameter name (saved under FSDP or "
                        f"DeepSpeed): load it together with its model under the same name")
    try:
        backend_for(accelerator).load_optimizer_state(model, optimizer, state_dict)
    except (ValueError, KeyError, RuntimeError) as e:
        raise UserError(
            f"checkpoint {checkpoint} does not fit {what}: {str(e).splitlines()[0]}; "
            f"build the optimizer over the same parameters, or start fresh with --resume none"
        ) from e


def _load_scheduler(checkpoint: Path, name: str, scheduler: Any) -> None:
    relpath = f"schedulers/{name}.json"
    saved = json.loads((checkpoint / relpath).read_text(encoding="utf-8"))
    if saved.get("class") != class_name(scheduler):
        raise UserError(
            f"checkpoint {checkpoint} holds a {saved.get('class')} for scheduler {name!r}, but the training script "
            f"built a {class_name(scheduler)}; use the same LR schedule as the checkpoint "
            f"or start fresh with --resume none"
        )
    # Entries that could not be stored (see save.py, `_save_scheduler`) keep the live scheduler's current value.
    state_dict = decode(saved["state_dict"], dropped=saved.get("dropped", []), live=scheduler.state_dict())
    scheduler.load_state_dict(state_dict)


def _load_ema(accelerator: Accelerator, checkpoint: Path, name: str, ema: EMAModel) -> None:
    what = f"EMA {name!r}"
    state_dict = _read_structured(checkpoint, f"ema/{name}.safetensors", what, class_name(ema))
    shadow = state_dict.get("shadow_params", [])
    current = list(ema.shadow_params)
    if len(shadow) != len(current) or any(s.shape != c.shape for s, c in zip(shadow, current)):
        raise UserError(
            f"checkpoint {checkpoint} does not fit {what}: {len(shadow)} saved shadow tensors vs {len(current)} "
            f"in the model, or different shapes; build the EMA over the same model, or start fresh with --resume none"
        )
    # Each shadow tensor goes where the live EMA keeps it (e.g. on the GPU; this process's shard under FSDP).
    backend = backend_for(accelerator)
    state_dict["shadow_params"] = [backend.shard_like(s, c) for s, c in zip(shadow, current)]
    ema.load_state_dict(state_dict)


def _read_state(checkpoint: Path) -> dict[str, Any]:
    return decode(json.loads((checkpoint / STATE_NAME).read_text(encoding="utf-8")))


def _restore_rng(checkpoint: Path, manifest: Mapping[str, Any], rank: int, world_size: int, is_main: bool) -> None:
    saved_world = int(manifest.get("world_size", 1))
    relpath = f"rng_{rank}.safetensors"
    if saved_world != world_size or relpath not in manifest.get("files", {}):
        if is_main:
            log.warning(
                "checkpoint was saved by %d processes, now %d; every process restores process 0's RNG state",
                saved_world,
                world_size,
            )
        relpath = "rng_0.safetensors"
    tensors, metadata = read_tensors(checkpoint, relpath)
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_keys = sorted((k for k in tensors if k.startswith("torch_cuda/")), key=lambda k: int(k.split("/")[1]))
    cuda_states = [tensors[k] for k in cuda_keys]
    if torch.cuda.is_available() and cuda_states:
        count = torch.cuda.device_count()
        if count != len(cuda_states) and is_main:
            log.warning("checkpoint has CUDA RNG states for %d devices, this machine has %d", len(cuda_states), count)
        for i, cuda_state in enumerate(cuda_states[:count]):
            torch.cuda.set_rng_state(cuda_state, i)
    elif cuda_states and is_main:
        log.warning("checkpoint has CUDA RNG states but CUDA is not available; they are not restored")
    numpy_state = json.loads(metadata["numpy"])
    np.random.set_state(
        (
            numpy_state["bit_generator"],
            tensors["numpy_keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python_state = json.loads(metadata["python_random"])
    random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"]))
