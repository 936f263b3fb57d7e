"""ldm.image_io, the one decoder of a user's image: training, the CLI and the server get the same pixels, the same
limit (checked before decoding) and one-line messages naming the image."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import PIL.Image
import PIL.ImageFile
import pytest

from ldm.data.config import DataConfig
from ldm.data.decoding import SkipImage, decode_image
from ldm.errors import UserError
from ldm.image_io import (
    MAX_PIXELS, ImageError, decode_base64_image, decode_base64_mask, open_image, open_mask, to_mask, to_rgb,
)
from ldm.pipeline.images import load_image, load_mask


def png(image: PIL.Image.Image, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", **kwargs)
    return out.getvalue()


def random_rgba(width: int = 23, height: int = 17, seed: int = 0) -> PIL.Image.Image:
    array = np.random.default_rng(seed).integers(0, 256, size=(height, width, 4), dtype=np.uint8)
    return PIL.Image.fromarray(array, "RGBA")


# -------------------------------------------------------------------------------------------- the RGBA rule

def test_transparency_is_composited_onto_white_as_training_always_did():
    # pixels and results recorded from training's decoder before it moved here (ldm/data/transforms.py to_rgb)
    pixels = [(200, 100, 50, 128), (0, 0, 0, 0), (10, 20, 30, 255), (255, 0, 0, 1), (0, 255, 0, 254)]
    recorded = [(227, 177, 152), (255, 255, 255), (10, 20, 30), (255, 254, 254), (1, 255, 1)]
    image = PIL.Image.fromarray(np.array([pixels], dtype=np.uint8), "RGBA")
    assert np.asarray(to_rgb(image)).tolist() == [[list(p) for p in recorded]]
    # and on many pixels, "over white": c * a + 255 * (1 - a), a = alpha / 255, to within rounding
    rgba = np.asarray(random_rgba(64, 64)).astype(np.float64)
    a = rgba[..., 3:] / 255
    over_white = rgba[..., :3] * a + 255 * (1 - a)
    assert np.abs(np.asarray(to_rgb(PIL.Image.fromarray(rgba.astype(np.uint8), "RGBA"))) - over_white).max() <= 0.5


def test_training_the_cli_and_the_server_decode_the_same_pixels(tmp_path):
    image = random_rgba()
    exif = image.getexif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees clockwise to view
    data = png(image, exif=exif)
    (tmp_path / "a.png").write_bytes(data)
    expected = np.asarray(to_rgb(image.transpose(PIL.Image.Transpose.ROTATE_270)))  # (23, 17, 3): rotated
    assert expected.shape == (23, 17, 3)
    decoded = [
        decode_image({"bytes": data, "path": None}, max_pixels=10_000),  # training, from bytes
        decode_image({"bytes": None, "path": str(tmp_path / "a.png")}, max_pixels=10_000),  # training, from a file
        load_image(tmp_path / "a.png"),  # the CLI's --init-image
        decode_base64_image(base64.b64encode(data).decode(), "init_images[0]", 10_000),  # the server
        open_image(io.BytesIO(data), "image"),  # an open file
    ]
    for result in decoded:
        assert result.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(result), expected)


# ------------------------------------------------------------------------------------------ the pixel limit

@pytest.fixture
def decodes(monkeypatch) -> list[tuple[int, int]]:
    """The sizes of the images whose pixels were decoded."""
    seen: list[tuple[int, int]] = []
    real = PIL.ImageFile.ImageFile.load

    def load(self):
        seen.append(self.size)
        return real(self)

    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", load)
    return seen


def test_a_too_large_image_is_refused_before_its_pixels_are_decoded(tmp_path, decodes):
    data = png(PIL.Image.new("L", (3000, 3000)))  # 30 kB of PNG, 9 Mpx decoded
    (tmp_path / "big.png").write_bytes(data)
    with pytest.raises(ImageError, match=r"^init image '.*big\.png' is 3000x3000, over the limit of 1000000 pixels$"):
        open_image(tmp_path / "big.png", f"init image '{tmp_path / 'big.png'}'", max_pixels=1_000_000)
    with pytest.raises(SkipImage, match=r"^too large \(3000x3000 = 9000000 pixels > max_pixels=1000000\)$"):
        decode_image({"bytes": data, "path": None}, max_pixels=1_000_000)
    with pytest.raises(UserError, match=r"^mask is 3000x3000, over the limit of 4000000 pixels$"):
        decode_base64_mask(base64.b64encode(data).decode(), "mask", 4_000_000)
    assert decodes == []
    # the test can fail: within the limit the same file is decoded
    assert open_image(data, "image", max_pixels=9_000_000).size == (3000, 3000)
    assert decodes and set(decodes) == {(3000, 3000)}


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` pixels and holds none: only its header can be read."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_the_cli_has_the_training_default_limit(tmp_path):
    (tmp_path / "init.png").write_bytes(png_header_only(8001, 8000))  # 64,008,000 pixels
    with pytest.raises(UserError, match=r"^init image '.*init\.png' is 8001x8000, over the limit of 64000000 pixels$"):
        load_image(tmp_path / "init.png")
    assert MAX_PIXELS == DataConfig().max_image_pixels == 64_000_000
    (tmp_path / "init.png").write_bytes(png_header_only(8000, 8000))  # at the limit: decoded (and found empty)
    with pytest.raises(UserError, match=r"^cannot read init image '.*init\.png': OSError: cannot load this image$"):
        load_image(tmp_path / "init.png")


def test_pillows_decompression_bomb_error_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 10)  # Pillow raises above 2x this, whatever our limit
    data = png(PIL.Image.new("RGB", (5, 5)))
    with pytest.raises(ImageError, match=r"^cannot read init image 'b\.png': it is too large to decode safely \(") as e:
        open_image(data, "init image 'b.png'")
    assert e.value.kind == "bomb" and "\n" not in str(e.value)
    with pytest.raises(SkipImage, match=r"^too large \(decompression bomb\): "):
        decode_image({"bytes": data, "path": None}, max_pixels=10**9)


# ------------------------------------------------------------------------------------------------- messages

def test_the_clis_messages_name_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text.png").write_text("this is not an image\n")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "cut.png").write_bytes(png(random_rgba(64, 64))[:300])
    (tmp_path / "folder.png").mkdir()
    cases = [
        (lambda: load_image("nope.png"), "init image 'nope.png' does not exist"),
        (lambda: load_mask("nope.png"), "mask 'nope.png' does not exist"),
        (lambda: load_image("folder.png"), "init image 'folder.png' is not a file"),
        (lambda: load_image("empty.png"), "cannot read init image 'empty.png': empty file (0 bytes)"),
        (lambda: load_image("text.png"), "cannot read init image 'text.png': not an image (unrecognised format)"),
        (lambda: load_mask("text.png"), "cannot read mask 'text.png': not an image (unrecognised format)"),
        (lambda: load_image("cut.png"), "cannot read init image 'cut.png': truncated file (image file is truncated)"),
    ]
    for call, message in cases:
        with pytest.raises(UserError) as e:
            call()
        assert str(e.value) == message


def test_training_keeps_its_short_reasons(tmp_path):
    (tmp_path / "text.png").write_text("this is not an image\n")
    cut = png(random_rgba(64, 64))[:300]
    cases = [
        ({"bytes": b"", "path": "e.png"}, "empty file (0 bytes)"),
        ({"bytes": b"not an image", "path": None}, "not an image (unrecognised format)"),
        ({"bytes": cut, "path": None}, "truncated file (image file is truncated)"),
        ({"bytes": None, "path": str(tmp_path / "gone.png")}, "file not found"),
        ({"bytes": None, "path": str(tmp_path / "text.png")}, "not an image (unrecognised format)"),
        ({"bytes": None, "path": None}, "record has neither bytes nor path"),
    ]
    for record, reason in cases:
        with pytest.raises(SkipImage) as e:
            decode_image(record, max_pixels=10_000)
        assert str(e.value) == reason


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_base64_images_keep_the_servers_messages():
    good = png(random_rgba())
    cases = [
        ("aGVsbG8=", "init_images[0] is base64 but not an image (send a PNG, JPEG or WebP file)"),
        ("", "init_images[0] is base64 but not an image (send a PNG, JPEG or WebP file)"),
        ("%%% not base64", "init_images[0] is not valid base64"),
        (b64(png(PIL.Image.new("L", (3000, 3000)))), "init_images[0] is 3000x3000, over the limit of 4194304 pixels"),
        (b64(good[:300]), "init_images[0] is not an image PIL can read: image file is truncated"),
    ]
    for data, message in cases:
        with pytest.raises(UserError) as e:
            decode_base64_image(data, "init_images[0]", 4 * 1024 * 1024)
        assert str(e.value) == message
    plain = decode_base64_image(b64(good), "init_images[0]", 4096)
    prefixed = decode_base64_image("data:image/png;base64," + b64(good), "init_images[0]", 4096)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(prefixed))
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(to_rgb(random_rgba())))


# ---------------------------------------------------------------------------------------------------- masks

def test_a_mask_with_transparency_is_its_alpha_channel(tmp_path):
    # white strokes painted on a transparent layer whose hidden colour is white too (as some editors save it):
    # dropping the alpha would repaint everything, compositing onto white likewise; the alpha says what to repaint
    strokes = np.zeros((8, 8, 4), dtype=np.uint8)
    strokes[..., :3] = 255
    strokes[2:5, 3:6, 3] = 255
    mask = to_mask(PIL.Image.fromarray(strokes, "RGBA"))
    assert mask.mode == "L" and np.array_equal(np.asarray(mask), strokes[..., 3])
    (tmp_path / "m.png").write_bytes(png(PIL.Image.fromarray(strokes, "RGBA")))
    assert np.array_equal(np.asarray(load_mask(tmp_path / "m.png")), strokes[..., 3])
    assert np.array_equal(np.asarray(decode_base64_mask(b64(png(PIL.Image.fromarray(strokes, "RGBA"))), "mask",
                                                        100)), strokes[..., 3])
    la = PIL.Image.fromarray(strokes[..., [0, 3]].copy(), "LA")
    assert np.array_equal(np.asarray(to_mask(la)), strokes[..., 3])


def test_a_mask_without_transparency_is_its_grey_levels():
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    L = PIL.Image.fromarray(grey, "L")
    assert np.array_equal(np.asarray(to_mask(L)), grey)
    assert np.array_equal(np.asarray(to_mask(L.convert("RGB"))), grey)
    assert np.array_equal(np.asarray(to_mask(L.convert("RGBA"))), grey)  # opaque everywhere: the colours count
    assert np.array_equal(np.asarray(open_mask(png(L), "mask")), grey)


def test_every_message_is_one_line(tmp_path):
    for data in (b"\x89PNG\r\n\x1a\n broken", png(random_rgba())[:100], b"GIF89a" + b"\0" * 20):
        with pytest.raises(ImageError) as e:
            open_image(data, "init image 'x'")
        assert "\n" not in str(e.value) and str(e.value).startswith("cannot read init image 'x': ")
