"""Fault-tolerant decoding: a `{"bytes", "path"}` record -> an RGB PIL image, or `SkipImage` with a short reason.

Records reach us undecoded (`ldm.data.sources` casts the image column to `datasets.Image(decode=False)`), so *we*
decode them here: a corrupt, truncated, empty or oversized file becomes a reported skip instead of an exception that
kills a DataLoader worker.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from typing import Any, Iterator

import PIL.Image
import PIL.ImageOps

from ldm.data.transforms import to_rgb


class SkipImage(Exception):
    """An image we cannot or will not decode; the message is the short reason reported to the user."""


def decode_image(record: dict[str, Any], max_pixels: int) -> PIL.Image.Image:
    """Decode a `{"bytes", "path"}` record into an RGB PIL image, or raise `SkipImage` with a short reason."""
    data, path = record.get("bytes"), record.get("path")
    if data is None and not path:
        raise SkipImage("record has neither bytes nor path")
    try:
        if data is not None:
            if len(data) == 0:
                raise SkipImage("empty file (0 bytes)")
            image = _open_and_load(io.BytesIO(data), max_pixels)
        else:
            with _open_path(path) as file:
                image = _open_and_load(file, max_pixels)
        return to_rgb(image)
    except SkipImage:
        raise
    except PIL.Image.DecompressionBombError as error:
        raise SkipImage(f"too large (decompression bomb): {error}") from error
    except PIL.UnidentifiedImageError as error:
        raise SkipImage("not an image (unrecognised format)") from error
    except OSError as error:
        if "truncat" in str(error).lower():  # Pillow says "image file is truncated" or "Truncated File Read"
            raise SkipImage(f"truncated file ({error})") from error
        raise SkipImage(f"cannot read ({type(error).__name__}: {error})") from error
    except Exception as error:  # noqa: BLE001
        # Beyond OSError, Pillow's format plugins raise a zoo of exceptions on malformed input (SyntaxError for
        # broken PNG chunks, ValueError, EOFError, struct.error, zlib.error, IndexError ...). Whatever it is, one
        # bad file must not kill training: report it and move on.
        raise SkipImage(f"cannot decode ({type(error).__name__}: {error})") from error


@contextlib.contextmanager
def _open_path(path: str) -> Iterator[Any]:
    if "://" in path or "::" in path:
        # Images inside archives (an imagefolder of .zip files) have chained fsspec URLs like
        # "zip://a.png::/data/part1.zip"; `datasets`' own opener understands them.
        from datasets.utils.file_utils import xopen

        with xopen(path, "rb") as file:
            yield file
        return
    if not os.path.isfile(path):
        raise SkipImage("file not found")
    if os.path.getsize(path) == 0:
        raise SkipImage("empty file (0 bytes)")
    with open(path, "rb") as file:
        yield file


def _open_and_load(file: Any, max_pixels: int) -> PIL.Image.Image:
    with warnings.catch_warnings():
        # Pillow warns above its global MAX_IMAGE_PIXELS; we enforce our own per-dataset limit below instead.
        warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
        image = PIL.Image.open(file)
        # open() only parsed the header: reject oversized images before allocating their pixels.
        width, height = image.size
        if width * height > max_pixels:
            raise SkipImage(f"too large ({width}x{height} = {width * height} pixels > max_pixels={max_pixels})")
        if width == 0 or height == 0:
            raise SkipImage(f"empty image ({width}x{height})")
        image.load()  # decode now, inside our try/except, while the file is still open
        # Phone photos store rotation in EXIF; apply it like `datasets` would have.
        return PIL.ImageOps.exif_transpose(image)
