"""LoRA training (ldm/lora/, train/train_ldm.py with lora.enabled): only the adapter trains and is saved, exact resume,
2 processes, fp32 adapters under fp16 autocast, and both saved formats load in diffusers with the same U-Net output;
text-encoder adapters (lora.text_encoder_targets) train, load in diffusers and in our pipeline with the same text
states; a resume under other LoRA settings or another base, and a bad target, stop with one line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import accelerate_launch
from ldm.demo.reader import read_attributes
from ldm.demo.shapes import NEW_COLORS, new_color_combinations, render
from ldm.errors import UserError
from ldm.lora.config import CLIP_TEXT_TARGETS, LoRAConfig
from ldm.lora.export import require_lora_backend
from ldm.lora.train import AdapterWeights, add_lora, add_text_encoder_lora, check_targets
from ldm.pipeline.pipeline import Pipeline
from ldm.text.config import TextEncoderConfig
from ldm.text.encoder import CLIPTextEncoder
from ldm.text.load_encoder import load_text_encoder
from ldm.unet.presets import build_unet
from ldm.unet.tiny import write_tiny_stage2_inputs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train"))
import train_ldm  # noqa: E402

# rank != alpha: a kohya file that recorded alpha = rank (diffusers' converter does) would load at 3/2 the strength
LORA = ["lora.enabled=true", "lora.rank=2", "lora.alpha=3", "lora.name=tiny",
        "lora.targets=[to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2]"]
TEXT = "lora.text_encoder_targets=[q_proj,k_proj,v_proj,out_proj]"
PROMPTS = ["a red circle", ""]  # the empty prompt: the unconditional branch goes through the adapter too


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    """Tiny stage-2 inputs and a base model (1 full training step, exported): what a LoRA run fine-tunes."""
    root = tmp_path_factory.mktemp("lora")
    parts = write_tiny_stage2_inputs(root / "parts", num_images=32)
    train_ldm.main(args(root / "base", parts, "train.max_steps=1", "train.ema_decay=0",
                        f"cache.dir={root / 'latents-base'}"))
    reset_accelerate()
    return {**parts, "model": root / "base/model", "root": root}


def args(out: Path, parts: dict[str, Path], *overrides: str) -> list[str]:
    return ["--config", str(ROOT / "configs/ldm/tiny.yaml"), f"train.output_dir={out}", f"data.path={parts['data']}",
            f"cache.vae={parts['vae']}", f"text_encoder.path={parts['text']}", "train.report_to=none",
            "train.log_every=1", "sample.every=0", "train.batch_size=4", *overrides]


def lora_args(out: Path, base: dict[str, Path], *overrides: str) -> list[str]:
    return args(out, base, f"model.pretrained={base['model']}", "model.pretrained_vae=true",
                f"cache.dir={base['root'] / 'latents-lora'}", *LORA, *overrides)


def lora_train(out: Path, base: dict[str, Path], *overrides: str, resume: str | None = None) -> None:
    try:
        train_ldm.main(lora_args(out, base, *overrides) + (["--resume", resume] if resume else []))
    finally:
        reset_accelerate()


@pytest.fixture(scope="module")
def ddp_run(base) -> tuple[Path, subprocess.CompletedProcess]:
    """A 2-process LoRA run (gloo) on the U-Net and the text encoder that exports the adapter and the merged model;
    lr high enough that the adapter's effect on the U-Net is far above float rounding."""
    out = base["root"] / "ddp"
    cmd = accelerate_launch(ROOT / "train/train_ldm.py", *lora_args(
        out, base, "train.cpu=true", "train.max_steps=3", "train.checkpoint_every=3", "optim.lr=2e-2",
        "optim.warmup_steps=0", "train.ema_decay=0.5", "lora.export_merged=true", TEXT))
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.mark.slow
def test_two_processes_train_only_the_adapter(base, ddp_run):
    out, result = ddp_run
    assert "replicas identical across 2 processes" in result.stderr  # both adapter sets: DDP reduced both
    assert "trainable parameters of" in result.stderr  # "LoRA rank 2, alpha 3 on ...: N trainable parameters of M"
    assert "on q_proj, k_proj, v_proj, out_proj of the text encoder: 1,024 trainable parameters of" in result.stderr
    ckpt = out / "checkpoints/step-00000003"
    for part in ("lora", "lora_text_encoder"):
        adapter = load_file(ckpt / f"models/{part}.safetensors")
        assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter), sorted(adapter)[:3]
        assert all(v.dtype == torch.float32 for v in adapter.values())
        assert any(v.abs().max() > 0 for k, v in adapter.items() if ".lora_B." in k)
    assert {p.name for p in (ckpt / "optimizers").iterdir()} == {"lora.safetensors"}
    assert {p.name for p in (ckpt / "ema").iterdir()} == {"lora.safetensors"}
    # the checkpoint holds the adapter only: far smaller than the base U-Net
    base_bytes = (base["model"] / "unet/diffusion_pytorch_model.safetensors").stat().st_size
    assert (ckpt / "models/lora.safetensors").stat().st_size < base_bytes / 10
    assert sorted(p.name for p in (out / "lora").iterdir()) == ["pytorch_lora_weights.safetensors", "tiny.safetensors"]


