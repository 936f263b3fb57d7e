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


def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 in hardware: AVX512-BF16 (Cooper Lake, Zen 4 and later) or AMX-BF16
    (Sapphire Rapids and later). Without them torch still runs bf16, but its convolutions take a slow generic path
    (one 3x3 conv of SD's first U-Net block: ~100x fp32's time on an AVX2 EPYC, bench/RESULTS.md)."""
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)  # torch's own cpuinfo check (torch >= 2.9)
    if get_capabilities is not None:
        caps = get_capabilities()
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "flags:")
    except OSError:  # not Linux: no way to tell, so the safe choice
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split(":", 1)[1].split()))


def pick_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """'auto'/None: fp16 on a GPU; on the CPU bf16 where it has native bf16 (`cpu_has_native_bf16`), else fp32.
    fp16 on the CPU falls back to fp32 with a warning; 'fp32' is always exact fp32.

    CPU kernels for half precision are missing or far slower than fp32 for convolutions, so honouring the request
    would only make generation slower (or fail deep inside the U-Net); bf16 has real CPU kernels and is kept (an
    explicit bf16 on a CPU without native bf16 is honoured with a warning: it is correct, but many times slower).
    """
    if name in (None, "auto"):
        if device.type in ("cuda", "mps"):
            return torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown dtype '{name}' (use auto, {', '.join(DTYPES)})")
    if name == "fp16" and device.type == "cpu":
        log.warning("fp16 is not supported on the CPU; using fp32 (bf16 is available on the CPU)")
        return torch.float32
    if name == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        log.warning("this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 runs, but its convolutions are many "
                    "times slower than fp32 here (--dtype fp32 or auto is faster)")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]
