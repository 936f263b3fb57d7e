"""Crash-safe, pickle-free training checkpoints for `accelerate` training loops.

A checkpoint is a directory `root/step-00001000/`:

    manifest.json                 written last: format, step, world size, components, every file's bytes + sha256
    state.json                    the caller's `state` (step, epoch, data position, ...)
    models/<name>.safetensors     unwrapped `state_dict()` (plain safetensors, loadable by any tool)
    optimizers/<name>.safetensors optimizer tensors as `state/<param_id>/<name>`; the rest (param_groups, scalars)
                                  as JSON in the safetensors metadata under "structure"
    schedulers/<name>.json        LR scheduler `state_dict()`
    ema/<name>.safetensors        diffusers `EMAModel` shadow params as `shadow_params/<i>`; scalars in metadata
    rng_<rank>.safetensors        one per process: torch CPU/CUDA, numpy and python `random` states

Why it survives `kill -9` and full disks: everything is written into `root/.tmp-step-00001000/`, fsynced, sealed
with the manifest and only then renamed into place (a rename is atomic), so a `step-*` directory with a manifest is
always complete. Rotation renames old checkpoints out of the `step-*` namespace before deleting them, and never
touches the new one. Stale temporaries are cleaned by the next save.

Under FSDP (version 2) the sharded model, optimizer and EMA state, and under DeepSpeed ZeRO-1/2 the partitioned fp32
master weights and optimizer state, are gathered into whole tensors first and written by the main process in exactly
this layout (optimizer state then keyed by parameter name), so a checkpoint moves freely between FSDP, DeepSpeed, DDP
and single-process runs (ldm/sharding.py, ldm/zero.py).

Every function that takes an `accelerator` is collective: call it on all processes. Failures on any process are
shared with all others before anyone raises, so no process is left waiting in a collective.

No pickle anywhere: tensors go to safetensors, everything else to JSON through a small tagged encoding that
round-trips tuples, non-string dict keys, inf/nan and tensors exactly.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import random
import re
import shutil
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.scheduler import AcceleratedScheduler
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ldm.errors import UserError
from ldm.files import fsync_dir, sha256_file
from ldm.sharding import (
    full_model_state, full_optimizer_state, full_tensors, is_sharded, load_full_model_state,
    load_full_optimizer_state, require_supported_setup, shard_like,
)
from ldm.zero import is_zero

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

log = logging.getLogger(__name__)

FORMAT_NAME = "ldm-checkpoint"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
STATE_NAME = "state.json"

_STEP_DIR = re.compile(r"^step-(\d{8,})$")
# Names of our own scratch directories inside `root`; only these are ever cleaned up automatically.
_TMP_PREFIX = ".tmp-"  # a checkpoint being written
_OLD_PREFIX = ".old-"  # a checkpoint of the same step moved aside while its replacement is renamed into place
_TRASH_PREFIX = ".trash-"  # a checkpoint being deleted by rotation
_SCRATCH_DIR = re.compile(r"^\.(tmp|old|trash)-step-\d{8,}(-\d+)?$")
_COMPONENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# Load verifies sha256 of files up to this size; bigger ones (model weights, optimizer moments) are checked by size
# and safetensors header only, so that resuming a multi-GB run on every process does not re-hash gigabytes.
_HASH_VERIFY_MAX_BYTES = 64 * 1024 * 1024
# Room for one error message per process when processes tell each other about failures.
_MESSAGE_BYTES = 1024


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------


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
    _check_supported(accelerator, optimizers, models)
    _check_save_args(step, keep_last, models, optimizers, schedulers, emas)
    root = Path(root)
    name = _step_dirname(step)
    final, tmp = root / name, root / f"{_TMP_PREFIX}{name}"
    previous = latest_checkpoint(root)  # looked up before anything changes, for the error message
    is_main = accelerator.is_main_process

    def describe_write_failure(reason: str) -> str:
        return f"could not write checkpoint to {root}: {reason}; the previous checkpoint {previous or 'none'} is intact"

    def share_failures(error: Exception | None) -> None:
        # Collective: every process learns of every failure; on failure the temp dir goes and all processes raise.
        failures = _gather_failures(accelerator, error)
        if failures and is_main:
            _remove_tree(tmp)
        _raise_failures(failures, error, describe_write_failure)

    # Phase 1: the main process makes an empty temp directory that the others can write their RNG state into.
    share_failures(_attempt(lambda: _prepare_temp_dir(root, tmp)) if is_main else None)
    # Whole tensors on the main process (under FSDP or DeepSpeed a collective gather; otherwise the live state dicts).
    whole = _whole_states(accelerator, models, optimizers, emas) if is_main or is_sharded(accelerator) else {}

    # Phase 2: every process writes its own RNG state; the main process writes everything else.
    def write_contents() -> dict[str, list[str]]:
        _write_rng(tmp / f"rng_{accelerator.process_index}.safetensors")
        if not is_main:
            return {}
        return _write_components(tmp, whole, schedulers, state)

    components: dict[str, list[str]] = {}
    share_failures(_attempt(lambda: components.update(write_contents())))

    # Phase 3: the main process seals the checkpoint, renames it into place and rotates old ones. The final sync
    # doubles as the barrier that keeps every process from continuing before the checkpoint exists.
    error = None
    if is_main:
        error = _attempt(lambda: _seal_and_publish(tmp, final, step, accelerator.num_processes, components))
        if error is None:
            _warn_if_newer_checkpoints(root, step)
            if keep_last is not None:
                _rotate(root, keep_last, keep=final)
    share_failures(error)
    if is_main:
        log.info("saved checkpoint %s", final)
    return final


def load_checkpoint(
    accelerator: Accelerator,
    path: str | Path,
    *,
    models: Mapping[str, torch.nn.Module] = {},
    optimizers: Mapping[str, torch.optim.Optimizer] = {},
    schedulers: Mapping[str, Any] = {},
    emas: Mapping[str, EMAModel] = {},
) -> dict[str, Any]:
    """Restore the given objects and this process's RNG state from a checkpoint; return the saved `state`.

    Call on all processes, after `accelerator.prepare`. Any subset of the saved components may be loaded.
    A missing, incomplete or corrupt checkpoint, or one that does not fit the models, raises `UserError`.
    """
    _check_supported(accelerator, optimizers, models)
    path = Path(path)
    loaded: dict[str, Any] = {}

    def load() -> None:
        manifest = _validate_checkpoint(path)
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
            _load_ema(path, name, ema)
        loaded.update(_read_state(path))
        # Last, so that nothing above can consume random numbers after the restore.
        _restore_rng(path, manifest, accelerator.process_index, accelerator.num_processes, accelerator.is_main_process)

    error = _attempt(load)
    failures = _gather_failures(accelerator, error)
    _raise_failures(failures, error, lambda reason: f"could not read checkpoint {path}: {reason}")
    if accelerator.is_main_process:
        log.info("resumed from checkpoint %s", path)
    return loaded


def latest_checkpoint(root: str | Path, before: int | None = None) -> Path | None:
    """The highest-step complete checkpoint (`step-<8+ digits>/` with a readable manifest) under `root`, or None.

    With `before`, the highest one whose step is lower than that.
    """
    found = [(s, p) for s, p in _complete_checkpoints(Path(root)) if before is None or s < before]
    return found[-1][1] if found else None


def resolve_resume(resume: str | Path | None, root: str | Path) -> Path | None:
    """Turn a `--resume` value into a checkpoint path: None/""/"none" -> None, "latest" -> the newest under `root`
    (None when there is none), anything else -> that checkpoint, validated."""
    if resume is None:
        return None
    text = str(resume).strip()
    if text.lower() in ("", "none"):
        return None
    if text.lower() == "latest":
        found = latest_checkpoint(root)
        if found is None:
            log.info("no checkpoint under %s; starting fresh", root)
        else:
            log.info("resuming from the latest checkpoint %s", found)
        return found
    path = Path(text).expanduser()
    if not path.exists():
        raise UserError(
            f"--resume {text}: no such checkpoint; pass an existing step-XXXXXXXX directory, 'latest' or 'none'"
        )
    if path.is_dir() and not (path / MANIFEST_NAME).exists():
        inner = latest_checkpoint(path)
        if inner is not None:
            raise UserError(f"--resume {text} is a folder of checkpoints, not a checkpoint; pass --resume {inner}")
    _validate_checkpoint(path)
    return path


def checkpoint_step(path: str | Path) -> int:
    """The training step a checkpoint was saved at (from its manifest)."""
    return int(_read_manifest(Path(path))["step"])


# ----------------------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------------------


def _check_supported(accelerator: Accelerator, optimizers: Mapping[str, Any], models: Mapping[str, Any]) -> None:
    # FSDP1, ZeRO-3 and Megatron keep state in their own layouts; refuse rather than save one process's shard.
    require_supported_setup(accelerator, sharding=True)
    if is_sharded(accelerator):
        for name in optimizers:
            if name not in models:
                raise UserError(f"under FSDP or DeepSpeed, optimizer {name!r} needs the model it optimizes under the "
                                f"same name in models= (it has: {', '.join(models) or 'none'})")


def _check_save_args(
    step: int,
    keep_last: int | None,
    *named: Mapping[str, Any],
) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise UserError(f"checkpoint step must be a non-negative integer, got {step!r}")
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise UserError(f"keep_last must be a positive integer or None (keep all), got {keep_last!r}")
    for group in named:
        for name in group:
            if not isinstance(name, str) or not _COMPONENT_NAME.match(name):
                raise UserError(
                    f"checkpoint component name {name!r} is not a valid file name; use letters, digits, '_', '.', '-'"
                )


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


# ----------------------------------------------------------------------------------------------------------------
# Agreeing on failures across processes
# ----------------------------------------------------------------------------------------------------------------

_OK, _OS_ERROR, _USER_ERROR, _OTHER_ERROR = 0, 1, 2, 3


def _attempt(fn: Callable[[], Any]) -> Exception | None:
    """Run `fn`, returning its exception instead of raising, so the failure can be shared with the other processes."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - every failure must reach the other processes, then it is re-raised
        return e
    return None