def _unet_output(unet: UNet2DConditionModel) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 700]), text).sample


def _ours(base: dict[str, Path], out: Path) -> UNet2DConditionModel:
    """Our trained model: the base U-Net with the adapter added as training adds it and the exported weights."""
    unet = UNet2DConditionModel.from_pretrained(base["model"] / "unet")
    cfg = LoRAConfig(enabled=True, rank=2, alpha=3, targets=["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj",
                                                               "ff.net.2"])
    add_lora(unet, cfg)
    with safe_open(out / "lora/pytorch_lora_weights.safetensors", "pt") as f:  # peft's names, without "unet."
        saved = {k.removeprefix("unet."): f.get_tensor(k) for k in f.keys()}
    adapter = AdapterWeights(unet)
    adapter.load_state_dict({k: saved[k.replace(".default.", ".")] for k in adapter.state_dict()})
    return unet


@pytest.mark.slow
def test_both_formats_load_in_diffusers_with_the_same_unet_output(base, ddp_run):
    out, _ = ddp_run
    ours = _unet_output(_ours(base, out))
    plain = _unet_output(UNet2DConditionModel.from_pretrained(base["model"] / "unet"))
    effect = (ours - plain).abs().max().item()
    tol = 1e-5 * ours.abs().max().item()  # float32 rounding of the same sums in another order
    assert effect > 1000 * tol, "the adapter barely changes the U-Net: the comparison below would prove nothing"
    for weight_name in ("pytorch_lora_weights.safetensors", "tiny.safetensors"):
        pipe = StableDiffusionPipeline.from_pretrained(base["model"], safety_checker=None)
        pipe.load_lora_weights(out / "lora", weight_name=weight_name)
        theirs = _unet_output(pipe.unet)
        assert (theirs - ours).abs().max().item() < tol, weight_name
    merged = _unet_output(UNet2DConditionModel.from_pretrained(out / "model/unet"))
    assert (merged - ours).abs().max().item() < tol


