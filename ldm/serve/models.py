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
    name: str  # what clients send as sd_model_checkpoint; the last part of the --model value
    spec: str  # the --model value as given: what the PNG metadata records, as ldm-generate does
    root: Path
    vae_factor: int
    default_size: int
    max_steps: int  # the scheduler's training timesteps


def list_models(models: list[str] | None, models_dir: str | None) -> dict[str, ModelEntry]:
    """--model values (repeatable) and every model directory directly under --models-dir, in that order."""
    specs = list(models or [])
    if models_dir:
        root = Path(models_dir).expanduser()
        if not root.is_dir():
            raise UserError(f"--models-dir '{models_dir}' is not a directory")
        specs += [str(p) for p in sorted(root.iterdir()) if (p / "model_index.json").is_file()]
        if not specs:
            raise UserError(f"--models-dir '{models_dir}' holds no model directory (one with a model_index.json)")
    if not specs:
        specs = [DEFAULT_MODEL]
    out: dict[str, ModelEntry] = {}
    for spec in specs:
        root = resolve_model(spec)
        check_model(root)
        name = DEMO_NAME if spec == DEMO_NAME else Path(spec).name or spec
        if name in out:
            raise UserError(f"two models are named '{name}' ({out[name].spec} and {spec}); rename one directory")
        scheduler = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
        out[name] = ModelEntry(name, spec, root, read_vae_factor(root), read_default_size(root),
                               int(scheduler.get("num_train_timesteps", 1000)))
    return out
