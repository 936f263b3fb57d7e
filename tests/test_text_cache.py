"""The text-embedding cache: lookups equal the encoder's outputs, stale and corrupt files are refused in one line,
and training with it equals training without it."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldm.latents.cache import CorruptCacheError, StaleCacheError
from ldm.latents.text_cache import (
    FILE_NAME, TextEmbeddingCache, _content_sha256, build_text_cache, encoder_key, ensure_text_cache,
)
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


def test_a_corrupt_file_is_rebuilt_with_rebuild_and_the_main_process_opens_it_once(tmp_path, built, encoder,
                                                                                     monkeypatch, caplog):
    path = tmp_path / FILE_NAME
    path.write_bytes(built.read_bytes()[:-100])
    main = SimpleNamespace(num_processes=1, is_main_process=True, device=torch.device("cpu"))
    with pytest.raises(CorruptCacheError):
        ensure_text_cache(main, encoder, CAPTIONS, tmp_path)
    opens = []
    real = TextEmbeddingCache.open.__func__
    counted = classmethod(lambda cls, *args, **kwargs: opens.append(args[0]) or real(cls, *args, **kwargs))
    monkeypatch.setattr(TextEmbeddingCache, "open", counted)
    cache = ensure_text_cache(main, encoder, CAPTIONS, tmp_path, rebuild=True)
    assert "rebuilding the text-embedding cache (cache.rebuild=true)" in caplog.text
    assert opens == [path, path]  # the corrupt file, then the rebuilt one: each read and verified once
    torch.testing.assert_close(cache.encode(CAPTIONS), encoder.encode(CAPTIONS), rtol=0, atol=1e-6)
    opens.clear()
    ensure_text_cache(main, encoder, CAPTIONS, tmp_path)
    assert opens == [path]  # a good file: opened once, by the check, and that cache is the one returned


def tolerance_excess(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float, atol: float) -> float:
    """max |a - b| / (atol + rtol |b|) over all weights: <= 1 is within `assert_close`'s tolerance."""
    return max(float(((a[n] - b[n]).abs() / (atol + rtol * b[n].abs())).max()) for n in b)


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_accelerate", "one_torch_thread")  # tiny kernels: threads only spin-wait
def test_training_with_the_cache_equals_training_without_it_and_a_corrupt_one_stops_the_run(tmp_path, capsys):
    from conftest import reset_accelerate_state

    parts = write_tiny_stage2_inputs(tmp_path / "parts", num_images=8)

    def train(out: Path, *overrides: str) -> dict[str, torch.Tensor]:
        train_ldm.main(["--config", str(ROOT / "configs/ldm/tiny.yaml"), f"train.output_dir={out}",
                        f"data.path={parts['data']}", f"cache.vae={parts['vae']}", f"text_encoder.path={parts['text']}",
                        "train.report_to=none", "sample.every=0", "train.max_steps=2", "train.batch_size=4",
                        "train.caption_dropout=0.5", f"cache.dir={tmp_path / 'latents'}", *overrides])
        reset_accelerate_state()
        return load_file(out / "model/unet/diffusion_pytorch_model.safetensors")

    plain = train(tmp_path / "plain")
    cached = train(tmp_path / "cached", "cache.text_embeddings=true")
    assert plain.keys() == cached.keys()
    # the same embeddings up to the last bits of a batched matmul, hence the same training
    assert tolerance_excess(cached, plain, rtol=1e-4, atol=1e-6) <= 1

    # The negative control: a valid cache whose rows are shifted by one (every caption gets another's embedding,
    # "" included) must train measurably differently, or the comparison above could not catch wrong embeddings.
    text_file = tmp_path / "latents" / FILE_NAME
    with safe_open(text_file, framework="pt") as file:
        metadata, embeddings = file.metadata(), file.get_tensor("embeddings").roll(1, dims=0).contiguous()
    save_file({"embeddings": embeddings}, text_file, metadata={
        **metadata, "content_sha256": _content_sha256(embeddings, metadata["captions"], metadata["key"])})
    shuffled = train(tmp_path / "shuffled", "cache.text_embeddings=true")
    assert tolerance_excess(shuffled, plain, rtol=1e-4, atol=1e-6) > 10

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
