"""ComfyUI's `POST /upload/image` and `/upload/mask`: a multipart form (an `image` file; `overwrite`, `subfolder`,
`type`; for a mask, `original_ref`, the JSON {filename, subfolder, type} of the image it masks) -> a file in the
input folder, answered `{"name", "subfolder", "type"}` as ComfyUI's server.py does.

Each upload is decoded first (`ldm.image_io.open_image`: size checked before decoding), so only images are kept.
A mask upload is stored as ComfyUI stores it: the original image with the mask's alpha as its alpha channel.
The form is parsed with the standard library's email parser (the body is already bounded by the server's limit).
"""

from __future__ import annotations

import email.parser
import email.policy
import io
import json
from pathlib import Path

from PIL import Image

from ldm.errors import UserError
from ldm.image_io import open_image
from ldm.serve.comfy.state import FOLDERS, State


def parse_form(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """multipart/form-data -> {field: (filename or None, bytes)}."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise UserError("the upload must be multipart/form-data with an 'image' file")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


def save_upload(content_type: str, body: bytes, state: State, max_pixels: int, mask: bool) -> tuple[int, object]:
    """(200, {name, subfolder, type}) or (400, a one-line reason)."""
    try:
        fields = parse_form(content_type, body)
        if "image" not in fields or not fields["image"][0]:
            raise UserError("the form has no 'image' file")
        filename, data = fields["image"]
        text = {k: v[1].decode("utf-8", "replace") for k, v in fields.items() if v[0] is None}
        kind = text.get("type", "input") or "input"
        subfolder = text.get("subfolder", "")
        if kind not in FOLDERS:
            raise UserError(f"type must be one of {', '.join(FOLDERS)}, got '{kind}'")
        name = Path(filename).name
        if not name or name.startswith(".") or ".." in Path(subfolder).parts or Path(subfolder).is_absolute():
            raise UserError("the file name and subfolder must stay inside the input folder")
        open_image(data, f"upload '{name}'", max_pixels)  # an image, within the size limit
        if mask:
            data = _masked_original(state, text.get("original_ref", ""), data, max_pixels)
        folder = state.folder(kind) / subfolder
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        if text.get("overwrite", "").lower() not in ("true", "1"):
            stem, suffix, i = path.stem, path.suffix, 1
            while path.exists() and path.read_bytes() != data:
                path = folder / f"{stem} ({i}){suffix}"
                i += 1
        path.write_bytes(data)
        return 200, {"name": path.name, "subfolder": subfolder, "type": kind}
    except UserError as e:
        return 400, str(e).splitlines()[0]


def _masked_original(state: State, ref_text: str, mask_data: bytes, max_pixels: int) -> bytes:
    try:
        ref = json.loads(ref_text)
        kind, sub, name = ref.get("type", "input"), ref.get("subfolder", ""), ref["filename"]
    except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
        raise UserError("original_ref must be the JSON {filename, subfolder, type} of an uploaded image") from None
    root = state.folder(kind if kind in FOLDERS else "input").resolve()
    path = (root / str(sub) / str(name)).resolve()
    if root not in path.parents or not path.is_file():
        raise UserError(f"original_ref '{name}' is not an uploaded image")
    open_image(path, f"original '{name}'", max_pixels)
    with Image.open(path) as original, Image.open(io.BytesIO(mask_data)) as mask:
        out = original.convert("RGBA")
        alpha = mask.convert("RGBA").getchannel("A").resize(out.size)
        out.putalpha(alpha)
    buffer = io.BytesIO()
    out.save(buffer, format="PNG")
    return buffer.getvalue()