@pytest.mark.slow
def test_the_kohya_file_has_a1111_keys_and_the_adapters_alpha(ddp_run):
    out, _ = ddp_run
    with safe_open(out / "lora/tiny.safetensors", "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        alpha = f.get_tensor("lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0.alpha")
        down = f.get_tensor("lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj.lora_down.weight")
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_"))
               and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    assert sum(k.startswith("lora_te_") for k in keys) == 2 * 4 * 3  # 2 layers x 4 projections x (down, up, alpha)
    assert alpha.item() == 3.0 and down.shape[0] == 2
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "3"


@pytest.mark.slow
def test_resume_gives_the_same_adapter_under_bf16(tmp_path, base):
    hard = ["train.checkpoint_every=2", "train.caption_dropout=0.3", "lora.dropout=0.1", "train.ema_decay=0.9",
            "optim.warmup_steps=1", "train.mixed_precision=bf16", TEXT]  # both adapter sets
    lora_train(tmp_path / "a", base, *hard, "train.max_steps=4")
    lora_train(tmp_path / "b", base, *hard, "train.max_steps=2")
    lora_train(tmp_path / "b", base, *hard, "train.max_steps=4", resume="latest")
    a, b = ({k: v for f in sorted((tmp_path / run / "checkpoints/step-00000004").rglob("*.safetensors"))
             if not f.name.startswith("rng") for k, v in load_file(f).items()} for run in ("a", "b"))
    assert a.keys() == b.keys() and any(".lora_A." in k for k in a)
    assert any(k.startswith("model.encoder.layers.") for k in a)  # the text encoder's adapters are in there
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    # under bf16 the trainable parameters stay fp32
    assert all(v.dtype == torch.float32 for k, v in a.items() if ".lora_" in k)


@pytest.mark.slow
def test_a_unet_only_run_leaves_the_text_encoder_out_of_every_file(tmp_path, base):
    lora_train(tmp_path, base, "train.max_steps=1", "optim.lr=1e-2", "optim.warmup_steps=0")
    ckpt = tmp_path / "checkpoints/step-00000001"
    assert {p.name for p in (ckpt / "models").iterdir()} == {"lora.safetensors"}
    assert any(v.abs().max() > 0 for k, v in load_file(ckpt / "models/lora.safetensors").items() if ".lora_B." in k)
    assert all(k.startswith("unet.") for k in load_file(tmp_path / "lora/pytorch_lora_weights.safetensors"))
    assert all(k.startswith("lora_unet_") for k in load_file(tmp_path / "lora/tiny.safetensors"))


def test_adapters_train_in_training_mode_so_that_their_dropout_acts():
    """from_pretrained leaves a model in eval mode, where lora.dropout would silently do nothing."""
    unet = build_unet("tiny", sample_size=8, latent_channels=4, cross_attention_dim=32).eval()
    add_lora(unet, LoRAConfig(enabled=True, dropout=0.5))
    dropouts = [m for name, m in unet.named_modules() if name.endswith("lora_dropout.default")]
    assert dropouts and unet.training and all(m.training for m in dropouts)
    encoder = _plain_text_encoder_tiny()
    add_text_encoder_lora(encoder, LoRAConfig(enabled=True, dropout=0.5, text_encoder_targets=["q_proj"]))
    assert encoder.training and encoder.trainable
    encoder.eval()
    assert not encoder.training
    encoder.train()  # a frozen encoder refuses training mode; an adapted one follows it
    assert encoder.training


@pytest.mark.usefixtures("one_torch_thread")
def test_an_fp16_autocast_step_keeps_fp32_adapters_and_unscales():
    """The GPU fp16 path on the CPU: an fp16 base, autocast and a gradient scaler (accelerate enables fp16 only on
    GPUs, so torch's own CPU autocast and GradScaler stand in for it)."""
    torch.manual_seed(0)

    def step(keep_fp32: bool) -> list[torch.nn.Parameter]:
        unet = build_unet("tiny", sample_size=8, latent_channels=4, cross_attention_dim=32)
        params = add_lora(unet, LoRAConfig(enabled=True), base_dtype=torch.float16)
        if not keep_fp32:  # what diffusers' users did before cast_training_params
            for p in params:
                p.data = p.data.half()
        optimizer, scaler = torch.optim.AdamW(params, lr=1e-2), torch.amp.GradScaler("cpu")
        with torch.autocast("cpu", dtype=torch.float16):
            out = unet(torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)).sample
        assert out.dtype == torch.float16 and unet.conv_in.weight.dtype == torch.float16
        scaler.scale(out.float().pow(2).mean()).backward()
        scaler.unscale_(optimizer)
        scaler.step(optimizer)
        return params

    params = step(keep_fp32=True)
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in params)
    assert all(torch.isfinite(p).all() for p in params)
    assert any(p.abs().sum() > 0 for p in params if p.shape[1] == 4)  # a lora_B moved off zero: the step applied
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):  # the failure it prevents
        step(keep_fp32=False)


def test_bad_targets_are_named():
    unet = build_unet("tiny", sample_size=8, latent_channels=4, cross_attention_dim=32)
    with pytest.raises(UserError, match=r"'lora.targets': 'to_qq' matches no module of the U-Net"):
        check_targets(unet, ["to_q", "to_qq"])
    with pytest.raises(UserError, match=r"'to_out' names a ModuleList, not a linear"):
        check_targets(unet, ["to_out"])
    check_targets(unet, ["to_q", "to_out.0", "ff.net.2"])


