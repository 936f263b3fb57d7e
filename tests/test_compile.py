"""`--compile`: a compiled U-Net gives the same image as the eager one.

Tolerance: the decoded images (floats in [0, 1]) may differ by at most 1e-4, 1/39 of one uint8 step, so the PNGs
are the same but for a pixel that sits on a rounding boundary. Compiled kernels sum in another order, which moves
fp32 results by a few ulps per op; bench/bench_compile.py measured 1.6e-6 on this model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.pipeline.pipeline import Pipeline
from ldm.pipeline.tiny import save_tiny_model


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_regional_compile_gives_the_same_image(tmp_path, monkeypatch):
    import torch._inductor.config as inductor

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # a cold compile, every run
    monkeypatch.setattr(inductor, "compile_threads", 1)  # no pool of compile workers to start for 6 small kernels
    model = save_tiny_model(tmp_path / "model")
    kwargs = dict(steps=2, seed=3, height=16, width=16, show_progress=False)
    eager = Pipeline.from_pretrained(model, device="cpu", dtype="fp32")("a red car", **kwargs).decoded
    torch._dynamo.reset()
    try:
        compiled = Pipeline.from_pretrained(model, device="cpu", dtype="fp32", compile_unet=True)
        assert any(getattr(m, "_compiled_call_impl", None) is not None for m in compiled.unet.modules())
        images = compiled("a red car", **kwargs).decoded
    finally:
        torch._dynamo.reset()
    assert np.abs(images - eager).max() <= 1e-4
