"""Stage 2 trains SDXL (tiny models): the conditioning (two towers' context, pooled embedding, cached time ids, the
unconditional branch for caption dropout), caches refused across families, the export as a diffusers SDXL directory
giving diffusers' image, exact resume, LoRA files diffusers loads (DDP / FSDP2 / ZeRO-2: test_sharded_training.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import reset_accelerate_state, run
from ldm.latents.cache import StaleCacheError
from ldm.latents.text_cache import FILE_NAME, TextEmbeddingCache, build_text_cache, encoder_key
from ldm.models.load import load_sdxl_text_encoder
from ldm.models.spec import inspect_model
from ldm.text.conditioning import Conditioning
from ldm.text.tiny import tiny_clip_text_encoder
from ldm.unet.conditioning import batch_conditioning
from ldm.unet.objective import NoiseConfig, build_noise_scheduler, diffusion_loss, drop_captions
from ldm.unet.presets import build_unet

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train"))
import cache_latents  # noqa: E402
import train_ldm  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPT = "a red circle"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from ldm.demo.shapes import write_dataset

    return write_dataset(tmp_path_factory.mktemp("shapes") / "shapes", num_images=16, seed=0, size=32, overwrite=True)


def sdxl_args(out: Path, model: Path, shapes: Path, *overrides: str) -> list[str]:
    """A from-scratch SDXL run: the tiny SDXL model's towers and VAE, the sdxl-tiny U-Net, 32-px shapes."""
    return ["--config", str(ROOT / "configs/ldm/tiny.yaml"), f"train.output_dir={out}", f"data.path={shapes}",
            f"cache.vae={model / 'vae'}", "text_encoder.kind=sdxl", f"text_encoder.path={model}",
            "model.preset=sdxl-tiny", "train.report_to=none", "train.log_every=1", "sample.every=0",
            "train.batch_size=2", "optim.warmup_steps=1", *overrides]


def train(*argv: str) -> None:
    try:
        train_ldm.main(list(argv))
    finally:
        reset_accelerate_state()


# ---------------------------------------------------------------------------------------------- the conditioning


def test_caption_dropout_drops_context_and_pooled_together_with_the_same_draws_as_sd():
    b = 400
    cond = Conditioning(torch.ones(b, 77, 8), torch.ones(b, 4), torch.full((b, 6), 3.0))
    empty = Conditioning(torch.full((1, 77, 8), 2.0), torch.full((1, 4), 2.0)).zeros_like()  # force_zeros
    torch.manual_seed(0)
    out = drop_captions(cond, empty, 0.3)
    dropped = (out.context == 0).all(dim=(1, 2))  # (B,)
    assert torch.equal(dropped, (out.pooled == 0).all(dim=1))
    assert torch.equal(~dropped, (out.context == 1).all(dim=(1, 2)))  # kept rows unchanged
    assert 0.2 < dropped.float().mean() < 0.4
    assert torch.equal(out.time_ids, cond.time_ids)  # the time ids describe the image, not the caption
    torch.manual_seed(0)
    sd = drop_captions(torch.ones(b, 77, 8), torch.zeros(1, 77, 8), 0.3)  # the same B draws: SD runs are unchanged
    assert torch.equal((sd == 0).all(dim=(1, 2)), dropped)


