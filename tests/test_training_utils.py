"""Shared training-loop helpers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from diffusers.training_utils import EMAModel

from ldm.errors import UserError
from ldm.training import SkippedImages, ema_weights, require_replicated_weights


@pytest.mark.parametrize("kind", [DistributedType.FSDP, DistributedType.DEEPSPEED])
def test_sharded_training_is_refused_up_front(kind):
    with pytest.raises(UserError, match="not supported by ldm's training scripts yet"):
        require_replicated_weights(SimpleNamespace(distributed_type=kind))
    require_replicated_weights(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU))  # DDP is fine


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