def _error_kind(error: Exception | None) -> int:
    if error is None:
        return _OK
    if isinstance(error, UserError):
        return _USER_ERROR
    if isinstance(error, OSError):
        return _OS_ERROR
    return _OTHER_ERROR


def _os_reason(error: OSError) -> str:
    reason = error.strerror or str(error)
    return f"{reason} ({error.filename})" if error.filename else reason


def _error_text(error: Exception) -> str:
    return _os_reason(error) if isinstance(error, OSError) else str(error)


def _gather_failures(accelerator: Accelerator, error: Exception | None) -> list[tuple[int, int, str]]:
    """Every process learns (rank, kind, message) of every failed process. Also a barrier.

    Messages travel as a fixed-size uint8 tensor through `accelerator.gather`, which works on every backend
    (gloo, NCCL) and avoids pickling objects.
    """
    if accelerator.num_processes == 1:
        return [] if error is None else [(0, _error_kind(error), _error_text(error))]
    row = torch.zeros(1, 1 + _MESSAGE_BYTES, dtype=torch.uint8)
    row[0, 0] = _error_kind(error)
    if error is not None:
        text = _error_text(error).encode("utf-8", "replace")[:_MESSAGE_BYTES]
        row[0, 1 : 1 + len(text)] = torch.tensor(list(text), dtype=torch.uint8)
    rows = accelerator.gather(row.to(accelerator.device)).cpu()
    failures = []
    for rank, r in enumerate(rows):
        kind = int(r[0])
        if kind != _OK:
            text = bytes(r[1:].tolist()).rstrip(b"\0").decode("utf-8", "replace")
            failures.append((rank, kind, text))
    return failures


