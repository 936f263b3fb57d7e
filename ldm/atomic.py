"""Directories that appear complete or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_directory(directory: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling to fill; when the block succeeds it takes `directory`'s place by renames.

    An interrupted or failed write leaves the previous `directory` (if any) untouched and the temporary behind, to
    be cleared by the next attempt. The old directory is moved aside before the rename and deleted after it.
    """
    directory = Path(directory)
    tmp = directory.with_name(f".tmp-{directory.name}")
    old = directory.with_name(f".old-{directory.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    yield tmp
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
