"""One latent-cache shard file: its tensors, captions and skipped images, written as safetensors with hashes in the
metadata so the file verifies itself, even before a manifest vouches for it (`ldm.latents.cache` describes the whole
on-disk layout and the rows' tensors).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ldm.latents.cache_key import FORMAT_VERSION
from ldm.weights import BadSafetensors, read_safetensors_header

SHARD_FORMAT_NAME = "ldm-latent-shard"
SHARD_FILE = re.compile(r"^shard-(\d+)-(\d+)\.safetensors$")


@dataclass
class Shard:
    """One shard file's contents: tensors with one row per encoded image, captions and skipped images."""

    tensors: dict[str, torch.Tensor]  # mean, std, [flip_mean, flip_std]: (R, C, h, w); index: (R,); crops (R, 2)
    captions: list[str]
    skipped: list[dict[str, Any]]  # {"index", "name", "reason"}
    build: str

    @property
    def rows(self) -> int:
        return int(self.tensors["index"].shape[0])

    def covered_indices(self) -> list[int]:
        """Dataset indices this shard accounts for: encoded or skipped."""
        return sorted(self.tensors["index"].tolist() + [s["index"] for s in self.skipped])


def shard_name(rank: int, k: int) -> str:
    return f"shard-{rank}-{k}.safetensors"


def content_sha256(tensors: dict[str, torch.Tensor], captions_json: str, skipped_json: str, build: str) -> str:
    """Hash of a shard's payload; stored in its metadata so the file can be verified without a manifest."""
    return tensors_sha256(tensors, build, captions_json, skipped_json)


def tensors_sha256(tensors: dict[str, torch.Tensor], *texts: str) -> str:
    """sha256 of `texts` (each NUL-terminated), then of each tensor's name, dtype, shape and bytes, in name order.
    The bytes are hashed in place (no copy), so a memory-mapped tensor is read once, page by page."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}\0".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def serialize_shard(shard: Shard) -> bytes:
    """A shard file's bytes: the tensors, and captions, skipped images and hashes in the metadata."""
    captions_json = json.dumps(shard.captions, ensure_ascii=False)
    skipped_json = json.dumps(shard.skipped, ensure_ascii=False)
    metadata = {
        "format": SHARD_FORMAT_NAME,
        "version": str(FORMAT_VERSION),
        "build": shard.build,
        "captions": captions_json,
        "skipped": skipped_json,
        "content_sha256": content_sha256(shard.tensors, captions_json, skipped_json, shard.build),
    }
    return save_safetensors({k: v.contiguous() for k, v in shard.tensors.items()}, metadata=metadata)


def parse_shard(data: bytes) -> Shard:
    """Decode and self-verify a shard file's bytes; raise ValueError saying what is wrong."""
    try:
        _, metadata = read_safetensors_header(data)
        tensors = load_safetensors(data)
    except BadSafetensors as error:
        raise ValueError(f"is not a valid safetensors file ({error.reason})") from error
    except SafetensorError as error:
        raise ValueError(f"is not a valid safetensors file ({str(error).splitlines()[0]})") from error
    if metadata.get("format") != SHARD_FORMAT_NAME:
        raise ValueError("is not a latent cache shard")
    if int(metadata.get("version", 0)) > FORMAT_VERSION:
        raise ValueError(f"has format version {metadata['version']}, newer than this code ({FORMAT_VERSION})")
    build = metadata.get("build", "")
    captions_json, skipped_json = metadata.get("captions", "[]"), metadata.get("skipped", "[]")
    if content_sha256(tensors, captions_json, skipped_json, build) != metadata.get("content_sha256"):
        raise ValueError("does not match its own content hash (corrupted)")
    shard = Shard(tensors, json.loads(captions_json), json.loads(skipped_json), build)
    if any(t.shape[0] != shard.rows for t in tensors.values()) or len(shard.captions) != shard.rows:
        raise ValueError("has tensors or captions of different lengths")
    return shard
