"""Check a model directory's files before diffusers reads them, so a broken download gets a message a user can act on.

diffusers' own errors for these cases are cryptic: a git-lfs pointer or a truncated file surfaces as
"HeaderTooLarge" or "MetadataIncompleteBuffer" without the file's name (diffusers #5520), and a pickle checkpoint
would be unpickled, which can run arbitrary code. Only safetensors weights are accepted; the exceptions, textual-
inversion embeddings (often `.pt` files) and IP-Adapters (h94/IP-Adapter's `.bin`), are read with
`torch.load(weights_only=True)` (`read_weights_only_pickle`: tensors and plain values, never code).

`read_safetensors_header` is the one reader of a safetensors header by hand (model directories, single files,
checkpoints and the latent cache all check their files with it); `read_safetensors` reads tensors.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ldm.errors import UserError

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHTED = ("unet", "vae", "text_encoder", "text_encoder_2")
SDXL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "scheduler")
SDXL_REFINER_COMPONENTS = ("unet", "vae", "text_encoder_2", "scheduler")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec"
SAFETENSORS_MAX_HEADER = 100_000_000  # safetensors refuses longer JSON headers (its MAX_HEADER_SIZE)
# bytes per element of each dtype safetensors stores; a dtype not listed here (a newer one) is not size-checked
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "C64": 8, "I64": 8, "U64": 8, "F64": 8}
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
    """Refuse a file that is not a complete safetensors file, naming it (`read_safetensors_header`'s checks).
    Returns the header ({name: {dtype, shape, data_offsets}}, and `__metadata__` when the file has some)."""
    try:
        tensors, metadata = read_safetensors_header(path)
    except BadSafetensors as e:
        raise UserError(f"'{path}' {e}" + (f"; {e.fix}" if e.fix else "")) from e
    except OSError as e:
        raise UserError(f"cannot read '{path}': {e.strerror or e}") from e
    return {**tensors, "__metadata__": metadata} if metadata else tensors


class BadSafetensors(ValueError):
    """A file that is not a complete safetensors file. `str()` says what is wrong as a phrase that follows the
    file's name ("is truncated: it has 100 bytes, its header needs 2000"); `reason` says the same as a clause of its
    own, for callers with their own verdict ("is not a valid safetensors file (<reason>)"); `fix` is what to do."""

    def __init__(self, problem: str, reason: str, fix: str | None = "download it again") -> None:
        super().__init__(problem)
        self.reason, self.fix = reason, fix


def read_safetensors_header(source: Path | bytes) -> tuple[dict[str, dict], dict[str, str]]:
    """The tensor table ({name: {dtype, shape, data_offsets}}) and the `__metadata__` strings of a safetensors file,
    given by path or as its bytes, without reading the tensor data; `BadSafetensors` if it is not a complete file.

    A safetensors file is an 8-byte little-endian header length N, N bytes of JSON, then the tensor data, which the
    header's `data_offsets` must tile exactly: the checks are those of safetensors' own reader (so a file that passes
    here loads), made first and worded for a user: a git-lfs pointer, a truncated file, a header longer than the
    file or than safetensors' 100 MB limit, a header that is not the JSON table, tensors whose bytes do not match
    their dtype and shape, overlapping offsets, data beyond the last tensor. Unreadable files raise `OSError`.
    """
    if isinstance(source, bytes):
        return _parse_header(io.BytesIO(source), len(source))
    with open(source, "rb") as f:
        return _parse_header(f, os.fstat(f.fileno()).st_size)


def _parse_header(f: BinaryIO, size: int) -> tuple[dict[str, dict], dict[str, str]]:
    head = f.read(max(8, len(LFS_POINTER_PREFIX)))
    if head.startswith(LFS_POINTER_PREFIX):
        raise BadSafetensors("is a git-lfs pointer file, not the weights: run `git lfs pull` in the model's "
                             "repository (or download the file itself)", "a git-lfs pointer file, not the weights",
                             fix=None)
    if size < 8:
        raise BadSafetensors(f"is truncated ({size} bytes)", f"{size} bytes, less than the 8 of a header length")
    header_len = int.from_bytes(head[:8], "little")
    if 8 + header_len > size:
        claim = f"its header claims {header_len} bytes but the file has {size}"
        raise BadSafetensors(f"is truncated or not a safetensors file: {claim}", claim)
    if header_len > SAFETENSORS_MAX_HEADER:
        claim = f"its header claims {header_len} bytes, over safetensors' limit of {SAFETENSORS_MAX_HEADER}"
        raise BadSafetensors(f"is not a safetensors file: {claim}", claim)
    try:
        f.seek(8)
        header = json.loads(f.read(header_len))
    except ValueError as e:  # not UTF-8, or not JSON
        raise BadSafetensors("is corrupted: its safetensors header is not valid", "its header is not JSON") from e
    tensors, metadata, end = _check_table(header)
    if 8 + header_len + end != size:
        needed = 8 + header_len + end
        if needed > size:
            raise BadSafetensors(f"is truncated: it has {size} bytes, its header needs {needed}",
                                 f"it has {size} bytes, its header needs {needed}")
        raise BadSafetensors(f"is corrupted: it has {size} bytes, but its header accounts for {needed}",
                             f"it has {size} bytes, but its header accounts for {needed}")
    return tensors, metadata


def _check_table(header: object) -> tuple[dict[str, dict], dict[str, str], int]:
    """(tensors, metadata, end of the data) of a parsed header, or `BadSafetensors` saying what is wrong with it."""

    def bad(detail: str) -> BadSafetensors:
        return BadSafetensors(f"is corrupted: its safetensors header is not valid ({detail})", f"its header {detail}")

    if not isinstance(header, dict):
        raise bad("is not a JSON object")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("has __metadata__ that is not a table of strings")
    tensors = {name: info for name, info in header.items() if name != "__metadata__"}
    spans = []
    for name, info in tensors.items():
        if not isinstance(info, dict) or not isinstance(info.get("dtype"), str) or not _ints(info.get("shape")) \
                or not _ints(info.get("data_offsets")) or len(info["data_offsets"]) != 2:
            raise bad(f"describes tensor '{name}' without a dtype, a shape and two data_offsets")
        begin, end = info["data_offsets"]
        if not 0 <= begin <= end:
            raise bad(f"gives tensor '{name}' data_offsets {[begin, end]}")
        if info["dtype"] in DTYPE_BYTES:
            needed = math.prod(info["shape"]) * DTYPE_BYTES[info["dtype"]]
            if end - begin != needed:
                raise bad(f"gives tensor '{name}' {end - begin} bytes, but {info['dtype']} {info['shape']} takes "
                          f"{needed}")
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:  # safetensors' data is the tensors back to back, no gap and no overlap
            raise bad(f"gives tensor '{name}' data_offsets {[begin, end]}, not starting where the previous one "
                      f"ends ({position})")
        position = end
    return tensors, metadata, position


def _ints(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def safetensors_data_offset(path: Path) -> int:
    """Where a safetensors file's tensor data starts: after the 8-byte header length and the JSON header (the file
    is not checked: `read_safetensors_header` does that)."""
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


def read_weights_only_pickle(path: Path) -> object:
    """A PyTorch `.pt`/`.bin` file read with `torch.load(weights_only=True)`: tensors, containers and plain values
    only. A file that needs anything else (a class, a function: what makes unpickling run code) is refused, naming
    what it needs; it is never unpickled in full. Damaged or unreadable files are a `UserError` too."""
    import pickle
    import re

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        needed = re.search(r"GLOBAL (\S+) was not an allowed global", str(e))
        if needed:
            raise UserError(
                f"'{path}' needs {needed.group(1)} to load, which a weights-only load refuses: pickle files are only "
                "read as tensors and plain values, because unpickling can run arbitrary code. Convert it to "
                ".safetensors where you trust it"
            ) from None
        reason = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
        raise UserError(f"'{path}' is not a readable PyTorch file ({reason.group(1) if reason else 'not a pickle'})"
                        ) from None
    except (EOFError, RuntimeError, ValueError) as e:  # empty, truncated, or a zip without a pickle inside
        reason = _first_line(e) if str(e) else "empty or truncated"
        raise UserError(f"'{path}' is not a readable PyTorch file ({reason})") from None
    except OSError as e:
        raise UserError(f"cannot read '{path}': {e.strerror or e}") from None
