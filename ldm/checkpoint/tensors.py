"""The safetensors files of a checkpoint: writing them durably (I/O failures as `OSError`) and reading them back."""

from __future__ import annotations

import errno
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ldm.checkpoint.layout import corrupt_message
from ldm.errors import UserError
from ldm.files import fsync_file


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


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
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
    fsync_file(path)


def read_tensors(
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
        raise UserError(corrupt_message(checkpoint, relpath, f"is unreadable ({str(e).splitlines()[0]})")) from e
