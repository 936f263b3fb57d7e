"""Tiny webdataset tar shards in img2dataset's layout, for the shard tests (tests/test_shards.py and
tests/test_remote_shards.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import webdataset as wds
from PIL import Image

PER_SHARD = 5
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]


def png_bytes(colour: tuple[int, int, int], size: tuple[int, int] = (40, 32), fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def write_shards(root: Path, shards: int, *, corrupt: str | None = None) -> list[Path]:
    """img2dataset's layout, written with webdataset's own TarWriter: shard k holds keys k*5 .. k*5+4.

    Even shards caption with `.txt` (+ a `.json` without a caption key), odd ones with `.json` only; `corrupt` names
    one key whose image bytes are garbage.
    """
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(shards):
        path = root / f"{k:05d}.tar"
        with wds.TarWriter(str(path), encoder=False) as sink:
            for j in range(PER_SHARD):
                key = f"{k * PER_SHARD + j:09d}"
                sample = {"__key__": key, "jpg": png_bytes(COLOURS[j], fmt="JPEG")}
                if key == corrupt:
                    sample["jpg"] = b"\xff\xd8 this is not a jpeg"
                if k % 2 == 0:
                    sample["txt"] = f"caption {key}".encode()
                    sample["json"] = json.dumps({"key": key, "width": 40}).encode()
                else:
                    sample["json"] = json.dumps({"caption": f"json caption {key}"}).encode()
                sink.write(sample)
        paths.append(path)
    return paths