def test_the_sdxl_presets_have_sdxls_structure(tiny_sdxl_model):
    from accelerate import init_empty_weights

    tiny = build_unet("sdxl-tiny", sample_size=32, latent_channels=4, cross_attention_dim=64, pooled_size=32)
    reference = json.loads((tiny_sdxl_model / "unet/config.json").read_text())
    for key in ("block_out_channels", "down_block_types", "up_block_types", "transformer_layers_per_block",
                "attention_head_dim", "addition_embed_type", "addition_time_embed_dim", "use_linear_projection",
                "projection_class_embeddings_input_dim", "cross_attention_dim", "layers_per_block", "norm_num_groups"):
        assert list(np.atleast_1d(tiny.config[key])) == list(np.atleast_1d(reference[key])), key
    with init_empty_weights():
        small = build_unet("sdxl-small", sample_size=64, latent_channels=4, cross_attention_dim=2048, pooled_size=1280)
    config = small.config
    assert config.down_block_types[0] == "DownBlock2D" and set(config.down_block_types[1:]) == {"CrossAttnDownBlock2D"}
    assert list(config.transformer_layers_per_block[1:]) == [2, 4] and config.use_linear_projection
    assert [c // h for c, h in zip(config.block_out_channels, config.attention_head_dim)] == [64, 64, 64]
    assert config.addition_embed_type == "text_time" and config.projection_class_embeddings_input_dim == 6 * 256 + 1280


def test_the_batchs_time_ids_reach_the_unet():
    torch.manual_seed(0)
    unet = build_unet("sdxl-tiny", sample_size=8, latent_channels=4, cross_attention_dim=64, pooled_size=32)
    batch = {"original_size": torch.tensor([[64, 48], [32, 32]]), "crop_top_left": torch.tensor([[0, 4], [0, 0]]),
             "target_size": torch.tensor([[32, 32], [32, 32]])}
    text = Conditioning(torch.randn(2, 77, 64), torch.randn(2, 32))
    cond = batch_conditioning(text, batch)
    assert cond.time_ids.tolist() == [[64, 48, 0, 4, 32, 32], [32, 32, 0, 0, 32, 32]]
    x0, noise = torch.randn(2, 4, 8, 8), NoiseConfig()
    scheduler = build_noise_scheduler(noise)
    losses = []
    for c in (cond, cond.with_time_ids(torch.zeros(2, 6))):
        torch.manual_seed(1)
        with torch.no_grad():
            losses.append(diffusion_loss(unet, scheduler, x0, c, noise).item())
    assert losses[0] != losses[1]
    with pytest.raises(ValueError, match="needs its time ids"):
        diffusion_loss(unet, scheduler, x0, text, noise)


def test_the_text_cache_holds_context_and_pooled_and_refuses_the_other_family(tmp_path, tiny_sdxl_model):
    captions = ["a red circle", "", "a blue square"]
    sdxl = load_sdxl_text_encoder(inspect_model(tiny_sdxl_model))
    sd = tiny_clip_text_encoder()
    sdxl_file, sd_file = tmp_path / "sdxl" / FILE_NAME, tmp_path / "sd" / FILE_NAME
    sdxl_file.parent.mkdir(), sd_file.parent.mkdir()
    build_text_cache(sdxl_file, sdxl, encoder_key(sdxl), captions)
    build_text_cache(sd_file, sd, encoder_key(sd), captions)
    cache = TextEmbeddingCache.open(sdxl_file, encoder_key(sdxl), captions)
    looked_up, encoded = cache.encode_conditioning(captions), sdxl.encode_conditioning(captions)
    assert looked_up.context.shape == (3, 77, 64) and looked_up.pooled.shape == (3, 32)
    assert torch.equal(looked_up.context, encoded.context) and torch.equal(looked_up.pooled, encoded.pooled)
    # the unconditional branch: zeros for a model with force_zeros_for_empty_prompt, as its encoder gives
    assert sdxl.force_zeros_for_empty_prompt
    zeros = cache.empty_conditioning(force_zeros=True)
    assert not zeros.context.any() and not zeros.pooled.any()
    assert torch.equal(zeros.context, sdxl.empty_conditioning().context)
    torch.testing.assert_close(cache.empty_conditioning().pooled, sdxl.encode_conditioning([""]).pooled, rtol=0,
                               atol=1e-6)  # (encoded in a batch of 3 there, of 1 here)
    with pytest.raises(StaleCacheError) as error:
        TextEmbeddingCache.open(sd_file, encoder_key(sdxl), captions)
    assert str(error.value) == (f"text-embedding cache {sd_file} was built for an SD 1.x/2.x model's text encoder, "
                                "this run uses an SDXL model's: delete it or set cache.rebuild=true")
    with pytest.raises(StaleCacheError, match="built for an SDXL model's text encoder, this run uses an SD 1.x/2.x"):
        TextEmbeddingCache.open(sdxl_file, encoder_key(sd), captions)


# ---------------------------------------------------------------------------------------------- refused at once


@pytest.mark.parametrize("overrides, message", [
    (["text_encoder.kind=clip"], "config key 'model.preset': 'sdxl-tiny' is SDXL-shaped but text_encoder.kind is clip"),
    (["model.preset=tiny"], "config key 'model.preset': 'tiny' is not SDXL-shaped but text_encoder.kind is sdxl"),
    (["text_encoder.path="], "config key 'text_encoder.path': is empty, which takes the towers of model.pretrained"),
    (["text_encoder.layer=penultimate"], "config key 'text_encoder.layer': is not used with text_encoder.kind=sdxl"),
    (["model.preset=sdxl-refiner"], "config key 'model.preset': training an SDXL refiner is not supported"),
])
def test_sd_and_sdxl_settings_that_do_not_fit_stop_with_one_line(tmp_path, tiny_sdxl_model, shapes, capsys, overrides,
                                                                  message):
    code, _, err = run(train_ldm.main, sdxl_args(tmp_path / "run", tiny_sdxl_model, shapes, *overrides), capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith(f"error: {message}"), err
    assert not (tmp_path / "run").exists()


def test_an_sd_model_with_sdxl_towers_and_an_sdxl_model_with_one_tower_are_refused(tmp_path, tiny_sdxl_model,
                                                                                    tiny_model, shapes, capsys):
    args = sdxl_args(tmp_path / "a", tiny_sdxl_model, shapes, f"model.pretrained={tiny_model}")
    code, _, err = run(train_ldm.main, args, capsys)
    reset_accelerate_state()
    assert code == 2 and f"model.pretrained '{tiny_model}' is an SD 1.x/2.x model, but text_encoder.kind=sdxl" in err
    args = sdxl_args(tmp_path / "b", tiny_sdxl_model, shapes, f"model.pretrained={tiny_sdxl_model}",
                     "text_encoder.kind=clip", f"text_encoder.path={tiny_model}")
    code, _, err = run(train_ldm.main, args, capsys)
    reset_accelerate_state()
    assert code == 2 and "is an SDXL model, whose U-Net takes SDXL's two text towers: set text_encoder.kind=sdxl" in err
    assert not list((tmp_path / "a").rglob("*.safetensors")) and not list((tmp_path / "b").rglob("*.safetensors"))


def test_a_latent_cache_built_for_the_other_family_is_refused_then_rebuilt_keeping_its_shards(
        tmp_path, tiny_sdxl_model, tiny_model, shapes, capsys):
    latents = tmp_path / "latents"
    sd = ["--config", str(ROOT / "configs/ldm/tiny.yaml"), f"data.path={shapes}",
          f"cache.vae={tiny_sdxl_model / 'vae'}", f"cache.dir={latents}", f"text_encoder.path={tiny_model}",
          f"train.output_dir={tmp_path / 'sd'}"]
    code, _, err = run(cache_latents.main, sd, capsys)  # an SD run's cache (same VAE: only the family differs)
    reset_accelerate_state()
    assert code == 0, err
    manifest = (latents / "manifest.json").read_bytes()
    shard = next(latents.glob("shard-*")).read_bytes()

    code, _, err = run(train_ldm.main, sdxl_args(tmp_path / "run", tiny_sdxl_model, shapes, f"cache.dir={latents}"),
                       capsys)
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"error: latent cache {latents} was built for an SD 1.x/2.x model and this run trains an SDXL model: rebuild "
        "it with cache.rebuild=true (its shards are kept if they match) or delete it"), err
    assert not (tmp_path / "run").exists() and (latents / "manifest.json").read_bytes() == manifest  # nothing written

    sdxl = sd[:-2] + ["text_encoder.kind=sdxl", f"text_encoder.path={tiny_sdxl_model}", "model.preset=sdxl-tiny",
                      "cache.rebuild=true", f"train.output_dir={tmp_path / 'sdxl'}"]
    code, _, err = run(cache_latents.main, sdxl, capsys)
    reset_accelerate_state()
    assert code == 0, err
    assert json.loads((latents / "manifest.json").read_text())["data"]["family"] == "sdxl"
    assert next(latents.glob("shard-*")).read_bytes() == shard  # latents do not depend on the family: kept
    code, _, err = run(train_ldm.main, [*sd, "train.report_to=none"], capsys)  # and now an SD run is refused
    assert code == 2 and "was built for an SDXL model and this run trains an SD 1.x/2.x model" in err


# ---------------------------------------------------------------------------------------------- a run and its export


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, tiny_sdxl_model, shapes) -> Path:
    """3 steps from scratch with the text-embedding cache, caption dropout, EMA and the validation loss on 4 of the 16
    images."""
    out = tmp_path_factory.mktemp("sdxl-scratch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(*sdxl_args(out, tiny_sdxl_model, shapes, "train.max_steps=3", "train.checkpoint_every=3",
                         "cache.text_embeddings=true", "train.caption_dropout=0.5", "train.ema_decay=0.5",
                         "data.num_val=4", "train.val_every=2", "train.val_bands=2", "noise.min_snr_gamma=5"))
    finally:
        torch.set_num_threads(before)
    return out


