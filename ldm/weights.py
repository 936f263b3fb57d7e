"""Check a model directory's files before diffusers reads them, so a broken download gets a message a user can act on.

diffusers' own errors for these cases are cryptic: a git-lfs pointer or a truncated file surfaces as
"HeaderTooLarge" or "MetadataIncompleteBuffer" without the file's name (diffusers #5520), and a pickle checkpoint
would be unpickled, which can run arbitrary code. Only safetensors weights are accepted.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ldm.errors import UserError

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHTED = ("unet", "vae", "text_encoder")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec"
LAYOUT = "a diffusers-format Stable Diffusion directory has unet/, vae/, text_encoder/, tokenizer/ and scheduler/"


def check_model_dir(root: Path, components: tuple[str, ...] = COMPONENTS) -> dict[str, str | None]:
    """Raise a `UserError` naming the first missing component or bad weight file; return each weighted component's
    safetensors variant (None, or e.g. 'fp16' when only `*.fp16.safetensors` files are there)."""
    for name in components:
        sub = root / name
        if not sub.is_dir():
            raise UserError(f"model directory '{root}' has no {name}/ ({LAYOUT})")
        config = "scheduler_config.json" if name == "scheduler" else None if name == "tokenizer" else "config.json"
        if config and not (sub / config).is_file():
            raise UserError(f"'{sub}' has no {config} ({LAYOUT})")
    return {name: check_weights(root / name) for name in WEIGHTED if name in components}


def check_weights(sub: Path) -> str | None:
    """Refuse a directory whose weights are pickles, missing, truncated or git-lfs pointers (naming the file);
    return the safetensors variant to load (None for plain files)."""
    files = sorted(p for p in sub.iterdir() if p.is_file())
    weights = [p for p in files if p.name.endswith(".safetensors")]
    if not weights:
        pickles = [p for p in files if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise UserError(
                f"'{pickles[0]}' is a pickle checkpoint; only safetensors weights are loaded, because unpickling a "
                "file can run arbitrary code. Convert it once where you trust it: load it with diffusers and "
                "save_pretrained(..., safe_serialization=True)"
            )
        raise UserError(f"'{sub}' has no weights (*.safetensors)")
    for path in weights:
        check_safetensors_file(path)
    if any(len(p.name.split(".")) == 2 for p in weights):
        return None
    # only variant files such as `diffusion_pytorch_model.fp16.safetensors` (or `model.fp16-00001-of-00002...`):
    # from_pretrained finds them only when told the variant
    return weights[0].name.split(".")[-2].split("-")[0]


def check_safetensors_file(path: Path) -> dict:
    """A safetensors file is an 8-byte little-endian header length N, N bytes of JSON, then the tensor data; the
    header's largest `data_offsets` end says how long the data must be. Compare both with the file's size.
    Returns the header ({name: {dtype, shape, data_offsets}}, and `__metadata__` when the file has one)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(max(8, len(LFS_POINTER_PREFIX)))
            if head.startswith(LFS_POINTER_PREFIX):
                raise UserError(
                    f"'{path}' is a git-lfs pointer file, not the weights: run `git lfs pull` in the model's "
                    "repository (or download the file itself)"
                )
            if size < 8:
                raise UserError(f"'{path}' is truncated ({size} bytes): download it again")
            header_len = int.from_bytes(head[:8], "little")
            if 8 + header_len > size:
                raise UserError(
                    f"'{path}' is truncated or not a safetensors file: its header claims {header_len} bytes but the "
                    f"file has {size}; download it again"
                )
            f.seek(8)
            header = json.loads(f.read(header_len))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (UnicodeDecodeError, ValueError, AttributeError, KeyError, TypeError, IndexError) as e:
        # not JSON, or JSON that is not a {name: {dtype, shape, data_offsets}} table
        raise UserError(f"'{path}' is corrupted: its safetensors header is not valid; download it again") from e
    except OSError as e:
        raise UserError(f"cannot read '{path}': {e.strerror or e}") from e
    needed = 8 + header_len + max(ends, default=0)
    if needed > size:
        raise UserError(f"'{path}' is truncated: it has {size} bytes, its header needs {needed}; download it again")
    return header


def safetensors_data_offset(path: Path) -> int:
    """Where a safetensors file's tensor data starts: after the 8-byte header length and the JSON header (the file
    is not checked: `check_safetensors_file` does that)."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def read_safetensors(
    path: Path,
    keep: Callable[[str], bool] | None = None,
    *,
    header_only: bool = False,
    problem: Callable[[str], str] | None = None,
) -> tuple[dict, dict[str, str]]:
    """The tensors (those whose name `keep` accepts; or, with `header_only`, their shapes) and the metadata of a
    safetensors file. A damaged or unreadable file is a `UserError`: `problem(reason)` words it (default: "cannot
    read '<path>': <reason>; download it again")."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            names = [k for k in f.keys() if keep is None or keep(k)]
            if header_only:
                return {k: tuple(f.get_slice(k).get_shape()) for k in names}, metadata
            return {k: f.get_tensor(k) for k in names}, metadata
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        # SafetensorError: a damaged header or data; OSError: unreadable; ValueError/RuntimeError: torch cannot
        # make a tensor of a dtype or shape the header claims
        reason = _first_line(e)
        raise UserError(problem(reason) if problem else f"cannot read '{path}': {reason}; download it again") from None
