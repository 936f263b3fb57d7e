"""Checking a checkpoint before anything is loaded from it, and turning a `--resume` value into a checkpoint path.

Every file the manifest lists is checked: its size, its sha256 (files up to 64 MiB), the header of a safetensors
file and the syntax of a JSON file. Any problem is a `UserError` that names the file and the checkpoint to resume
from instead.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ldm.checkpoint.layout import (
    FORMAT_VERSION, MANIFEST_NAME, corrupt_message, latest_checkpoint, read_manifest, resume_hint,
)
from ldm.errors import UserError
from ldm.files import os_reason, sha256_file
from ldm.weights import BadSafetensors, read_safetensors_header

log = logging.getLogger(__name__)

# Load verifies sha256 of files up to this size; bigger ones (model weights, optimizer moments) are checked by size
# and safetensors header only, so that resuming a multi-GB run on every process does not re-hash gigabytes.
HASH_VERIFY_MAX_BYTES = 64 * 1024 * 1024


def resolve_resume(resume: str | Path | None, root: str | Path) -> Path | None:
    """Turn a `--resume` value into a checkpoint path: None/""/"none" -> None, "latest" -> the newest under `root`
    (None when there is none), anything else -> that checkpoint, validated."""
    if resume is None:
        return None
    text = str(resume).strip()
    if text.lower() in ("", "none"):
        return None
    if text.lower() == "latest":
        found = latest_checkpoint(root)
        if found is None:
            log.info("no checkpoint under %s; starting fresh", root)
        else:
            log.info("resuming from the latest checkpoint %s", found)
        return found
    path = Path(text).expanduser()
    if not path.exists():
        raise UserError(
            f"--resume {text}: no such checkpoint; pass an existing step-XXXXXXXX directory, 'latest' or 'none'"
        )
    if path.is_dir() and not (path / MANIFEST_NAME).exists():
        inner = latest_checkpoint(path)
        if inner is not None:
            raise UserError(f"--resume {text} is a folder of checkpoints, not a checkpoint; pass --resume {inner}")
    validate_checkpoint(path)
    return path


def validate_checkpoint(path: Path) -> dict[str, Any]:
    """Check the manifest and every file it lists (size, small files' sha256, safetensors headers, JSON)."""
    if not path.is_dir():
        raise UserError(
            f"checkpoint {path} is not a directory; pass a step-XXXXXXXX directory, 'latest' or 'none' to --resume"
        )
    if not (path / MANIFEST_NAME).is_file():
        raise UserError(
            f"incomplete checkpoint {path}: no {MANIFEST_NAME} (its save was interrupted); {resume_hint(path)}"
        )
    try:
        manifest = read_manifest(path)
    except (OSError, ValueError) as e:
        raise UserError(corrupt_message(path, MANIFEST_NAME, f"is unreadable ({e})")) from e
    if manifest.get("version", 0) > FORMAT_VERSION:
        raise UserError(
            f"checkpoint {path} has format version {manifest.get('version')}, newer than this code supports "
            f"({FORMAT_VERSION}); update ldm"
        )
    for relpath, info in manifest.get("files", {}).items():
        _validate_file(path, relpath, info)
    return manifest


def _validate_file(checkpoint: Path, relpath: str, info: Mapping[str, Any]) -> None:
    file = checkpoint / relpath
    if not file.is_file():
        raise UserError(corrupt_message(checkpoint, relpath, "is missing"))
    size = file.stat().st_size
    if size != info["bytes"]:
        problem = f"has {size} bytes instead of {info['bytes']} (truncated?)"
        raise UserError(corrupt_message(checkpoint, relpath, problem))
    if size <= HASH_VERIFY_MAX_BYTES and "sha256" in info and sha256_file(file) != info["sha256"]:
        raise UserError(corrupt_message(checkpoint, relpath, "does not match its sha256 in the manifest"))
    if relpath.endswith(".safetensors"):
        _check_safetensors_header(checkpoint, relpath)
    elif relpath.endswith(".json"):
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(corrupt_message(checkpoint, relpath, f"is not valid JSON ({e})")) from e


def _check_safetensors_header(checkpoint: Path, relpath: str) -> None:
    """Parse the header and check that the tensors it describes fill the file exactly (a cheap truncation check
    that does not read the data)."""
    try:
        read_safetensors_header(checkpoint / relpath)
    except BadSafetensors as e:
        raise UserError(corrupt_message(checkpoint, relpath, f"is not a valid safetensors file ({e.reason})")) from e
    except OSError as e:
        raise UserError(corrupt_message(checkpoint, relpath, f"is not a valid safetensors file ({os_reason(e)})")) \
            from e