def test_the_text_cache_of_a_run_holds_both_towers_and_the_pooled_embedding(scratch):
    with safe_open(scratch / "latents" / FILE_NAME, framework="pt") as file:
        assert file.get_slice("embeddings").get_shape()[1:] == [77, 64]
        assert file.get_slice("pooled").get_shape()[1:] == [32]
        assert json.loads(file.metadata()["key"])["family"] == "sdxl"


def val_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "checkpoints/val_loss.jsonl").read_text().splitlines()]


def test_an_sdxl_run_writes_its_validation_loss(scratch):
    """SDXL's conditioning (pooled embedding, time ids) from the text cache: rows at val_every and at the end, raw and
    EMA weights, per band, the min-SNR-weighted loss beside the plain MSE."""
    rows = val_rows(scratch)
    assert [row["step"] for row in rows] == [2, 3]
    for row in rows:
        for weights in ("raw", "ema"):
            numbers = row[weights]
            assert numbers["count"] == 8 and list(numbers["bands"]) == ["0-500", "500-1000"]
            assert all(band["count"] == 4 and band["loss"] <= band["mse"] for band in numbers["bands"].values())
            overall = sum(band["loss"] * band["count"] for band in numbers["bands"].values()) / numbers["count"]
            assert numbers["loss"] == pytest.approx(overall, rel=1e-12)
    assert rows[0]["raw"] != rows[0]["ema"]  # EMA weights lag the raw ones


