"""ldm.weights.read_safetensors_header, the one hand reader of a safetensors header: what it accepts loads, what it
refuses safetensors refuses too, and every caller (model directories, checkpoints, the latent cache) names the fault
in its own words."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ldm.checkpoint.layout import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME
from ldm.checkpoint.validate import validate_checkpoint
from ldm.errors import UserError
from ldm.latents.cache import CorruptCacheError, load_shard
from ldm.weights import BadSafetensors, check_safetensors_file, read_safetensors_header

TENSORS = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16),
           "empty": torch.zeros(0, dtype=torch.int64)}
GOOD = save_safetensors(TENSORS, metadata={"format": "pt", "note": "hello"})


def with_header(header: dict, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def checkpoint_holding(root, data: bytes):
    """A training checkpoint whose one weight file is `data`, its manifest matching the file's size."""
    checkpoint = root / "step-00000001"
    (checkpoint / "models").mkdir(parents=True)
    (checkpoint / "models" / "net.safetensors").write_bytes(data)
    manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "step": 1,
                "files": {"models/net.safetensors": {"bytes": len(data)}}}
    (checkpoint / MANIFEST_NAME).write_text(json.dumps(manifest))
    return checkpoint


def test_a_good_file_gives_its_table_and_metadata(tmp_path):
    (tmp_path / "good.safetensors").write_bytes(GOOD)
    for source in (GOOD, tmp_path / "good.safetensors"):
        tensors, metadata = read_safetensors_header(source)
        assert metadata == {"format": "pt", "note": "hello"}
        assert {k: (v["dtype"], v["shape"]) for k, v in tensors.items()} == {
            "a": ("F32", [2, 3]), "b": ("F16", [4]), "empty": ("I64", [0])}
    assert check_safetensors_file(tmp_path / "good.safetensors")["__metadata__"] == {"format": "pt", "note": "hello"}


def damaged() -> dict[str, tuple[bytes, str]]:
    """name -> (file content, the phrase that follows the file's name)."""
    header_len = struct.unpack("<Q", GOOD[:8])[0]
    table = json.loads(GOOD[8: 8 + header_len])
    data = GOOD[8 + header_len:]

    invalid = "is corrupted: its safetensors header is not valid"

    def changed(name: str, **info) -> bytes:
        return with_header({**table, name: {**table[name], **info}}, data)

    return {
        "lfs": (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 3438167534\n",
                "is a git-lfs pointer file, not the weights: run `git lfs pull`"),
        "tiny": (GOOD[:5], "is truncated (5 bytes)"),
        "cut header": (GOOD[:100], f"is truncated or not a safetensors file: its header claims {header_len} bytes "
                                   "but the file has 100"),
        "cut data": (GOOD[:-3], f"is truncated: it has {len(GOOD) - 3} bytes, its header needs {len(GOOD)}"),
        "trailing bytes": (GOOD + b"\0" * 8, f"is corrupted: it has {len(GOOD) + 8} bytes, but its header "
                                             f"accounts for {len(GOOD)}"),
        "not JSON": (struct.pack("<Q", 4) + b"\xff\xfe{]" + b"\0" * 64, "is corrupted: its safetensors header is "
                                                                        "not valid"),
        "a list": (with_header([1, 2]), f"{invalid} (is not a JSON object)"),  # type: ignore[arg-type]
        "bad metadata": (with_header({**table, "__metadata__": {"n": 1}}, data),
                         f"{invalid} (has __metadata__ that is not a table of strings)"),
        "no offsets": (changed("a", data_offsets=None),
                       f"{invalid} (describes tensor 'a' without a dtype, a shape and two data_offsets)"),
        "wrong size": (changed("a", shape=[2, 2]), f"{invalid} (gives tensor 'a' 24 bytes, but F32 [2, 2] takes 16)"),
        "overlap": (changed("b", data_offsets=[0, 8]),
                    f"{invalid} (gives tensor 'a' data_offsets [0, 24], not starting where the previous one ends (8))"),
    }


