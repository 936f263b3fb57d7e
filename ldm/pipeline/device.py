"""Device and precision choice, with the fallbacks said out loud."""

from __future__ import annotations

import logging

import torch

from ldm.errors import UserError

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device(name: str | None = None) -> torch.device:
    """'auto'/None: cuda, then mps, then cpu. An explicit device that is not there is an error, not a fallback."""
    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"unknown device '{name}' (use auto, cpu, cuda, cuda:N or mps)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' requested but CUDA is not available on this machine (use --device cpu)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"device '{name}' requested but MPS is not available on this machine (use --device cpu)")
    return device


def pick_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """'auto'/None: fp16 on a GPU, fp32 on the CPU. fp16 on the CPU falls back to fp32 with a warning.

    CPU kernels for half precision are missing or far slower than fp32 for convolutions, so honouring the request
    would only make generation slower (or fail deep inside the U-Net); bf16 has real CPU kernels and is kept.
    """
    if name in (None, "auto"):
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown dtype '{name}' (use {', '.join(DTYPES)})")
    if name == "fp16" and device.type == "cpu":
        log.warning("fp16 is not supported on the CPU; using fp32 (bf16 is available on the CPU)")
        return torch.float32
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]
