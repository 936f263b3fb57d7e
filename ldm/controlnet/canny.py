"""Canny edge detection as OpenCV's `cv2.Canny(image, low, high)` computes it, in numpy (no OpenCV dependency).

The A1111 ControlNet extension's `canny` preprocessor is `cv2.Canny(rgb, low, high)` on the uint8 RGB image
(scripts/preprocessor/model_free_preprocessors.py, defaults 100 and 200), so these are OpenCV's rules
(modules/imgproc/src/canny.cpp, L1 gradient, aperture 3), step by step:
1. Sobel 3x3 derivatives dx, dy of every channel, the image border replicated;
2. magnitude |dx| + |dy|; of a colour image, at each pixel the channel with the largest one (the first on ties);
3. non-maximum suppression along the gradient direction, quantised to 0, 45, 90 or 135 degrees with OpenCV's
   fixed-point tan(22.5) (TG22 = round(0.41421356 * 2^15)); a pixel must beat the neighbour behind it strictly
   and the one ahead of it or equal (strictly both on the diagonals); outside the image the magnitude is 0;
4. hysteresis: pixels that survive with magnitude > low are edges if 8-connected to one with magnitude > high.
A low threshold above the high one is swapped, as OpenCV does. The output is 0 or 255.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

_SHIFT = 15
_TG22 = int(0.4142135623730950488016887242097 * (1 << _SHIFT) + 0.5)


def canny(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """(H, W) or (H, W, C) uint8 -> (H, W) uint8 edge map, 255 = edge."""
    if image.ndim == 2:
        image = image[..., None]
    low, high = (high, low) if low > high else (low, high)
    low, high = int(np.floor(low)), int(np.floor(high))
    p = np.pad(image.astype(np.int32), ((1, 1), (1, 1), (0, 0)), mode="edge")  # (H+2, W+2, C)
    # Sobel: dx = [-1 0 1] (x) [1 2 1]^T, dy its transpose; (H, W, C)
    dx = (p[:-2, 2:] - p[:-2, :-2]) + 2 * (p[1:-1, 2:] - p[1:-1, :-2]) + (p[2:, 2:] - p[2:, :-2])
    dy = (p[2:, :-2] - p[:-2, :-2]) + 2 * (p[2:, 1:-1] - p[:-2, 1:-1]) + (p[2:, 2:] - p[:-2, 2:])
    mag = np.abs(dx) + np.abs(dy)
    pick = mag.argmax(axis=2)[..., None]  # the first channel of the largest magnitude
    dx, dy, mag = (np.take_along_axis(a, pick, axis=2)[..., 0] for a in (dx, dy, mag))  # (H, W)

    m = np.pad(mag, 1)  # 0 outside the image
    h, w = mag.shape

    def at(di: int, dj: int) -> np.ndarray:  # the neighbour (di, dj) of every pixel
        return m[1 + di:1 + di + h, 1 + dj:1 + dj + w]

    ax, ay = np.abs(dx).astype(np.int64), np.abs(dy).astype(np.int64) << _SHIFT
    tg22 = ax * _TG22
    tg67 = tg22 + (ax << (_SHIFT + 1))
    horizontal, vertical = ay < tg22, ay > tg67
    same_sign = (dx ^ dy) >= 0  # OpenCV: s = (xs ^ ys) < 0 ? -1 : 1
    keep = np.where(horizontal, (mag > at(0, -1)) & (mag >= at(0, 1)),
                    np.where(vertical, (mag > at(-1, 0)) & (mag >= at(1, 0)),
                             np.where(same_sign, (mag > at(-1, -1)) & (mag > at(1, 1)),
                                      (mag > at(-1, 1)) & (mag > at(1, -1)))))
    weak = keep & (mag > low)
    labels, count = ndimage.label(weak, structure=np.ones((3, 3), dtype=bool))
    strong = np.unique(labels[weak & (mag > high)])
    return np.where(np.isin(labels, strong[strong > 0]), 255, 0).astype(np.uint8)
