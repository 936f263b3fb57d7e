"""ldm.pixels: the one pixel <-> tensor convention, bit for bit what diffusers and the older x / 127.5 - 1 give."""

from __future__ import annotations

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from ldm.pixels import float_to_uint8, pil_to_tensor, tensor_to_float_images


def _every_value() -> Image.Image:
    """A 16 x 16 RGB image holding each of the 256 uint8 values once per channel (green and blue permuted)."""
    values = np.arange(256, dtype=np.uint8)
    rgb = np.stack([values, values[::-1], np.roll(values, 77)], axis=-1)  # (256, 3)
    return Image.fromarray(rgb.reshape(16, 16, 3), "RGB")


def test_pil_to_tensor_is_diffusers_preprocess_bit_for_bit() -> None:
    image = _every_value()
    tensor = pil_to_tensor(image)  # (1, 3, 16, 16)
    assert tensor.shape == (1, 3, 16, 16) and tensor.dtype == torch.float32
    assert torch.equal(tensor, VaeImageProcessor(do_resize=False).preprocess(image))
    assert tensor.min() == -1.0 and tensor.max() == 1.0


def test_pil_to_tensor_equals_the_data_pipelines_old_arithmetic() -> None:
    # ldm.data once computed x / 127.5 - 1 from uint8; latent caches written then must stay valid
    image = _every_value()
    old = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).to(torch.float32) / 127.5 - 1.0
    assert torch.equal(pil_to_tensor(image)[0], old)


def test_round_trip_and_diffusers_postprocess() -> None:
    image = _every_value()
    tensor = pil_to_tensor(image)
    floats = tensor_to_float_images(tensor)  # (1, 16, 16, 3) in [0, 1]
    assert floats.shape == (1, 16, 16, 3)
    np.testing.assert_array_equal(float_to_uint8(floats)[0], np.asarray(image))
    expected = VaeImageProcessor().postprocess(tensor, output_type="np")
    np.testing.assert_array_equal(floats, expected)
    assert float_to_uint8(np.array([[[[-0.0, 0.5, 1.0]]]], np.float32)).tolist() == [[[[0, 128, 255]]]]