@pytest.mark.parametrize("override, message", [
    ("text_encoder.kind=open_clip text_encoder.path=ViT-B-32 lora.text_encoder_targets=[q_proj]",
     "config key 'lora.text_encoder_targets': needs text_encoder.kind=clip"),
    (f"{TEXT} cache.text_embeddings=true", "config key 'cache.text_embeddings': cannot be used with "
     "lora.text_encoder_targets"),
    ("lora.text_encoder_targets=[q_proj,q_proj]", "config key 'lora.text_encoder_targets': names a module twice"),
    ("lora.enabled=false lora.text_encoder_targets=[q_proj]",
     "config key 'lora.text_encoder_targets': needs lora.enabled=true"),
    ("lora.rank=0", "config key 'lora.rank': must be >= 1, got 0"),
    ("lora.alpha=-1", "config key 'lora.alpha': must be > 0"),
    ("lora.dropout=1", "config key 'lora.dropout': must be in [0, 1)"),
    ("lora.targets=[]", "config key 'lora.targets': is empty"),
    ("lora.rnak=4", "unknown config key 'lora.rnak' (did you mean 'lora.rank'?)"),
    ("lora.name=pytorch_lora_weights", "config key 'lora.name': 'pytorch_lora_weights' would clash"),
    ("model.pretrained=", "config key 'lora.enabled': needs model.pretrained"),
])
def test_bad_lora_config_values_stop_the_run_with_one_line(tmp_path, capsys, override, message):
    with pytest.raises(SystemExit) as e:
        train_ldm.main(["--config", str(ROOT / "configs/ldm/tiny.yaml"), f"train.output_dir={tmp_path}",
                        "lora.enabled=true", f"model.pretrained={tmp_path / 'base'}", *override.split()])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not any(tmp_path.iterdir())


def test_sharded_backends_are_refused():
    class Sharded:
        sharded = True

    with pytest.raises(UserError, match="lora.enabled runs under one process or DDP"):
        require_lora_backend(Sharded())


def test_the_new_colour_is_outside_the_spec_and_readable():
    assert set(NEW_COLORS).isdisjoint(__import__("ldm.demo.shapes", fromlist=["COLORS"]).COLORS)
    combos = new_color_combinations("pink")
    heldout = new_color_combinations("pink", "heldout")
    assert len(combos) == 90 and len(heldout) == 9 and set(heldout) <= set(combos)
    assert not set(heldout) & set(new_color_combinations("pink", "train"))
    a = combos[0]
    assert read_attributes(render(a), new_colors=("pink",)) == a
    assert read_attributes(render(a)).color == "purple"  # the nearest known colour, without the new one



# ------------------------------------------------------------------------------------------- text-encoder adapters

@pytest.fixture(scope="module")
def te_run(base) -> Path:
    """A one-process run that trains text-encoder adapters too, with caption dropout (so the empty prompt goes
    through the adapted encoder) and the merged export; lr high enough that the adapter's effect on the text states
    is far above float rounding."""
    out = base["root"] / "te"
    lora_train(out, base, TEXT, "train.max_steps=3", "train.checkpoint_every=3", "optim.lr=2e-2",
               "optim.warmup_steps=0", "train.ema_decay=0", "train.caption_dropout=0.5", "lora.export_merged=true")
    return out


def _plain_text_encoder_tiny() -> CLIPTextEncoder:
    from ldm.text.tiny import tiny_clip_text_encoder

    encoder = tiny_clip_text_encoder()
    encoder.train()
    assert not encoder.training  # frozen: stays in eval mode
    return encoder


def _plain_text_encoder(base: dict[str, Path]) -> CLIPTextEncoder:
    return load_text_encoder(TextEncoderConfig(path=str(base["model"])))  # the base's text_encoder/ and tokenizer/


def _our_text_encoder(base: dict[str, Path], out: Path) -> CLIPTextEncoder:
    """The trained adapted encoder: the base, the adapters added as training adds them, and the weights of the last
    checkpoint (not the exported files, which the tests compare against it)."""
    encoder = _plain_text_encoder(base)
    add_text_encoder_lora(encoder, LoRAConfig(enabled=True, rank=2, alpha=3, text_encoder_targets=CLIP_TEXT_TARGETS))
    AdapterWeights(encoder).load_state_dict(
        load_file(out / "checkpoints/step-00000003/models/lora_text_encoder.safetensors"))
    return encoder.eval()


def _states(encoder: CLIPTextEncoder) -> torch.Tensor:
    with torch.no_grad():
        return encoder.encode(PROMPTS)  # (2, 77, D)


