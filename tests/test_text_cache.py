"""The text-embedding cache: lookups equal the encoder's outputs, stale and corrupt files are refused in one line,
and training with it equals training without it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldm.latents.cache import CorruptCacheError, StaleCacheError
from ldm.latents.text_cache import FILE_NAME, TextEmbeddingCache, build_text_cache, encoder_key
from ldm.text.tiny import tiny_clip_text_encoder
from ldm.unet.tiny import write_tiny_stage2_inputs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train"))
import train_ldm  # noqa: E402

CAPTIONS = ["a red circle", "a blue square", "a red circle", "", "a green triangle on a white background"]


@pytest.fixture(scope="module")
def encoder():
    return tiny_clip_text_encoder(seed=0)


@pytest.fixture(scope="module")
def built(tmp_path_factory, encoder) -> Path:
    path = tmp_path_factory.mktemp("text") / FILE_NAME
    build_text_cache(path, encoder, encoder_key(encoder), CAPTIONS, batch_size=2)
    return path


def test_lookups_equal_the_encoder_and_the_empty_caption_is_row_0(built, encoder):
    cache = TextEmbeddingCache.open(built, encoder_key(encoder), CAPTIONS)
    assert cache.captions == ["", "a blue square", "a green triangle on a white background", "a red circle"]
    batch = ["a red circle", "a green triangle on a white background", "", "a red circle"]
    torch.testing.assert_close(cache.encode(batch), encoder.encode(batch), rtol=0, atol=1e-6)
    torch.testing.assert_close(cache.empty_embedding(), encoder.empty_embedding(), rtol=0, atol=1e-6)
    assert cache.encode(batch).shape == (4, 77, 32) and cache.bytes_per_caption() == 77 * 32 * 4


@pytest.mark.parametrize("change, difference", [
    (lambda: tiny_clip_text_encoder(seed=1), "weights_sha256"),
    (lambda: tiny_clip_text_encoder(layer="penultimate"), "layer last != penultimate"),
    (lambda: tiny_clip_text_encoder().to(torch.float64), "dtype float32 != float64"),
])
def test_another_encoder_layer_or_dtype_makes_it_stale(built, change, difference):
    with pytest.raises(StaleCacheError) as error:
        TextEmbeddingCache.open(built, encoder_key(change()), CAPTIONS)
    message = str(error.value)
    assert message.startswith(f"text-embedding cache {built} is stale: it was built with "), message
    assert difference in message, message  # (a dtype change changes the weights' bytes too)
    assert message.endswith("(cache != this run): delete it or set cache.rebuild=true")


def test_another_tokenizer_or_other_captions_make_it_stale(built, encoder):
    other = tiny_clip_text_encoder()
    other.tokenizer.add_tokens(["<shape>"])  # the same weights, another vocabulary
    with pytest.raises(StaleCacheError, match="built with tokenizer_sha256"):
        TextEmbeddingCache.open(built, encoder_key(other), CAPTIONS)
    with pytest.raises(StaleCacheError, match=r"built with other captions \(4 cached != 5 in the latent cache\)"):
        TextEmbeddingCache.open(built, encoder_key(encoder), CAPTIONS + ["a new caption"])


@pytest.mark.parametrize("damage, problem", [
    (lambda data: data[:-100], "is not a valid safetensors file"),
    (lambda data: data[:-200] + bytes([data[-200] ^ 1]) + data[-199:], "does not match its own content hash"),
    (lambda data: b"\0" * len(data), "is not a valid safetensors file"),
])
def test_a_corrupt_file_is_refused(tmp_path, built, encoder, damage, problem):
    path = tmp_path / FILE_NAME
    path.write_bytes(damage(built.read_bytes()))
    with pytest.raises(CorruptCacheError, match=problem) as error:
        TextEmbeddingCache.open(path, encoder_key(encoder), CAPTIONS)
    message = str(error.value)
    assert message.startswith(f"text-embedding cache {path} ")
    assert message.endswith("delete it or set cache.rebuild=true")
    assert "\n" not in message


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_accelerate")
def test_training_with_the_cache_equals_training_without_it_and_a_corrupt_one_stops_the_run(tmp_path, capsys):
    from conftest import reset_accelerate_state

    parts = write_tiny_stage2_inputs(tmp_path / "parts", num_images=8)

    def train(out: Path, *overrides: str) -> None:
        train_ldm.main(["--config", str(ROOT / "configs/ldm/tiny.yaml"), f"train.output_dir={out}",
                        f"data.path={parts['data']}", f"cache.vae={parts['vae']}", f"text_encoder.path={parts['text']}",
                        "train.report_to=none", "sample.every=0", "train.max_steps=2", "train.batch_size=4",
                        "train.caption_dropout=0.5", f"cache.dir={tmp_path / 'latents'}", *overrides])
        reset_accelerate_state()

    train(tmp_path / "plain")
    train(tmp_path / "cached", "cache.text_embeddings=true")
    plain = load_file(tmp_path / "plain/model/unet/diffusion_pytorch_model.safetensors")
    cached = load_file(tmp_path / "cached/model/unet/diffusion_pytorch_model.safetensors")
    assert plain.keys() == cached.keys()
    for name in plain:  # the same embeddings up to the last bits of a batched matmul, hence the same training
        torch.testing.assert_close(cached[name], plain[name], rtol=1e-4, atol=1e-6)

    text_file = tmp_path / "latents" / FILE_NAME
    data = bytearray(text_file.read_bytes())
    data[-7] ^= 0xFF
    text_file.write_bytes(bytes(data))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train(tmp_path / "corrupt", "cache.text_embeddings=true")
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and "Traceback" not in "\n".join(err)
    assert err[-1] == (f"error: text-embedding cache {text_file} does not match its own content hash (corrupted): "
                       "delete it or set cache.rebuild=true")
    train(tmp_path / "rebuilt", "cache.text_embeddings=true", "cache.rebuild=true")
    assert "rebuilding the text-embedding cache (cache.rebuild=true)" in capsys.readouterr().err
