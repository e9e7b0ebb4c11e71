"""Top activating validation images per unit, with the unit's binarised activation mask, kept small in the store.

The top k images of unit u are the validation images with the largest maximum of u's activation map (NetDissect's
ranking), read from the activation pass. Only those images are run again to get their maps. Each map is upsampled
(bilinear) to the thumbnail size and binarised at T_u: the dissection threshold (top 0.5% over the concept images)
when the dissection stage ran for this layer, else the same quantile over the validation images' maps. Thumbnails are
the model's centre crop downsized to at most 96 pixels, so the app shows them on a machine without the images.
"""

from __future__ import annotations

import cv2
import numpy as np


STAGE = "topimages"
MAX_THUMB = 96


def top_indices(maxes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Image indices [units, k] by decreasing map maximum (ties: lower index first) and those maxima."""
    order = np.argsort(-maxes, axis=0, kind="stable")[:k].T
    return order, np.take_along_axis(maxes.T, order, axis=1)


def thumbnail(image_chw: np.ndarray, size: int) -> np.ndarray:
    """uint8 [3, S, S] -> [size, size, 3] (area-averaged when shrinking)."""
    rgb = np.ascontiguousarray(image_chw.transpose(1, 2, 0))
    if rgb.shape[0] == size:
        return rgb
    return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
