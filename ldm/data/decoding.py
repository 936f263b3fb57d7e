"""Fault-tolerant decoding: a `{"bytes", "path"}` record -> an RGB PIL image, or `SkipImage` with a short reason.

Records reach us undecoded (`ldm.data.sources` casts the image column to `datasets.Image(decode=False)`), so *we*
decode them, with `ldm.image_io` (the one rule for a user's image): a corrupt, truncated, empty or oversized file
becomes a reported skip instead of an exception that kills a DataLoader worker.
"""

from __future__ import annotations

from typing import Any

import PIL.Image

from ldm.image_io import ImageError, open_image, open_mask


class SkipImage(Exception):
    """An image we cannot or will not decode; the message is the short reason reported to the user."""


def decode_image(record: dict[str, Any], max_pixels: int) -> PIL.Image.Image:
    """Decode a `{"bytes", "path"}` record into an RGB PIL image (`ldm.image_io.open_image`: the rule the CLI and
    the server follow too), or raise `SkipImage` with a short reason."""
    if record.get("error"):  # the record could not be read at all (a remote shard that went away mid-run)
        raise SkipImage(record["error"])
    data, path = record.get("bytes"), record.get("path")
    if data is None and not path:
        raise SkipImage("record has neither bytes nor path")
    what = f"image '{path}'" if path else "image"
    try:
        if data is not None or not ("://" in path or "::" in path):
            return open_image(data if data is not None else path, what, max_pixels)
        # Images inside archives (an imagefolder of .zip files) have chained fsspec URLs like
        # "zip://a.png::/data/part1.zip"; `datasets`' own opener understands them.
        from datasets.utils.file_utils import xopen

        with xopen(path, "rb") as file:
            return open_image(file, what, max_pixels)
    except ImageError as error:
        raise SkipImage(error.reason) from error
    except Exception as error:  # noqa: BLE001
        # the archive itself cannot be opened: one bad file must not kill training
        raise SkipImage(f"cannot read ({type(error).__name__}: {error})") from error


def decode_mask(path: str, max_pixels: int) -> PIL.Image.Image:
    """A loss mask's file -> an 'L' image (`ldm.image_io.open_mask`: alpha where not opaque, else grey levels), or
    `SkipImage` naming the mask (its image is skipped: training it unmasked would silently train what it hides)."""
    try:
        return open_mask(path, f"mask '{path}'", max_pixels)
    except ImageError as error:
        raise SkipImage(f"its mask: {error.reason}") from error
