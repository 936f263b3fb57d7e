"""Shared training-loop helpers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from diffusers.training_utils import EMAModel

from ldm.errors import UserError
from ldm.parallel.setup import require_supported_setup
from ldm.training.run import SkippedImages, ema_weights


def test_unsupported_setups_are_refused_up_front():
    fsdp2 = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True)
    fsdp1 = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=False)
    require_supported_setup(fsdp2, sharding=True)  # train_ldm.py
    with pytest.raises(UserError, match="FSDP is not supported by this script.*multi-gpu.yaml"):
        require_supported_setup(fsdp2, sharding=False)  # train_vae.py
    with pytest.raises(UserError, match="FSDP version 1 is not supported: set fsdp_version: 2"):
        require_supported_setup(fsdp1, sharding=True)
    deepspeed = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED)
    require_supported_setup(deepspeed, sharding=True)  # train_ldm.py; its ZeRO stage is checked by ldm.parallel.zero
    with pytest.raises(UserError, match="DEEPSPEED is not supported by this script.*multi-gpu.yaml"):
        require_supported_setup(deepspeed, sharding=False)
    with pytest.raises(UserError, match="MEGATRON_LM is not supported by ldm's training scripts: use FSDP"):
        require_supported_setup(SimpleNamespace(distributed_type=DistributedType.MEGATRON_LM), sharding=True)
    for kind in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU, DistributedType.NO):  # DDP, one process
        require_supported_setup(SimpleNamespace(distributed_type=kind), sharding=False)


def test_ema_weights_are_swapped_in_and_back():
    layer = torch.nn.Linear(2, 2)
    ema = EMAModel(layer.parameters(), decay=0.5)
    for _ in range(3):  # (the first EMA step copies the weights)
        with torch.no_grad():
            layer.weight.add_(1.0)
        ema.step(layer.parameters())
    raw = layer.weight.detach().clone()
    with ema_weights(ema, layer.parameters()):
        assert torch.equal(layer.weight, ema.shadow_params[0])
        assert not torch.equal(layer.weight, raw)
    assert torch.equal(layer.weight, raw)


def test_skipped_images_are_named_once(caplog):
    skipped = SkippedImages()
    skipped.note(["a.png: empty file", "b.png: not an image"])
    skipped.note(["a.png: empty file"])
    assert sum("a.png" in r.message for r in caplog.records) == 1
    assert SkippedImages.summary(sorted(skipped.names)) == (
        "2 unreadable images skipped in total: a.png: empty file, b.png: not an image"
    )
