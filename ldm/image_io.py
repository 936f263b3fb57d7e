"""Decoding a user's image, the one home for it: bytes, a file or base64 text -> an RGB image (or an 'L' mask).

Training data (`ldm.data.decoding`), the CLI's --init-image and --mask (`ldm.pipeline.images`) and the server's
init_images and mask (`decode_base64_image`) all decode here, so one rule holds for all of them:

- the size is read from the file's header and checked against `max_pixels` before any pixel is decoded (a PNG of a
  few kB can unpack to gigapixels); Pillow's own decompression-bomb error is reported the same way;
- EXIF rotation is applied: what a viewer shows is what is used;
- `to_rgb`: transparency is composited onto white and 16-bit or float greyscale is rescaled, where a plain
  `convert("RGB")` would keep whatever colour hides under the alpha channel (often black) or clip 16 bits at 255;
- `to_mask`: a mask with transparency is its alpha channel (opaque = repaint), as A1111 reads an RGBA mask: strokes
  painted on a transparent layer mark what to repaint, whatever colour the transparent pixels hold. A mask without
  transparency (or with an alpha channel that is opaque everywhere) is its grey levels (white = repaint).

Every failure is an `ImageError`, a one-line `UserError` naming `what` ("init image 'cat.png'"); its `reason` is
the short form that training's report of skipped images shows ("truncated file (...)").
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
import PIL.Image
import PIL.ImageOps

from ldm.errors import UserError

# The default limit on width x height: training's data.max_image_pixels, and the CLI's init image and mask.
MAX_PIXELS = 64_000_000

Source = bytes | bytearray | memoryview | str | os.PathLike | BinaryIO  # a file's bytes, its path, or the open file


class ImageError(UserError):
    """An image that cannot or will not be decoded. `str()` is the one-line message naming the image; `reason` is
    the short reason alone, `kind` its class: "missing", "not a file", "empty" (0 bytes), "too large" (over
    `max_pixels`), "bomb" (over Pillow's own limit), "unrecognised", "truncated" or "broken"; `detail` is the
    decoder's own words where it had any, else `reason`."""

    def __init__(self, message: str, reason: str, kind: str, detail: str = "") -> None:
        super().__init__(message)
        self.reason, self.kind, self.detail = reason, kind, detail or reason


def open_image(source: Source, what: str, max_pixels: int = MAX_PIXELS) -> PIL.Image.Image:
    """Bytes, a path or an open binary file -> an RGB image: size checked before decoding, EXIF rotation applied,
    transparency composited onto white (`to_rgb`). Raises `ImageError` naming `what`."""
    return to_rgb(_decode(source, what, max_pixels))


def open_mask(source: Source, what: str, max_pixels: int = MAX_PIXELS) -> PIL.Image.Image:
    """Like `open_image`, but an 'L' mask, white = repaint (`to_mask`)."""
    return to_mask(_decode(source, what, max_pixels))


def decode_base64_image(data: str, what: str, max_pixels: int) -> PIL.Image.Image:
    """A base64 image (with or without a 'data:image/...;base64,' prefix) -> RGB, as `open_image`, with the server's
    messages: "{what} is not valid base64", "... is base64 but not an image ...", "... is WxH, over the limit of N
    pixels", "... is not an image PIL can read: ..."."""
    return to_rgb(_decode_base64(data, what, max_pixels))


def decode_base64_mask(data: str, what: str, max_pixels: int) -> PIL.Image.Image:
    """`decode_base64_image` for a mask: an 'L' image, white = repaint (`to_mask`)."""
    return to_mask(_decode_base64(data, what, max_pixels))


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Plain `convert("RGB")` is wrong for two common cases: 16/32-bit grayscale ("I;16", "I") is clipped at 255 (an
    almost white image), and transparent pixels take whatever colour hides under the alpha (often black). We rescale
    high-bit-depth data and composite transparency onto white.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        # 16-bit PNG/TIFF grayscale; "I" is how Pillow often opens them. Map 0..65535 to 0..255.
        array = np.asarray(image, dtype=np.float64) / 257.0
        return PIL.Image.fromarray(np.clip(array + 0.5, 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        array = np.asarray(image, dtype=np.float64)
        return PIL.Image.fromarray(np.clip(array + 0.5, 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, P, CMYK, YCbCr, LAB, HSV, 1, ...


def to_mask(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL mode -> an 'L' mask, white = repaint: the alpha channel where it is not opaque everywhere (opaque =
    repaint), otherwise the grey levels of `to_rgb(image)`."""
    if _has_alpha(image):
        alpha = image.convert("RGBA").getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha
    if image.mode == "L":
        return image
    return to_rgb(image).convert("L")


def _has_alpha(image: PIL.Image.Image) -> bool:
    mode = image.mode
    return mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info)


def _decode(source: Source, what: str, max_pixels: int) -> PIL.Image.Image:
    """The image in its own mode, EXIF rotation applied, or `ImageError`."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise _empty(what)
        return _load(io.BytesIO(source), what, max_pixels)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            if path.exists():
                raise ImageError(f"{what} is not a file", "not a file", "not a file")
            raise ImageError(f"{what} does not exist", "file not found", "missing")
        try:
            if path.stat().st_size == 0:
                raise _empty(what)
            with open(path, "rb") as file:
                return _load(file, what, max_pixels)
        except ImageError:
            raise
        except OSError as error:
            raise _failure(error, what) from error
    return _load(source, what, max_pixels)


def _load(file: BinaryIO, what: str, max_pixels: int) -> PIL.Image.Image:
    try:
        with warnings.catch_warnings():
            # Pillow warns above its global MAX_IMAGE_PIXELS; we enforce our own limit below instead.
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            image = PIL.Image.open(file)
            # open() only parsed the header: refuse oversized images before allocating their pixels.
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(f"{what} is {width}x{height}, over the limit of {max_pixels} pixels",
                                 f"too large ({width}x{height} = {width * height} pixels > max_pixels={max_pixels})",
                                 "too large")
            if width == 0 or height == 0:
                raise ImageError(f"cannot read {what}: it is empty ({width}x{height})",
                                 f"empty image ({width}x{height})", "broken")
            image.load()  # decode now, inside this try, while the file is still open
            return PIL.ImageOps.exif_transpose(image)
    except ImageError:
        raise
    except Exception as error:  # noqa: BLE001
        # Beyond OSError, Pillow's format plugins raise a zoo of exceptions on malformed input (SyntaxError for
        # broken PNG chunks, ValueError, EOFError, struct.error, zlib.error, IndexError ...): all are a bad image.
        raise _failure(error, what) from error


def _failure(error: Exception, what: str) -> ImageError:
    """The `ImageError` for an exception raised while reading or decoding."""
    if isinstance(error, PIL.Image.DecompressionBombError):
        return ImageError(f"cannot read {what}: it is too large to decode safely ({error})",
                          f"too large (decompression bomb): {error}", "bomb", str(error))
    if isinstance(error, PIL.UnidentifiedImageError):
        return ImageError(f"cannot read {what}: not an image (unrecognised format)",
                          "not an image (unrecognised format)", "unrecognised", str(error))
    if isinstance(error, OSError):
        if "truncat" in str(error).lower():  # Pillow says "image file is truncated" or "Truncated File Read"
            return ImageError(f"cannot read {what}: truncated file ({error})", f"truncated file ({error})",
                              "truncated", str(error))
        return ImageError(f"cannot read {what}: {type(error).__name__}: {error}",
                          f"cannot read ({type(error).__name__}: {error})", "broken", str(error))
    return ImageError(f"cannot read {what}: cannot decode it ({type(error).__name__}: {error})",
                      f"cannot decode ({type(error).__name__}: {error})", "broken", str(error))


def _empty(what: str) -> ImageError:
    return ImageError(f"cannot read {what}: empty file (0 bytes)", "empty file (0 bytes)", "empty")


def _decode_base64(data: str, what: str, max_pixels: int) -> PIL.Image.Image:
    if data.startswith("data:") and "," in data:
        data = data.split(",", 1)[1]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise UserError(f"{what} is not valid base64") from None
    try:
        return _decode(raw, what, max_pixels)
    except ImageError as error:
        if error.kind == "too large":  # the server's own limit, worded as the server always did
            raise
        if error.kind in ("unrecognised", "empty"):
            raise ImageError(f"{what} is base64 but not an image (send a PNG, JPEG or WebP file)", error.reason,
                             error.kind, error.detail) from None
        raise ImageError(f"{what} is not an image PIL can read: {error.detail}", error.reason, error.kind,
                         error.detail) from None
