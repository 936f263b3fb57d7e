"""bench/bench_cpu_dtype.py: its bf16 stand-in computes what a bf16 convolution computes, and its --tiny mode gives
every figure the RESULTS.md table needs."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_cpu_dtype  # noqa: E402


def test_bf16_conv_in_fp32_matches_torchs_bf16_conv_to_one_rounding():
    """The closeness check runs bf16 convolutions as fp32 ones on the bf16 values, rounded to bf16 (fast on CPUs
    without native bf16). Both start from the same exact products and accumulate in fp32, so they differ by at most
    one bf16 rounding step (2^-8 relative) where the fp32 sums round to neighbouring bf16 values, and most elements
    agree exactly."""
    torch.manual_seed(0)
    x = torch.randn(1, 32, 8, 8).to(torch.bfloat16)
    w = (torch.randn(32, 32, 3, 3) / 17).to(torch.bfloat16)
    with bench_cpu_dtype.Bf16ConvInFp32():
        stand_in = F.conv2d(x, w, padding=1)
    native = F.conv2d(x, w, padding=1)  # torch's own bf16 kernel
    assert stand_in.dtype == torch.bfloat16
    relative = (stand_in.float() - native.float()).abs() / native.float().abs().clamp(min=1e-2)
    assert relative.max() <= 2**-7
    assert (stand_in == native).float().mean() > 0.9


@pytest.mark.usefixtures("one_torch_thread")
def test_tiny_mode_reports_speed_and_closeness(capsys):
    fp32, bf16, closeness = bench_cpu_dtype.main(["--tiny", "--repeats", "1", "--steps", "2", "--time-bf16", "no"])
    out = capsys.readouterr().out
    assert fp32["timed"] and all(math.isfinite(fp32[k]) and fp32[k] > 0 for k in ("ours", "diffusers", "ratio"))
    assert not bf16["timed"] and "| bf16 | not timed" in out
    # bf16 is close to fp32, far closer than an unrelated image; the same seed in fp32 would be infinitely close
    assert math.isfinite(closeness["image_psnr"]) and closeness["image_psnr"] > closeness["unrelated_psnr"] + 15
    assert 0 < closeness["unet_rel_error"] < 0.05
    assert closeness["decoder_psnr"] > 35