@pytest.mark.parametrize("name", list(damaged()))
def test_a_damaged_file_is_refused_by_the_reader_and_by_safetensors(tmp_path, name):
    content, problem = damaged()[name]
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    for source in (content, path):
        with pytest.raises(BadSafetensors) as e:
            read_safetensors_header(source)
        assert str(e.value).startswith(problem)
    with pytest.raises(UserError) as e:
        check_safetensors_file(path)
    assert f"'{path}' {problem}" in str(e.value) and "\n" not in str(e.value)
    # never stricter than safetensors itself: every file refused here, its own reader refuses too
    with pytest.raises(SafetensorError):
        load_safetensors(content)


def test_the_header_limit_is_safetensors_own(monkeypatch, tmp_path):
    monkeypatch.setattr("ldm.weights.SAFETENSORS_MAX_HEADER", 16)
    with pytest.raises(BadSafetensors, match=r"^is not a safetensors file: its header claims \d+ bytes, over "
                                             r"safetensors' limit of 16$"):
        read_safetensors_header(GOOD)


# ------------------------------------------------------------------------------- every caller, its own words

def test_a_truncated_file_is_refused_by_every_caller_with_its_message(tmp_path):
    cut = GOOD[:-3]
    needs = f"it has {len(cut)} bytes, its header needs {len(GOOD)}"

    # a model directory's weights (ldm-generate, ldm-convert, LoRA files ...)
    (tmp_path / "model.safetensors").write_bytes(cut)
    with pytest.raises(UserError) as e:
        check_safetensors_file(tmp_path / "model.safetensors")
    assert str(e.value) == f"'{tmp_path / 'model.safetensors'}' is truncated: {needs}; download it again"

    # a training checkpoint whose manifest matches the (truncated) file's size: only the header check catches it
    checkpoint = checkpoint_holding(tmp_path, cut)
    with pytest.raises(UserError) as e:
        validate_checkpoint(checkpoint)
    assert str(e.value).startswith(f"corrupt checkpoint {checkpoint}: models/net.safetensors is not a valid "
                                   f"safetensors file ({needs}); ")

    # a latent-cache shard whose manifest entry matches its (truncated) bytes
    (tmp_path / "shard-0-0.safetensors").write_bytes(cut)
    entry = {"file": "shard-0-0.safetensors", "bytes": len(cut), "sha256": hashlib.sha256(cut).hexdigest(), "rows": 2}
    with pytest.raises(CorruptCacheError) as e:
        load_shard(tmp_path, entry, build="x")
    assert str(e.value).startswith(f"latent cache {tmp_path}: shard shard-0-0.safetensors is not a valid "
                                   f"safetensors file ({needs}): ")


def test_a_git_lfs_pointer_is_named_by_every_caller(tmp_path):
    pointer = damaged()["lfs"][0]
    checkpoint = checkpoint_holding(tmp_path, pointer)
    with pytest.raises(UserError, match=r"models/net\.safetensors is not a valid safetensors file \(a git-lfs "
                                        r"pointer file, not the weights\)"):
        validate_checkpoint(checkpoint)
    entry = {"file": "s.safetensors", "bytes": len(pointer), "sha256": hashlib.sha256(pointer).hexdigest(), "rows": 1}
    (tmp_path / "s.safetensors").write_bytes(pointer)
    with pytest.raises(CorruptCacheError, match=r"shard s\.safetensors is not a valid safetensors file \(a git-lfs "
                                                r"pointer file"):
        load_shard(tmp_path, entry, build="x")


def test_the_test_can_fail_an_intact_file_passes_every_caller(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(GOOD)
    check_safetensors_file(tmp_path / "model.safetensors")
    checkpoint = tmp_path / "step-00000001"
    (checkpoint / "models").mkdir(parents=True)
    (checkpoint / "models" / "net.safetensors").write_bytes(GOOD)
    manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "step": 1,
                "files": {"models/net.safetensors": {"bytes": len(GOOD)}}}
    (checkpoint / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert validate_checkpoint(checkpoint)["step"] == 1
    (tmp_path / "s.safetensors").write_bytes(GOOD)
    entry = {"file": "s.safetensors", "bytes": len(GOOD), "sha256": hashlib.sha256(GOOD).hexdigest(), "rows": 2}
    with pytest.raises(CorruptCacheError, match=r"shard s\.safetensors is not a latent cache shard"):  # past the header
        load_shard(tmp_path, entry, build="x")