def _raise_failures(
    failures: list[tuple[int, int, str]],
    error: Exception | None,
    describe_os_failure: Callable[[str], str],
) -> None:
    """Raise on every process if any process failed: this process's own error if it had one, else the first other's.

    OS errors (disk full, permission denied, I/O errors) become `UserError`s worded by `describe_os_failure`.
    """
    if not failures:
        return
    if error is not None:
        if isinstance(error, OSError):
            raise UserError(describe_os_failure(_os_reason(error))) from error
        raise error
    rank, kind, text = failures[0]
    if kind == _OS_ERROR:
        raise UserError(describe_os_failure(f"{text} (on process {rank})"))
    if kind == _USER_ERROR:
        raise UserError(text)
    raise RuntimeError(f"checkpoint operation failed on process {rank}: {text}")


# ----------------------------------------------------------------------------------------------------------------
# Files: durable writes, safetensors with structure metadata
# ----------------------------------------------------------------------------------------------------------------


def _fsync_file(path: Path) -> None:
    # fsync through a fresh descriptor flushes the inode's dirty pages however the file was written (safetensors
    # writes from Rust); delayed-allocation filesystems report a full disk only here.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, obj: Any) -> None:
    # allow_nan=False: strict JSON; non-finite floats are tagged by the encoder instead.
    _write_text(path, json.dumps(obj, indent=1, allow_nan=False, sort_keys=False) + "\n")