def test_the_export_is_an_sdxl_directory_giving_diffusers_image(scratch):
    from diffusers import StableDiffusionXLPipeline

    from ldm.pipeline.pipeline import Pipeline
    from ldm.pipeline.samplers import make_scheduler

    model = scratch / "model"
    index = json.loads((model / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    special = json.loads((model / "tokenizer_2/tokenizer_config.json").read_text())
    assert special["pad_token"] == "!"  # as diffusers ships SDXL's tokenizer_2
    spec = inspect_model(model)
    assert spec.arch == "sdxl"
    ours = Pipeline.open(spec, "cpu", "fp32")
    theirs = StableDiffusionXLPipeline.from_pretrained(model, add_watermarker=False)
    theirs.set_progress_bar_config(disable=True)
    theirs.scheduler = make_scheduler("ddim", ours.scheduler_config)
    for negative in ("blurry", ""):  # "": the zeros of force_zeros_for_empty_prompt on both sides
        mine = ours(PROMPT, negative, steps=3, cfg=5.0, sampler="ddim", seed=1, height=32, width=32,
                    show_progress=False)
        image = theirs(PROMPT, negative_prompt=negative or None, num_inference_steps=3, guidance_scale=5.0, height=32,
                       width=32, generator=[torch.Generator().manual_seed(1)], output_type="np").images
        assert np.abs(mine.decoded - image).max() <= 1e-4


# ---------------------------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_a_run_killed_in_a_step_resumes_to_the_same_weights(tmp_path, tiny_sdxl_model, shapes):
    """SIGKILL during step 4 (checkpoint at 2), then --resume latest: step 6 equals the uninterrupted run's bit for
    bit (weights, AdamW, EMA, RNG states): latents, caption dropout to zeros, the time ids of flipped copies, the
    samples through the SDXL pipeline (tests/test_faults.py kills SD runs the same way)."""
    from test_faults import Run, checkpoint_contents, differences, kill_after_step

    hard = ["train.cpu=true", "train.max_steps=6", "train.grad_accum=2", "train.checkpoint_every=2",
            "train.caption_dropout=0.3", "data.random_flip=true", "noise.min_snr_gamma=5", "noise.offset_noise=0.05",
            "sample.every=2", "sample.prompts=[a red circle]", "sample.steps=2"]

    def command(out: Path, *extra: str) -> list[str]:
        return [sys.executable, str(ROOT / "train/train_ldm.py"), *sdxl_args(out, tiny_sdxl_model, shapes, *hard),
                *extra]
    reference = Run(command(tmp_path / "reference"), tmp_path / "reference.log")
    killed = Run(command(tmp_path / "killed"), tmp_path / "killed.log")
    kill = kill_after_step(killed, 3, tmp_path / "killed/checkpoints")
    assert kill["checkpoint"] == 2 and kill["lost"] >= 1, kill
    resumed = Run(command(tmp_path / "killed", "--resume", "latest"), tmp_path / "resumed.log")
    assert resumed.finish() == 0, resumed.tail()
    assert reference.finish() == 0, reference.tail()
    a = checkpoint_contents(tmp_path / "reference/checkpoints/step-00000006")
    b = checkpoint_contents(tmp_path / "killed/checkpoints/step-00000006")
    assert any(k.startswith("ema/") for k in a) and differences(a, b) == []


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_sdxl_model, shapes) -> Path:
    """LoRA on the pretrained tiny SDXL's U-Net and both text towers (towers from model.pretrained), merged too, with
    the validation loss (through the adapted towers) on 4 of the 16 images.
    (All four attention projections: diffusers 0.42 cannot read this kohya file's text-encoder part without out_proj,
    "Could not automatically infer state dict type"; the diffusers file loads either way.)"""
    out = tmp_path_factory.mktemp("sdxl-lora")
    train(*sdxl_args(out, tiny_sdxl_model, shapes, f"model.pretrained={tiny_sdxl_model}", "text_encoder.path=",
                     "lora.enabled=true", "lora.text_encoder_targets=[q_proj,k_proj,v_proj,out_proj]",
                     "lora.export_merged=true",
                     "optim.lr=1e-2", "train.max_steps=2", "train.checkpoint_every=2", "train.ema_decay=0",
                     "data.num_val=4", "train.val_every=1"))
    return out


@pytest.mark.slow
def test_sdxl_lora_files_load_in_diffusers_as_the_merged_model(lora_run, tiny_sdxl_model):
    from diffusers import StableDiffusionXLPipeline

    adapter = load_file(lora_run / "lora/pytorch_lora_weights.safetensors")
    assert {k.split(".")[0] for k in adapter} == {"unet", "text_encoder", "text_encoder_2"}
    rows = val_rows(lora_run)  # the adapters' validation loss (no EMA: raw weights only), moving as they train
    assert [row["step"] for row in rows] == [1, 2] and all(row.keys() == {"step", "raw"} for row in rows)
    assert rows[0]["raw"]["loss"] != rows[1]["raw"]["loss"]
    assert all(v.abs().max() > 0 for k, v in adapter.items() if ".lora_B." in k and k.startswith("text_encoder_2."))
    kohya = load_file(lora_run / "lora/lora.safetensors")
    assert {k.split("_")[1] for k in kohya} == {"unet", "te1", "te2"}
    merged = StableDiffusionXLPipeline.from_pretrained(lora_run / "model", add_watermarker=False)
    for file in ("pytorch_lora_weights.safetensors", "lora.safetensors"):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model, add_watermarker=False)
        pipe.load_lora_weights(lora_run / "lora", weight_name=file)
        with torch.no_grad():
            ours, theirs = merged.encode_prompt(PROMPT), pipe.encode_prompt(PROMPT)
            for a, b in zip(ours, theirs):
                if a is not None:
                    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
            x, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
            time_ids = torch.tensor([[32.0, 32, 0, 0, 32, 32]])
            kwargs = {"encoder_hidden_states": ours[0],
                      "added_cond_kwargs": {"text_embeds": ours[2], "time_ids": time_ids}}
            torch.testing.assert_close(merged.unet(x, t, **kwargs).sample, pipe.unet(x, t, **kwargs).sample,
                                       rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("file", ["pytorch_lora_weights.safetensors", "lora.safetensors"])
def test_our_pipeline_applies_both_sdxl_lora_files_as_the_merged_model(lora_run, tiny_sdxl_model, file):
    from ldm.pipeline.pipeline import Pipeline

    def image(pipe: Pipeline) -> np.ndarray:
        return pipe(PROMPT, "blurry", steps=3, cfg=5.0, sampler="ddim", seed=1, height=32, width=32,
                    show_progress=False).decoded
    merged_pipe = Pipeline.open(inspect_model(lora_run / "model"), "cpu", "fp32")
    merged = image(merged_pipe)
    pipe = Pipeline.open(inspect_model(tiny_sdxl_model), "cpu", "fp32")
    pipe.scheduler_config = merged_pipe.scheduler_config  # the export's (DDIM from the training schedule)
    base = image(pipe)
    pipe.load_lora(lora_run / "lora" / file, 1.0)  # U-Net, CLIP-L and bigG parts
    adapted = image(pipe)
    assert np.abs(adapted - merged).max() <= 1e-4 < np.abs(base - merged).max()


@pytest.mark.slow
@pytest.mark.parametrize("source", ["directory", "single file"])
def test_a_full_fine_tune_from_an_sdxl_model_trains_its_unet(tmp_path, tiny_sdxl_model, shapes, source):
    from diffusers import UNet2DConditionModel

    from ldm.singlefile.save import directory_to_file

    pretrained = tiny_sdxl_model
    if source == "single file":  # the original layout: U-Net and both towers from the one file
        pretrained = tmp_path / "sdxl.safetensors"
        directory_to_file(tiny_sdxl_model, pretrained)
    train(*sdxl_args(tmp_path, tiny_sdxl_model, shapes, f"model.pretrained={pretrained}", "text_encoder.path=",
                     "optim.lr=1e-3", "train.max_steps=2", "train.checkpoint_every=2", "train.ema_decay=0"))
    base = UNet2DConditionModel.from_pretrained(tiny_sdxl_model / "unet").state_dict()
    tuned = UNet2DConditionModel.from_pretrained(tmp_path / "model/unet").state_dict()
    assert any(not torch.equal(base[k], tuned[k]) for k in base)
    assert inspect_model(tmp_path / "model").arch == "sdxl"


