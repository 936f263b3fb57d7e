"""The models a server may load: exactly the ones named on its command line, inspected before it starts.

A request chooses among these by name (`sd_model_checkpoint`); it never names a path, so no request field reaches
the file system. Each is a `ldm.models.spec.ModelSpec` (what the model is, from its headers and configs), the same
the CLI checks a request against; the worker opens it with `Pipeline.open`. The VAEs of --vae-dir (ComfyUI's
VAELoader names them) are listed the same way, checked as ldm-generate checks its --vae, and put on the model per
request by `Pipeline.use_vae`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldm.demo import NAME as DEMO_NAME
from ldm.errors import UserError
from ldm.models.load import check_latent_space
from ldm.models.spec import DEFAULT_MODEL, ModelSpec, inspect_model, read_json
from ldm.singlefile.load import check_vae_source


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


@dataclass(frozen=True)
class VAEFile:
    """One of --vae-dir's VAEs: where it is, and a diffusers directory's config (its latent space known before any
    weight is read; a single file's is known once loaded: `ldm.models.load.load_vae_for` checks it then)."""

    path: str
    config: dict[str, Any] | None


def list_vaes(vae_dir: str) -> dict[str, VAEFile]:
    """Each diffusers VAE directory (a config.json) and each `*.safetensors` file directly under `vae_dir`, checked
    as `ldm-generate --vae` checks its value, by the name clients send: the file's name as ComfyUI lists its
    models/vae folder (`vae-ft-mse.safetensors`), a directory's name."""
    root = Path(vae_dir).expanduser()
    if not root.is_dir():
        raise UserError(f"--vae-dir '{vae_dir}' is not a directory")
    out: dict[str, VAEFile] = {}
    for path in sorted(root.iterdir()):
        if (path / "config.json").is_file() or (path.is_file() and path.suffix == ".safetensors"):
            check_vae_source(path)
            out[path.name] = VAEFile(str(path), read_json(path / "config.json") if path.is_dir() else None)
    if not out:
        raise UserError(f"--vae-dir '{vae_dir}' holds no VAE (a diffusers VAE directory with a config.json, or a "
                        ".safetensors file)")
    return out


def check_vae_fits(vae: VAEFile, name: str, spec: ModelSpec) -> None:
    """A directory VAE's latent space against the model's, from configs alone (a one-line `UserError`)."""
    if vae.config is None:
        return
    if spec.single_file:  # its VAE's config as read from the header (None: a file without a VAE)
        model_config = spec.detected.vae_config if spec.detected is not None else None
    else:
        model_config = read_json(spec.root / "vae" / "config.json")
    if model_config is not None:
        check_latent_space(vae.config, model_config, name)
