"""The models a server may load: exactly the ones named on its command line, checked before it starts.

A request chooses among these by name (`sd_model_checkpoint`); it never names a path, so no request field reaches
the file system.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ldm.demo import NAME as DEMO_NAME
from ldm.errors import UserError
from ldm.pipeline.loading import DEFAULT_MODEL, check_model, read_default_size, read_vae_factor, resolve_model


@dataclass(frozen=True)
class ModelEntry:
    name: str  # what clients send as sd_model_checkpoint: the --model directory's name or file's stem
    spec: str  # the --model value as given: what the PNG metadata records, as ldm-generate does
    root: Path
    vae_factor: int
    default_size: int
    max_steps: int  # the scheduler's training timesteps


def _listable(path: Path) -> bool:
    """A --models-dir entry: a diffusers-format directory, or a single-file checkpoint (ldm/singlefile)."""
    return (path / "model_index.json").is_file() or (path.is_file() and path.suffix == ".safetensors")


def model_name(spec: str) -> str:
    """The name clients send: the directory's name, a single file's stem (`sd15.safetensors` -> `sd15`)."""
    if spec == DEMO_NAME:
        return DEMO_NAME
    path = Path(spec)
    return (path.stem if path.suffix == ".safetensors" and path.is_file() else path.name) or spec


def train_timesteps(root: Path) -> int:
    """The scheduler's training timesteps (the most steps a request may ask for), without loading the model: from
    scheduler/scheduler_config.json, or for a single file from its header (its metadata's scheduler, else the SD
    scheduler that `load_single_file` uses)."""
    if root.is_file():
        from ldm.singlefile.detect import detect
        from ldm.singlefile.load import SD_SCHEDULER

        scheduler = detect(root).scheduler_config or SD_SCHEDULER
    else:
        scheduler = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    return int(scheduler.get("num_train_timesteps", 1000))


def list_models(models: list[str] | None, models_dir: str | None) -> dict[str, ModelEntry]:
    """--model values (repeatable), then every model directory and `*.safetensors` file directly under
    --models-dir."""
    specs = list(models or [])
    if models_dir:
        root = Path(models_dir).expanduser()
        if not root.is_dir():
            raise UserError(f"--models-dir '{models_dir}' is not a directory")
        specs += [str(p) for p in sorted(root.iterdir()) if _listable(p)]
        if not specs:
            raise UserError(f"--models-dir '{models_dir}' holds no model (a directory with a model_index.json or "
                            "a .safetensors single file)")
    if not specs:
        specs = [DEFAULT_MODEL]
    out: dict[str, ModelEntry] = {}
    for spec in specs:
        root = resolve_model(spec)
        check_model(root)
        name = model_name(spec)
        if name in out:
            raise UserError(f"two models are named '{name}' ({out[name].spec} and {spec}); rename one of them")
        out[name] = ModelEntry(name, spec, root, read_vae_factor(root), read_default_size(root),
                               train_timesteps(root))
    return out
