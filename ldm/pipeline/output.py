"""Writing PNGs: never overwrite, never leave a partial file, parameters in the A1111 'parameters' chunk."""

from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path

from PIL import Image

from ldm.errors import UserError
from ldm.files import fsync_dir, temp_sibling, write_synced
from ldm.pipeline.metadata import png_info
from ldm.pipeline.request import GenerationRequest

_COUNTER = re.compile(r"^(\d{5,})-")


def check_writable(outdir: str | Path) -> Path:
    """Create `outdir` if needed and prove it takes a file, before any model is loaded or image generated."""
    outdir = Path(outdir)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=outdir, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"output directory '{outdir}' is not writable: {e.strerror or e}") from None
    return outdir


def slug(prompt: str, max_len: int = 48) -> str:
    """'A red car, at night!' -> 'a-red-car-at-night' (file-name safe on every OS)."""
    text = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return text[:max_len].rstrip("-") or "untitled"


def next_counter(outdir: Path) -> int:
    """1 + the highest `NNNNN-` prefix in `outdir` (0 when there is none), as A1111 numbers its outputs."""
    found = [int(m.group(1)) for p in outdir.iterdir() if (m := _COUNTER.match(p.name))]
    return max(found, default=-1) + 1


def save_png(image: Image.Image, params: GenerationRequest, outdir: Path) -> Path:
    """Write `NNNNN-<seed>-<slug>.png` and return its path.

    The PNG is written (and fsynced) under a temporary name in `outdir` and then hard-linked to its final name:
    `link` fails if the name exists (O_EXCL semantics, so a concurrent run or an existing file is never overwritten;
    we take the next counter instead), and the final name only ever points at a complete file. The directory is
    fsynced last, so the new name survives a crash too. (Not `ldm.files.atomic_write_bytes`: its rename would
    replace an existing file.)
    """
    info = png_info(params)
    tmp = temp_sibling(outdir / "image.png")
    try:
        write_synced(tmp, lambda f: image.save(f, format="PNG", pnginfo=info))
        counter = next_counter(outdir)
        while True:
            final = outdir / f"{counter:05d}-{params.seed}-{slug(params.prompt)}.png"
            if _claim(tmp, final):
                fsync_dir(outdir)
                return final
            counter += 1
    finally:
        tmp.unlink(missing_ok=True)


def _claim(tmp: Path, final: Path) -> bool:
    """Give `tmp`'s complete contents the name `final` unless that name exists; False if it does."""
    try:
        os.link(tmp, final)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
    # file systems without hard links: reserve the name with O_EXCL, then move the complete file over it
    try:
        os.close(os.open(final, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    os.replace(tmp, final)
    return True
