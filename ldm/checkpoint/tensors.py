"""The safetensors files of a checkpoint: writing them durably (I/O failures as `OSError`) and reading them back."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ldm.checkpoint.layout import corrupt_message
from ldm.files import write_safetensors
from ldm.weights import read_safetensors


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
    write_safetensors(path, _storable(tensors), metadata)


def read_tensors(
    checkpoint: Path, relpath: str, *, header_only: bool = False
) -> tuple[dict[str, torch.Tensor | tuple[int, ...]], dict[str, str]]:
    """Tensors (or, with `header_only`, their shapes) and metadata of one safetensors file in a checkpoint."""
    return read_safetensors(checkpoint / relpath, header_only=header_only,
                            problem=lambda reason: corrupt_message(checkpoint, relpath, f"is unreadable ({reason})"))
