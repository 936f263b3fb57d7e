"""Writes that survive crashes, the one home for them: atomic files and directories, fsync, removal, file hashes.

Every durable write in `ldm` gives the same guarantee: a reader (or a run after `kill -9` or a power cut) sees the
old content or the complete new content, never half of it. The recipe is always the same: write a temporary
sibling (named `.tmp-...`, so cleanup code can recognise it), fsync it, rename it into place, fsync the parent
directory (the rename itself is only durable once the directory is).

- `atomic_write_bytes` / `atomic_write_text`: one file (a latent shard, a manifest, a tokenizer file, a report).
- `atomic_directory`: a directory filled in a block (an exported model); `replace_directory` for a directory filled
  by other means (a generated dataset, a checkpoint): every file and directory in it is fsynced before the rename,
  and an existing directory is replaced only once the new one is complete.
- `atomic_write_safetensors`: one safetensors file written by path (safetensors' own writer, no copy of the whole
  file in memory), so a multi-GB model is never held twice.
- `write_synced`, `fsync_file`, `fsync_dir`, `fsync_tree`: the steps, for callers that publish by other means
  (a checkpoint sealed by its manifest, a PNG that must never overwrite an existing name).
- `append_synced`: one record appended to a log (a line of `val_loss.jsonl`), on disk when it returns. An append is
  not atomic: a kill can leave a torn last record, which the log's reader must drop (and an atomic rewrite repair).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"  # a file or directory being written; the next attempt may delete it
OLD_PREFIX = ".old-"  # a directory moved aside while its replacement is renamed into place

Content = bytes | Callable[[BinaryIO], None]


def temp_sibling(path: str | Path) -> Path:
    """A fresh name next to `path` to stage it under: `.tmp-<name>.<pid>-<random>` (unique across processes)."""
    path = Path(path)
    return path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}-{secrets.token_hex(4)}")


def write_synced(path: str | Path, content: Content) -> None:
    """Create `path` (it must not exist), fill it with `content` (bytes, or a function writing to the open file),
    and fsync it, so that a full disk is reported here and the data is on disk when this returns."""
    with open(path, "xb") as f:
        if isinstance(content, bytes):
            f.write(content)
        else:
            content(f)
        f.flush()
        os.fsync(f.fileno())


def append_synced(path: str | Path, data: bytes) -> None:
    """Append `data` to `path` (created if missing) and fsync it, and the directory when the file is new, so the
    record is on disk when this returns. Only the last record can be torn by a kill: readers must expect that."""
    path = Path(path)
    created = not path.exists()
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if created:
        fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, content: Content) -> None:
    """Write `path` so that it is either absent, its old content or complete: temporary sibling, fsync, rename,
    fsync of the directory. A failure leaves no temporary file behind."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        write_synced(tmp, content)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_safetensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file` by path, then fsync. I/O failures surface as `OSError` (safetensors reports
    them as its own error type, "... os error 28"), so a full disk is handled like any other write failure."""
    import re

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        message = str(e)
        if "I/O error" in message or "os error" in message:
            code = re.search(r"os error (\d+)", message)
            raise OSError(int(code.group(1)) if code else errno.EIO, message, str(path)) from e
        raise
    fsync_file(path)


def atomic_write_safetensors(
    path: str | Path, tensors: dict, metadata: dict[str, str] | None = None, *, replace: bool = True
) -> None:
    """`atomic_write_bytes` for a safetensors file, written by path (`write_safetensors`) rather than from a bytes
    copy of it. With `replace=False` an existing `path` is never replaced, even one created while this wrote:
    the temporary is hard-linked into place (which fails with `FileExistsError`), then unlinked."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        write_safetensors(tmp, tensors, metadata)
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(directory: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling (not yet created) to fill; when the block succeeds, it takes `directory`'s place
    (`replace_directory`, which fsyncs its contents first). With `replace=False` an existing `directory` raises
    `FileExistsError` instead: checked right before the rename (POSIX has no portable no-replace rename of a
    directory), so only a directory created in that instant could be lost, and the temporary is removed.

    An interrupted or failed write leaves the previous `directory` (if any) untouched and the temporary behind, to
    be cleared by the next attempt. Not for concurrent writers of the same directory: they share the temporary.
    """
    directory = Path(directory)
    tmp = directory.with_name(f"{TMP_PREFIX}{directory.name}")
    remove_tree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    yield tmp
    if not replace and (directory.exists() or directory.is_symlink()):
        remove_tree(tmp)
        raise FileExistsError(errno.EEXIST, "File exists", str(directory))
    replace_directory(tmp, directory)


def replace_directory(tmp: Path, final: Path) -> None:
    """Make the complete directory `tmp` durable and rename it to `final`: every file and directory in `tmp` is
    fsynced first, and the parent directory after the rename.

    An existing `final` is moved aside (`.old-<name>`) first and deleted only after the new one is in place; if the
    rename fails (or is interrupted) it is put back. So an interruption never loses both: at worst `final` is missing
    and `.old-<name>` holds the previous version (callers that care, like the checkpoint code, put it back on their
    next run). `tmp` is left to the caller on failure.
    """
    fsync_tree(tmp)
    aside = None
    if final.exists():
        aside = final.with_name(f"{OLD_PREFIX}{final.name}")
        remove_tree(aside)
        os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except BaseException:
        if aside is not None:
            os.rename(aside, final)
        raise
    fsync_dir(final.parent)
    if aside is not None:
        remove_tree(aside)


def remove_tree(path: Path) -> None:
    """Best-effort removal of our own scratch directory; a failure must not hide the error being reported, so it
    only warns (the next attempt retries)."""
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():
            log.warning("could not remove %s; delete it by hand (the next attempt also retries)", path)


def fsync_file(path: str | Path) -> None:
    """Flush a file's data to disk, however it was written (e.g. by safetensors' Rust writer): an fsync through a
    fresh descriptor flushes the inode's dirty pages, and delayed-allocation filesystems report a full disk only
    here."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make created/renamed entries in `path` durable. Filesystems that cannot fsync directories are tolerated."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM):
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root`, and `root` itself (directories after their entries)."""
    for directory, _, names in os.walk(root, topdown=False):
        for name in names:
            fsync_file(os.path.join(directory, name))
        fsync_dir(directory)


def os_reason(error: OSError) -> str:
    """An `OSError` for a message: "No space left on device (/path)" rather than "[Errno 28] ...: '/path'"."""
    reason = error.strerror or str(error)
    return f"{reason} ({error.filename})" if error.filename else reason


def sha256_file(path: str | Path, offset: int = 0) -> str:
    """Hex sha256 of a file's bytes from `offset` on (e.g. a safetensors file's data after its header)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def a1111_model_hash(path: str | Path) -> str:
    """A1111's old 8-digit model hash, how its ControlNet extension titles a model ('NAME [hash]'): the sha256 of
    the 64 KiB at offset 1 MiB (modules/sd_models.py `model_hash`; nothing there: the hash of no bytes)."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