@pytest.mark.slow
def test_text_encoder_adapters_train_and_load_in_diffusers_from_both_files(base, te_run):
    adapter = load_file(te_run / "checkpoints/step-00000003/models/lora_text_encoder.safetensors")
    ups = {k: v for k, v in adapter.items() if ".lora_B." in k}
    assert len(ups) == 2 * 4 and all(v.abs().max() > 0 for v in ups.values())  # 2 layers x 4 projections moved
    assert {p.name for p in (te_run / "checkpoints/step-00000003/optimizers").iterdir()} == {"lora.safetensors"}
    ours, plain = _states(_our_text_encoder(base, te_run)), _states(_plain_text_encoder(base))
    tol = 1e-5 * ours.abs().max().item()  # float32 rounding of the same sums in another order
    assert (ours - plain).abs().max().item() > 1000 * tol, "the adapter barely changes the text states"
    assert (ours[1] - plain[1]).abs().max().item() > 1000 * tol  # the empty prompt's too
    ids = _plain_text_encoder(base).tokenize(PROMPTS)
    for weight_name in ("pytorch_lora_weights.safetensors", "tiny.safetensors"):
        pipe = StableDiffusionPipeline.from_pretrained(base["model"], safety_checker=None)
        pipe.load_lora_weights(te_run / "lora", weight_name=weight_name)
        with torch.no_grad():
            theirs = pipe.text_encoder(ids)[0]
        assert (theirs - ours).abs().max().item() < tol, weight_name
    # the merged export = the original base + the adapter: training left the base weights as they were
    merged = load_text_encoder(TextEncoderConfig(path=str(te_run / "model")))
    assert (_states(merged) - ours).abs().max().item() < tol
    with safe_open(te_run / "lora/tiny.safetensors", "pt") as f:
        keys = set(f.keys())
        alpha = f.get_tensor("lora_te_text_model_encoder_layers_1_self_attn_out_proj.alpha")
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys and alpha.item() == 3.0


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_our_pipeline_gives_the_trained_text_states_from_both_files(base, te_run):
    """Pipeline.load_lora (what `ldm-generate --lora` calls) on the base: the trained encoder's text states."""
    ours = _states(_our_text_encoder(base, te_run))
    tol = 1e-5 * ours.abs().max().item()
    pipe = Pipeline.from_pretrained(base["model"], device="cpu", dtype="fp32")
    for name in ("pytorch_lora_weights.safetensors", "tiny.safetensors"):
        applied = pipe.load_lora(te_run / "lora" / name)
        assert sum(t.part == "text_encoder" for t in applied.targets) == 2 * 4
        assert (_states(pipe.text_encoder) - ours).abs().max().item() < tol, name
        pipe.unload_loras()


@pytest.mark.slow
@pytest.mark.parametrize("override, message", [
    ("lora.alpha=5", "was trained with lora.alpha=3, this run has lora.alpha=5"),
    ("lora.dropout=0.2", "was trained with lora.dropout=0, this run has lora.dropout=0.2"),
    ("lora.rank=3", "was trained with lora.rank=2, this run has lora.rank=3"),
    ("lora.text_encoder_targets=[]", "was trained with lora.text_encoder_targets=[q_proj,k_proj,v_proj,out_proj], "
     "this run has lora.text_encoder_targets=[]"),
    ("another base", "was trained with model.pretrained="),
])
def test_resuming_under_other_lora_settings_or_another_base_stops_with_one_line(tmp_path, capsys, base, te_run,
                                                                                override, message):
    if override == "another base":  # the same weights elsewhere: the checkpoint cannot tell, so it is refused
        shutil.copytree(base["model"], tmp_path / "other")
        override = f"model.pretrained={tmp_path / 'other'}"
    with pytest.raises(SystemExit) as e:
        lora_train(tmp_path / "out", base, TEXT, "train.max_steps=4", override,
                   resume=str(te_run / "checkpoints/step-00000003"))
    assert e.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "--resume none" in errors[0], errors
    assert not (tmp_path / "out/checkpoints").exists()


@pytest.mark.parametrize("override, message", [
    ("lora.targets=[to_q,to_qq]", "config key 'lora.targets': 'to_qq' matches no module of the U-Net"),
    ("lora.text_encoder_targets=[q_proj,qq_proj]",
     "config key 'lora.text_encoder_targets': 'qq_proj' matches no module of the text encoder; use module names "
     "such as q_proj"),
])
def test_a_bad_target_stops_the_run_before_the_latent_cache(tmp_path, capsys, base, override, message):
    with pytest.raises(SystemExit) as e:
        lora_train(tmp_path / "out", base, override, f"cache.dir={tmp_path / 'latents'}")
    assert e.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "latents").exists()
