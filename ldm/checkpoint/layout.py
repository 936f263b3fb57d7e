"""The on-disk format of a checkpoint: its names, its manifest, and finding the complete ones.

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
and single-process runs (ldm/parallel/).

No pickle anywhere: tensors go to safetensors, everything else to JSON through a small tagged encoding that
round-trips tuples, non-string dict keys, inf/nan and tensors exactly (`ldm/checkpoint/codec.py`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ldm.files import TMP_PREFIX

FORMAT_NAME = "ldm-checkpoint"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
STATE_NAME = "state.json"
SUBDIRS = ("models", "optimizers", "schedulers", "ema")

# Component names (models={"unet": ...}) become file names: models/unet.safetensors.
COMPONENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
STEP_DIR = re.compile(r"^step-(\d{8,})$")
# Names of our own scratch directories inside `root`; only these are ever cleaned up automatically.
# TMP_PREFIX: a checkpoint being written; OLD_PREFIX: a checkpoint of the same step moved aside while its
# replacement is renamed into place (both `ldm.files` names); TRASH_PREFIX: a checkpoint being deleted by rotation.
TRASH_PREFIX = ".trash-"
SCRATCH_DIR = re.compile(r"^\.(tmp|old|trash)-step-\d{8,}(-\d+)?$")


def step_dirname(step: int) -> str:
    return f"step-{step:08d}"


def temp_dirname(step: int) -> str:
    return f"{TMP_PREFIX}{step_dirname(step)}"


def read_manifest(path: Path) -> dict[str, Any]:
    with open(path / MANIFEST_NAME, encoding="utf-8") as f:
        manifest = json.load(f)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{MANIFEST_NAME} is not an {FORMAT_NAME} manifest")
    return manifest


def read_manifest_or_none(path: Path) -> dict[str, Any] | None:
    try:
        return read_manifest(path)
    except (OSError, ValueError):
        return None


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under `root`, by increasing step."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = STEP_DIR.match(entry.name)
        if match and entry.is_dir() and read_manifest_or_none(entry) is not None:
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(root: str | Path, before: int | None = None) -> Path | None:
    """The highest-step complete checkpoint (`step-<8+ digits>/` with a readable manifest) under `root`, or None.

    With `before`, the highest one whose step is lower than that.
    """
    found = [(s, p) for s, p in complete_checkpoints(Path(root)) if before is None or s < before]
    return found[-1][1] if found else None


def checkpoint_step(path: str | Path) -> int:
    """The training step a checkpoint was saved at (from its manifest)."""
    return int(read_manifest(Path(path))["step"])


def resume_hint(checkpoint: Path) -> str:
    earlier = [p for _, p in complete_checkpoints(checkpoint.parent) if p.name != checkpoint.name]
    if earlier:
        return f"resume from an earlier checkpoint with --resume {earlier[-1]}"
    return "start fresh with --resume none"


def corrupt_message(checkpoint: Path, relpath: str, problem: str) -> str:
    return f"corrupt checkpoint {checkpoint}: {relpath} {problem}; {resume_hint(checkpoint)}"
