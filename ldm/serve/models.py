"""The models a server may load: exactly the ones named on its command line, inspected before it starts.

A request chooses among these by name (`sd_model_checkpoint`); it never names a path, so no request field reaches
the file system. Each is a `ldm.models.spec.ModelSpec` (what the model is, from its headers and configs), the same
the CLI checks a request against; the worker opens it with `Pipeline.open`.
"""

from __future__ import annotations

from pathlib import Path

from ldm.demo import NAME as DEMO_NAME
from ldm.errors import UserError
from ldm.models.spec import DEFAULT_MODEL, ModelSpec, inspect_model


def _listable(path: Path) -> bool:
    """A --models-dir entry: a diffusers-format directory, or a single-file checkpoint (ldm/singlefile)."""
    return (path / "model_index.json").is_file() or (path.is_file() and path.suffix == ".safetensors")


def model_name(spec: str) -> str:
    """The name clients send: the directory's name, a single file's stem (`sd15.safetensors` -> `sd15`)."""
    if spec == DEMO_NAME:
        return DEMO_NAME
    path = Path(spec)
    return (path.stem if path.suffix == ".safetensors" and path.is_file() else path.name) or spec


def list_models(models: list[str] | None, models_dir: str | None) -> dict[str, ModelSpec]:
    """--model values (repeatable), then every model directory and `*.safetensors` file directly under
    --models-dir, by the name clients send."""
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
    out: dict[str, ModelSpec] = {}
    for spec in specs:
        inspected = inspect_model(spec)
        name = model_name(spec)
        if name in out:
            raise UserError(f"two models are named '{name}' ({out[name].name} and {spec}); rename one of them")
        out[name] = inspected
    return out