def _storable(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors with no shared storage, as safetensors requires (tied weights share storage)."""
    out: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for key, tensor in tensors.items():
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")  # a fresh copy: cannot share storage
        else:
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen_storage or not t.is_contiguous():
                t = t.clone(memory_format=torch.contiguous_format)
            seen_storage.add(ptr)
        out[key] = t
    return out


def _save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file and fsync it. I/O failures surface as OSError (safetensors reports them as its own
    error type), so disk-full is handled like any other write failure."""
    try:
        save_file(_storable(tensors), str(path), metadata=metadata)
    except SafetensorError as e:
        message = str(e)
        if "I/O error" in message or "os error" in message:
            code = re.search(r"os error (\d+)", message)
            raise OSError(int(code.group(1)) if code else errno.EIO, message, str(path)) from e
        raise
    _fsync_file(path)


def _read_tensors(
    checkpoint: Path, relpath: str, *, header_only: bool = False
) -> tuple[dict[str, torch.Tensor | tuple[int, ...]], dict[str, str]]:
    """Tensors (or, with `header_only`, their shapes) and metadata of one safetensors file in a checkpoint."""
    try:
        with safe_open(str(checkpoint / relpath), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if header_only:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, metadata
            return {k: f.get_tensor(k) for k in f.keys()}, metadata
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(_corrupt_message(checkpoint, relpath, f"is unreadable ({str(e).splitlines()[0]})")) from e


def _remove_tree(path: Path) -> None:
    """Best-effort removal of our own scratch directory; a failure here must not hide the error being reported."""
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():
            log.warning("could not remove %s; delete it by hand (the next save also retries)", path)


# ----------------------------------------------------------------------------------------------------------------
# JSON encoding without pickle: tensors, tuples, non-string keys and inf/nan round-trip exactly
# ----------------------------------------------------------------------------------------------------------------

_TAGS = ("__tensor__", "__ndarray__", "__tuple__", "__float__", "__pairs__", "__counter__")
PathKey = tuple[Any, ...]


class _Unencodable(Exception):
    def __init__(self, path: PathKey, value: Any):
        super().__init__(f"value at '{'/'.join(map(str, path)) or '.'}' has type {type(value).__name__}")
        self.path, self.value = path, value


class _Encoder:
    """Turns a nested state into JSON-able data.

    With a `tensors` dict, tensors are moved there under their path ("state/0/exp_avg") and referenced by key;
    without one they are inlined as hex bytes (fine for the few small tensors in schedulers or `state`).
    With `drop_unencodable`, values that cannot be stored (e.g. functions) become None and their paths are listed
    in `dropped`, so loading can keep the live object's value there instead of overwriting it.
    """

    def __init__(self, tensors: dict[str, torch.Tensor] | None = None, drop_unencodable: bool = False):
        self.tensors = tensors
        self.drop_unencodable = drop_unencodable
        self.dropped: list[list[Any]] = []

    def encode(self, value: Any, path: PathKey = ()) -> Any:
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, str):
            return str(value)  # also str-based enums
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return float(value) if math.isfinite(value) else {"__float__": repr(float(value))}
        if isinstance(value, torch.Tensor):
            return {"__tensor__": self._tensor(value, path)}
        if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
            return {"__ndarray__": self._tensor(torch.from_numpy(np.ascontiguousarray(value).copy()), path)}
        if isinstance(value, np.generic):
            return self.encode(value.item(), path)
        if isinstance(value, tuple):
            return {"__tuple__": [self.encode(v, path + (i,)) for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self.encode(v, path + (i,)) for i, v in enumerate(value)]
        if isinstance(value, Mapping):
            return self._mapping(value, path)
        if self.drop_unencodable:
            self.dropped.append(list(path))
            return None
        raise _Unencodable(path, value)

    def _mapping(self, value: Mapping[Any, Any], path: PathKey) -> Any:
        plain = all(isinstance(k, str) for k in value) and not any(k in _TAGS for k in value)
        if plain and not isinstance(value, Counter):
            return {k: self.encode(v, path + (k,)) for k, v in value.items()}
        # Keys that JSON would turn into strings (optimizer param ids are ints) are kept as [key, value] pairs.
        pairs = [[self.encode(k, path + ("<key>",)), self.encode(v, path + (k,))] for k, v in value.items()]
        return {"__counter__" if isinstance(value, Counter) else "__pairs__": pairs}

    def _tensor(self, tensor: torch.Tensor, path: PathKey) -> Any:
        t = tensor.detach().cpu()
        if self.tensors is None:
            raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
            return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "hex": raw.hex()}
        key = "/".join(str(p) for p in path) or "tensor"
        unique, n = key, 1
        while unique in self.tensors:  # e.g. dict keys 1 and "1" at the same level
            unique, n = f"{key}#{n}", n + 1
        self.tensors[unique] = t
        return unique


def _decode(
    data: Any,
    tensors: Mapping[str, torch.Tensor] | None = None,
    dropped: Iterable[Iterable[Any]] = (),
    live: Any = None,
) -> Any:
    """Inverse of `_Encoder.encode`; values at `dropped` paths are taken from `live` (the object's current state)."""
    dropped_paths = {tuple(p) for p in dropped}

    def tensor(ref: Any) -> torch.Tensor:
        if isinstance(ref, str):
            if tensors is None or ref not in tensors:
                raise ValueError(f"tensor {ref!r} is missing from the checkpoint file")
            return tensors[ref]
        dtype = getattr(torch, ref["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown tensor dtype {ref['dtype']!r}")
        raw = bytes.fromhex(ref["hex"])
        if not raw:
            return torch.empty(ref["shape"], dtype=dtype)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(ref["shape"]).clone()

    def walk(value: Any, path: PathKey) -> Any:
        if path in dropped_paths:
            return _lookup(live, path)
        if isinstance(value, list):
            return [walk(v, path + (i,)) for i, v in enumerate(value)]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            (tag, inner), = value.items()
            if tag == "__tensor__":
                return tensor(inner)
            if tag == "__ndarray__":
                return tensor(inner).numpy()
            if tag == "__tuple__":
                return tuple(walk(v, path + (i,)) for i, v in enumerate(inner))
            if tag == "__float__":
                return float(inner)
            if tag in ("__pairs__", "__counter__"):
                items = {}
                for k, v in inner:
                    key = walk(k, path + ("<key>",))
                    items[key] = walk(v, path + (key,))
                return Counter(items) if tag == "__counter__" else items
        return {k: walk(v, path + (k,)) for k, v in value.items()}

    return walk(data, ())


def _lookup(tree: Any, path: PathKey) -> Any:
    node = tree
    for key in path:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def _encode_metadata(encoder: _Encoder, value: Any) -> str:
    return json.dumps(encoder.encode(value), allow_nan=False, separators=(",", ":"))


# ----------------------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------------------

_SUBDIRS = ("models", "optimizers", "schedulers", "ema")


def _step_dirname(step: int) -> str:
    return f"step-{step:08d}"


def _prepare_temp_dir(root: Path, tmp: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    _clean_scratch(root)
    _remove_tree(tmp)
    if tmp.exists():
        raise OSError(errno.EEXIST, "a stale temporary checkpoint could not be removed", str(tmp))
    tmp.mkdir()
    for sub in _SUBDIRS:
        (tmp / sub).mkdir()


def _clean_scratch(root: Path) -> None:
    """Remove leftovers of interrupted saves and deletions; put back a checkpoint moved aside by an interrupted
    re-save of the same step if its replacement never arrived."""
    for entry in sorted(root.iterdir()):
        if not entry.is_dir() or not _SCRATCH_DIR.match(entry.name):
            continue
        if entry.name.startswith(_OLD_PREFIX):
            original = root / entry.name[len(_OLD_PREFIX) :]
            if not original.exists() and _read_manifest_or_none(entry) is not None:
                os.rename(entry, original)
                log.warning("restored %s, which an interrupted save had moved aside", original)
                continue
        log.info("removing leftover %s from an interrupted save", entry)
        _remove_tree(entry)


def _whole_states(
    accelerator: Accelerator,
    models: Mapping[str, torch.nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
    emas: Mapping[str, EMAModel],
) -> dict[str, dict[str, Any]]:
    """{"models": {name: state_dict}, "optimizers"|"emas": {name: (state_dict, class name)}} with whole tensors;
    complete on the main process (when sharded the others get empty states). Collective when sharded."""
    emas_whole = {}
    for name, ema in emas.items():
        state = ema.state_dict()
        state["shadow_params"] = full_tensors(accelerator, list(state["shadow_params"]))
        emas_whole[name] = (state, _class_name(ema))
    return {
        "models": {name: full_model_state(accelerator, model) for name, model in models.items()},
        "optimizers": {
            name: (full_optimizer_state(accelerator, models.get(name), optimizer), _class_name(optimizer))
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
        _save_tensors(tmp / "models" / f"{name}.safetensors", weights, {"format": "pt"})
    for name, (optimizer_state, class_name) in whole["optimizers"].items():
        path = tmp / "optimizers" / f"{name}.safetensors"
        _save_structured(path, optimizer_state, class_name, f"optimizer {name!r}")
    for name, scheduler in schedulers.items():
        _save_scheduler(tmp / "schedulers" / f"{name}.json", scheduler)
    for name, (ema_state, class_name) in whole["emas"].items():
        _save_structured(tmp / "ema" / f"{name}.safetensors", ema_state, class_name, f"EMA {name!r}")
    try:
        encoded_state = _Encoder().encode(dict(state))
    except _Unencodable as e:
        raise UserError(
            f"cannot save checkpoint state: {e}; store only numbers, strings, lists, dicts, tensors or numpy arrays"
        ) from e
    _write_json(tmp / STATE_NAME, encoded_state)
    return {kind: list(whole[kind]) for kind in ("models", "optimizers", "emas")} | {"schedulers": list(schedulers)}


def _save_structured(path: Path, state_dict: Mapping[str, Any], class_name: str, what: str) -> None:
    """Tensors into the safetensors body, everything else as JSON in its metadata."""
    tensors: dict[str, torch.Tensor] = {}
    try:
        structure = _encode_metadata(_Encoder(tensors), dict(state_dict))
    except _Unencodable as e:
        raise UserError(
            f"cannot save {what}: {e}; only tensors, numbers, strings, lists and dicts can be stored"
        ) from e
    _save_tensors(path, tensors, {"format": FORMAT_NAME, "class": class_name, "structure": structure})


def _save_scheduler(path: Path, scheduler: Any) -> None:
    encoder = _Encoder(drop_unencodable=True)
    encoded = encoder.encode(dict(scheduler.state_dict()))
    if encoder.dropped:
        # e.g. a callable stored on a custom scheduler: the live object's value is kept on load instead.
        log.warning("scheduler %s: not saving non-data entries %s", _class_name(scheduler), encoder.dropped)
    _write_json(path, {"class": _class_name(scheduler), "state_dict": encoded, "dropped": encoder.dropped})


def _write_rng(path: Path) -> None:
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
    _save_tensors(path, tensors, metadata)


def _seal_and_publish(tmp: Path, final: Path, step: int, world_size: int, components: dict[str, list[str]]) -> None:
    """Write the manifest (last, so its presence means "complete") and rename the directory into place."""
    files = {}
    for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
        rel = file.relative_to(tmp).as_posix()
        files[rel] = {"bytes": file.stat().st_size, "sha256": sha256_file(file)}
    for directory in [tmp / sub for sub in _SUBDIRS] + [tmp]:
        fsync_dir(directory)  # entries written by every process, before the manifest vouches for them
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
    _publish(tmp, final)


def _publish(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`. An existing `final` (a re-save of the same step) is moved aside first and deleted
    only after the new one is in place, so an interruption never loses both."""
    aside = None
    if final.exists():
        aside = final.with_name(f"{_OLD_PREFIX}{final.name}")
        _remove_tree(aside)
        os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except OSError:
        if aside is not None:
            os.rename(aside, final)
        raise
    fsync_dir(final.parent)
    if aside is not None:
        _remove_tree(aside)


def _warn_if_newer_checkpoints(root: Path, step: int) -> None:
    newer = [p.name for s, p in _complete_checkpoints(root) if s > step]
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
    complete = _complete_checkpoints(root)
    excess = len(complete) - keep_last
    candidates = [path for _, path in complete if path != keep]
    for path in candidates[: max(excess, 0)]:
        try:
            # Renamed out of the step-* namespace first, so a half-deleted checkpoint never looks complete.
            trash = path.with_name(f"{_TRASH_PREFIX}{path.name}-{os.getpid()}")
            os.rename(path, trash)
            shutil.rmtree(trash)
            log.info("deleted old checkpoint %s (keep_last=%d)", path, keep_last)
        except OSError as e:
            log.warning("could not delete old checkpoint %s: %s", path, _os_reason(e))


# ----------------------------------------------------------------------------------------------------------------
# Finding and validating checkpoints
# ----------------------------------------------------------------------------------------------------------------


def _read_manifest(path: Path) -> dict[str, Any]:
    with open(path / MANIFEST_NAME, encoding="utf-8") as f:
        manifest = json.load(f)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{MANIFEST_NAME} is not an {FORMAT_NAME} manifest")
    return manifest


def _read_manifest_or_none(path: Path) -> dict[str, Any] | None:
    try:
        return _read_manifest(path)
    except (OSError, ValueError):
        return None


def _complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under `root`, by increasing step."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir() and _read_manifest_or_none(entry) is not None:
            found.append((int(match.group(1)), entry))
    return sorted(found)


def _resume_hint(checkpoint: Path) -> str:
    earlier = [p for _, p in _complete_checkpoints(checkpoint.parent) if p.name != checkpoint.name]
    if earlier:
        return f"resume from an earlier checkpoint with --resume {earlier[-1]}"
    return "start fresh with --resume none"


def _corrupt_message(checkpoint: Path, relpath: str, problem: str) -> str:
    return f"corrupt checkpoint {checkpoint}: {relpath} {problem}; {_resume_hint(checkpoint)}"


def _validate_checkpoint(path: Path) -> dict[str, Any]:
    """Check the manifest and every file it lists (size, small files' sha256, safetensors headers, JSON)."""
    if not path.is_dir():
        raise UserError(
            f"checkpoint {path} is not a directory; pass a step-XXXXXXXX directory, 'latest' or 'none' to --resume"
        )
    if not (path / MANIFEST_NAME).is_file():
        raise UserError(
            f"incomplete checkpoint {path}: no {MANIFEST_NAME} (its save was interrupted); {_resume_hint(path)}"
        )
    try:
        manifest = _read_manifest(path)
    except (OSError, ValueError) as e:
        raise UserError(_corrupt_message(path, MANIFEST_NAME, f"is unreadable ({e})")) from e
    if manifest.get("version", 0) > FORMAT_VERSION:
        raise UserError(
            f"checkpoint {path} has format version {manifest.get('version')}, newer than this code supports "
            f"({FORMAT_VERSION}); update ldm"
        )
    for relpath, info in manifest.get("files", {}).items():
        _validate_file(path, relpath, info)
    return manifest


def _validate_file(checkpoint: Path, relpath: str, info: Mapping[str, Any]) -> None:
    file = checkpoint / relpath
    if not file.is_file():
        raise UserError(_corrupt_message(checkpoint, relpath, "is missing"))
    size = file.stat().st_size
    if size != info["bytes"]:
        problem = f"has {size} bytes instead of {info['bytes']} (truncated?)"
        raise UserError(_corrupt_message(checkpoint, relpath, problem))
    if size <= _HASH_VERIFY_MAX_BYTES and "sha256" in info and sha256_file(file) != info["sha256"]:
        raise UserError(_corrupt_message(checkpoint, relpath, "does not match its sha256 in the manifest"))
    if relpath.endswith(".safetensors"):
        _check_safetensors_header(checkpoint, relpath)
    elif relpath.endswith(".json"):
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(_corrupt_message(checkpoint, relpath, f"is not valid JSON ({e})")) from e


def _check_safetensors_header(checkpoint: Path, relpath: str) -> None:
    """Parse the header and check that the tensors it describes fit in the file (a cheap truncation check that
    does not read the data)."""
    file = checkpoint / relpath
    try:
        with open(file, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > file.stat().st_size:
                raise ValueError("header length exceeds the file")
            header = json.loads(f.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end != file.stat().st_size:
            raise ValueError("tensor data does not fill the file exactly")
        with safe_open(str(file), framework="pt", device="cpu"):
            pass
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, struct.error) as e:
        problem = f"is not a valid safetensors file ({str(e).splitlines()[0]})"
        raise UserError(_corrupt_message(checkpoint, relpath, problem)) from e


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def _unwrap(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    # Without torch.compile's wrapper, so keys never carry its "_orig_mod." prefix.
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def _class_name(obj: Any) -> str:
    # accelerate's wrappers forward state_dict to the real object; record and compare the real class.
    if isinstance(obj, AcceleratedOptimizer):
        obj = obj.optimizer
        if hasattr(obj, "bit16_groups"):  # DeepSpeed's ZeRO optimizer, around the torch optimizer ldm built
            obj = obj.optimizer
    elif isinstance(obj, AcceleratedScheduler):
        obj = obj.scheduler
    return type(obj).__name__


def _few(keys: Iterable[str], n: int = 5) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:n])
    return f"{shown} (+{len(keys) - n} more)" if len(keys) > n else shown


def _check_model_keys(checkpoint: Path, name: str, model: torch.nn.Module) -> None:
    saved, _ = _read_tensors(checkpoint, f"models/{name}.safetensors", header_only=True)
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
    weights, _ = _read_tensors(checkpoint, f"models/{name}.safetensors")
    current = _unwrap(accelerator, model).state_dict()
    cast = sorted(k for k, v in weights.items() if v.dtype != current[k].dtype)
    if cast and not is_zero(accelerator):  # DeepSpeed: the fp32 master weights get the saved values exactly
        log.warning(
            "model %r: %d tensors are cast from the checkpoint's dtype (e.g. %s); resume is not bit-exact",
            name,
            len(cast),
            cast[0],
        )
    load_full_model_state(accelerator, model, weights)


def _read_structured(checkpoint: Path, relpath: str, what: str, expected_class: str) -> dict[str, Any]:
    tensors, metadata = _read_tensors(checkpoint, relpath)
    if metadata.get("class") != expected_class:
        raise UserError(
            f"checkpoint {checkpoint} holds a {metadata.get('class')} for {what}, but the training script built a "
            f"{expected_class}; use the same {what.split()[0]} settings as the checkpoint "
            f"or start fresh with --resume none"
        )
    try:
        return _decode(json.loads(metadata["structure"]), tensors)
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(_corrupt_message(checkpoint, relpath, f"has unreadable structure ({e})")) from e


def _load_optimizer(
    accelerator: Accelerator, checkpoint: Path, name: str, optimizer: torch.optim.Optimizer, model: Any
) -> None:
    what = f"optimizer {name!r}"
    state_dict = _read_structured(checkpoint, f"optimizers/{name}.safetensors", what, _class_name(optimizer))
    if model is None and any(isinstance(k, str) for k in state_dict.get("state", {})):
        raise UserError(f"checkpoint {checkpoint} holds {what} keyed by parameter name (saved under FSDP or "
                        f"DeepSpeed): load it together with its model under the same name")
    try:
        load_full_optimizer_state(accelerator, model, optimizer, state_dict)
    except (ValueError, KeyError, RuntimeError) as e:
        raise UserError(
            f"checkpoint {checkpoint} does not fit {what}: {str(e).splitlines()[0]}; "
            f"build the optimizer over the same parameters, or start fresh with --resume none"
        ) from e


def _load_scheduler(checkpoint: Path, name: str, scheduler: Any) -> None:
    relpath = f"schedulers/{name}.json"
    saved = json.loads((checkpoint / relpath).read_text(encoding="utf-8"))
    if saved.get("class") != _class_name(scheduler):
        raise UserError(
            f"checkpoint {checkpoint} holds a {saved.get('class')} for scheduler {name!r}, but the training script "
            f"built a {_class_name(scheduler)}; use the same LR schedule as the checkpoint "
            f"or start fresh with --resume none"
        )
    # Entries that could not be stored (see _save_scheduler) keep the live scheduler's current value.
    state_dict = _decode(saved["state_dict"], dropped=saved.get("dropped", []), live=scheduler.state_dict())
    scheduler.load_state_dict(state_dict)


def _load_ema(checkpoint: Path, name: str, ema: EMAModel) -> None:
    what = f"EMA {name!r}"
    state_dict = _read_structured(checkpoint, f"ema/{name}.safetensors", what, _class_name(ema))
    shadow = state_dict.get("shadow_params", [])
    current = list(ema.shadow_params)
    if len(shadow) != len(current) or any(s.shape != c.shape for s, c in zip(shadow, current)):
        raise UserError(
            f"checkpoint {checkpoint} does not fit {what}: {len(shadow)} saved shadow tensors vs {len(current)} "
            f"in the model, or different shapes; build the EMA over the same model, or start fresh with --resume none"
        )
    # Each shadow tensor goes where the live EMA keeps it (e.g. on the GPU; this process's shard under FSDP).
    state_dict["shadow_params"] = [shard_like(s, c) for s, c in zip(shadow, current)]
    ema.load_state_dict(state_dict)


def _read_state(checkpoint: Path) -> dict[str, Any]:
    return _decode(json.loads((checkpoint / STATE_NAME).read_text(encoding="utf-8")))


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
    tensors, metadata = _read_tensors(checkpoint, relpath)
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
