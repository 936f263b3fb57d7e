"""Where a training crop came from, in the terms of SDXL's micro-conditioning (Podell et al. 2023, section 2.2).

SDXL's U-Net is told, per image, `add_time_ids` = (original_height, original_width, crop_top, crop_left,
target_height, target_width): the image's size as read, where the crop starts in the *resized* image (resized so the
crop fits its short side, or covers the aspect-ratio bucket), and the crop's size. Our transforms resample one box of
source pixels straight to the target size (one antialiased resample, `ldm.data.transforms`), which is "resize, then
crop" in one step; `CropGeometry` records the box and converts it to the resized image's pixel coordinates, the
convention of the SDXL paper, diffusers' train_text_to_image_sdxl.py and kohya's sd-scripts.

A horizontal flip mirrors the crop. The flipped crop is the crop of the mirrored resized image that starts at
W' - left - w (W' the resized width, w the target width), not at w - left: the unmirrored formula (diffusers #6234,
the same in SimpleTuner) tells the model the wrong offset for every flipped image.

Offsets are computed in floats and rounded at the end (Python's `round`, half to even, as diffusers'
`int(round(...))`). When W' - w is whole, crop_left + flipped crop_left = W' - w exactly, except when the box starts
on half a resized pixel and W' - w is odd: then both offsets end in .5 and round the same way, and the sum is off by
one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

Box = tuple[float, float, float, float]  # (left, top, right, bottom) in source pixels, as PIL takes boxes


@dataclass(frozen=True)
class CropGeometry:
    """One crop: which source box became the (target_h, target_w) pixels the model sees, and whether mirrored."""

    original_size: tuple[int, int]  # (h, w) of the decoded image (EXIF rotation applied), before any resize
    box: Box  # the source pixels resampled to target_size; the same aspect ratio as the target
    target_size: tuple[int, int]  # (h, w)
    flipped: bool = False  # the pixels were mirrored left-right after the crop

    @property
    def scale(self) -> float:
        """Resized pixels per source pixel (the box's width becomes the target's width)."""
        return self.target_size[1] / (self.box[2] - self.box[0])

    @property
    def resized_size(self) -> tuple[float, float]:
        """(h, w) of the whole image resized at `scale` (not rounded: the crop never materialises it)."""
        height, width = self.original_size
        return height * self.scale, width * self.scale

    @property
    def crop_top_left(self) -> tuple[int, int]:
        """(top, left) of the crop in the resized image's pixels; of the mirrored resized image when flipped."""
        left, top, right, _ = self.box
        # In source pixels the mirrored box starts at width - right; times the scale that is W' - left' - w.
        start = self.original_size[1] - right if self.flipped else left
        return _round(top * self.scale), _round(start * self.scale)

    def mirrored(self) -> CropGeometry:
        """The same crop of the left-right mirrored image (what a flip of the cropped pixels shows)."""
        return replace(self, flipped=not self.flipped)


def _round(x: float) -> int:
    # the box comes from float arithmetic (e.g. (width - side) / 2 * scale): snap 7.9999999 to 8 before rounding
    return round(round(x, 6))
