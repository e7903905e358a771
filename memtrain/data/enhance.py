"""Conventional contrast enhancement: the targets the network learns to reproduce.

CLAHE (contrast-limited adaptive histogram equalisation) followed by unsharp masking,
both from scikit-image, with kernel and radius proportional to the image side so the
same radiograph is enhanced the same way at every resolution.
"""

from __future__ import annotations

import numpy as np
from skimage.exposure import equalize_adapthist
from skimage.filters import unsharp_mask

CLAHE_TILES = 8  # tiles per side
CLAHE_CLIP = 0.012
UNSHARP_RADIUS_FRACTION = 1 / 256  # of the image side
UNSHARP_AMOUNT = 0.8


def conventional_enhance(image: np.ndarray) -> np.ndarray:
    """CLAHE + unsharp mask of a [0, 1] grayscale image; returns float32 in [0, 1]."""
    img = np.asarray(image, dtype=np.float64)
    side = min(img.shape)
    kernel = max(8, side // CLAHE_TILES)
    out = equalize_adapthist(np.clip(img, 0.0, 1.0), kernel_size=kernel, clip_limit=CLAHE_CLIP)
    out = unsharp_mask(out, radius=max(1.0, side * UNSHARP_RADIUS_FRACTION), amount=UNSHARP_AMOUNT)
    return np.clip(out, 0.0, 1.0).astype(np.float32)
