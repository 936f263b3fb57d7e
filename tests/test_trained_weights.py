"""ldm/unet/trained_weights.py, what the stage-2 loop asks of what it trains (the whole U-Net, LoRA on the U-Net, LoRA on the
U-Net and the text encoder): the parameters, the modules clipped, the checkpoint's names (those every existing
checkpoint has, so that it still resumes), the state, the EMA's source and the conditioning of a batch. The training
runs themselves are tested in test_lora_train.py and test_train_ldm.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

from ldm.errors import UserError
from ldm.lora.config import LoRAConfig
from ldm.lora.resume import lora_settings
from ldm.parallel.setup import backend_for
from ldm.text.tiny import tiny_clip_text_encoder
from ldm.unet.config import LDMConfig
from ldm.unet.presets import build_unet
from ldm.unet.trained_weights import LoRAWeights, TrainedWeights, trained_weights


@pytest.fixture
def accelerator():
    from accelerate.state import AcceleratorState, GradientState, PartialState

    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


def build(accelerator: Accelerator, *, lora: bool = False, text: bool = False, caption_dropout: float = 0.0):
    """What train_ldm.py does up to `prepare`, on a tiny U-Net and text encoder."""
    cfg = LDMConfig()
    cfg.lora = LoRAConfig(enabled=lora, rank=2, targets=["to_q", "to_v"],
                          text_encoder_targets=["q_proj"] if text else [])
    cfg.train.caption_dropout = caption_dropout
    unet = build_unet("tiny", sample_size=8, latent_channels=4, cross_attention_dim=32)
    base = SimpleNamespace(unet_config=dict(unet.config))  # model.pretrained's spec, as far as the check reads it
    trained = trained_weights(cfg, accelerator, backend_for(accelerator), base)
    encoder = tiny_clip_text_encoder()
    trained.check_text_encoder(encoder)
    params = trained.parameters_to_train(unet, encoder, base_dtype=torch.float32)
    unet, optimizer = trained.prepare(unet, torch.optim.AdamW(params))
    return cfg, trained, unet, encoder, params, optimizer


@pytest.mark.usefixtures("one_torch_thread")
def test_the_whole_unet_trains_and_is_checkpointed_as_unet(accelerator):
    cfg, trained, unet, _, params, optimizer = build(accelerator)
    assert type(trained) is TrainedWeights
    assert params == list(unet.parameters()) and trained.modules is unet
    ema = trained.make_ema(0.9)
    assert ema.model_config == unet.config  # what EMAModel needs to save itself as a U-Net
    assert trained.ema_source() == list(unet.parameters())
    ckpt = trained.checkpoint(optimizer, ema)
    assert ckpt == {"models": {"unet": unet}, "optimizers": {"unet": optimizer}, "emas": {"unet": ema}}
    assert trained.checkpoint(optimizer, None)["emas"] == {}
    assert trained.state() == {} and trained.resume_check(Path("ckpt")) is None


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("text", [False, True])
def test_lora_trains_and_checkpoints_the_adapters_only(accelerator, text):
    cfg, trained, unet, encoder, params, optimizer = build(accelerator, lora=True, text=text)
    assert isinstance(trained, LoRAWeights)
    trainable = [p for p in unet.parameters() if p.requires_grad] + [p for p in encoder.parameters() if p.requires_grad]
    assert params == trainable and all(p.dtype == torch.float32 for p in params)
    assert any(p.requires_grad for p in encoder.parameters()) == text
    ema = trained.make_ema(0.9)
    assert trained.ema_source() is params and len(ema.shadow_params) == len(params)
    ckpt = trained.checkpoint(optimizer, ema)
    # the names of every LoRA checkpoint written so far
    assert list(ckpt["models"]) == (["lora", "lora_text_encoder"] if text else ["lora"])
    assert ckpt["optimizers"] == {"lora": optimizer} and ckpt["emas"] == {"lora": ema}
    assert all(".lora_A." in k or ".lora_B." in k for m in ckpt["models"].values() for k in m.state_dict())
    assert trained.modules is unet if not text else list(trained.modules) == [unet, encoder]
    assert trained.state() == {"lora": lora_settings(cfg)}
    check = trained.resume_check(Path("ckpt"))
    check({"lora": lora_settings(cfg)})  # the same settings resume
    with pytest.raises(UserError, match="was trained with lora.rank=3, this run has lora.rank=2"):
        check({"lora": {**lora_settings(cfg), "rank": 3}})


@pytest.mark.usefixtures("one_torch_thread")
def test_a_frozen_encoder_conditions_through_the_lookups_without_gradients(accelerator):
    _, trained, _, _, params, _ = build(accelerator, lora=True, caption_dropout=1.0)
    text, empty = torch.ones(3, 77, 32, requires_grad=True), torch.zeros(1, 77, 32)
    states = trained.condition(["a", "b", "c"], lambda captions: text[: len(captions)], empty)
    assert states.shape == (3, 77, 32) and not states.requires_grad and (states == 0).all()


@pytest.mark.usefixtures("one_torch_thread")
def test_an_adapted_encoder_conditions_with_gradients_and_its_own_empty_prompt(accelerator):
    """Row B of the batch through the encoder is the empty prompt: the dropped captions get the adapted encoder's
    unconditional states (as inference will), not the frozen lookups the loop passes."""
    _, trained, _, encoder, _, _ = build(accelerator, lora=True, text=True, caption_dropout=1.0)
    for name, p in encoder.named_parameters():
        if ".lora_B." in name:  # an adapter that changes the states (lora_B starts at zero)
            torch.nn.init.normal_(p)

    def refused(captions):
        raise AssertionError("a trained text encoder must not use the frozen lookups")

    states = trained.condition(["a red circle", "a blue square"], refused, torch.zeros(1, 77, 32))
    with torch.no_grad():
        adapted_empty = encoder(encoder.tokenize([""]))  # (1, 77, D)
    assert states.pooled is None
    states = states.context
    assert states.shape == (2, 77, 32) and states.requires_grad
    assert torch.allclose(states, adapted_empty.expand(2, -1, -1))
    assert not torch.allclose(adapted_empty, tiny_clip_text_encoder().encode([""]))  # the adapter acts


def test_lora_refuses_a_sharded_backend_before_anything_is_built():
    class Sharded:
        sharded = True

    cfg = LDMConfig()
    cfg.lora = LoRAConfig(enabled=True)
    with pytest.raises(UserError, match="lora.enabled runs under one process or DDP"):
        trained_weights(cfg, None, Sharded(), None)
    assert type(trained_weights(LDMConfig(), None, Sharded(), None)) is TrainedWeights
