"""Bringing an (input, target) pair to the square training size, identically for both."""

from __future__ import annotations

import numpy as np
from skimage.transform import resize


def letterbox(img: np.ndarray, size: int) -> np.ndarray:
    """Scale so the longer side is ``size`` (aspect kept, anti-aliased), then zero-pad to size²."""
    h, w = img.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) != (h, w):
        img = resize(img, (nh, nw), order=1, anti_aliasing=scale < 1, preserve_range=True).astype(np.float32)
    return pad_to(img, size)


def pad_to(img: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad (centred) each side up to ``size``; larger sides are left alone."""
    h, w = img.shape
    ph, pw = max(0, size - h), max(0, size - w)
    if ph == 0 and pw == 0:
        return img
    return np.pad(img, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)))


def crop_window(shape: tuple[int, int], size: int, rng: np.random.Generator | None) -> tuple[slice, slice]:
    """A size² window inside ``shape`` (already padded to at least size): random with ``rng``, else centred."""
    h, w = shape
    if rng is None:
        top, left = (h - size) // 2, (w - size) // 2
    else:
        top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    return slice(top, top + size), slice(left, left + size)


def fit_pair(inp: np.ndarray, tgt: np.ndarray, size: int, mode: str, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    """Apply the same geometry to input and target. ``mode`` is 'resize' or 'crop'."""
    if inp.shape != tgt.shape:
        # Targets made at another resolution are brought to the input's grid first.
        tgt = resize(tgt, inp.shape, order=1, anti_aliasing=True, preserve_range=True).astype(np.float32)
    if mode == "resize":
        return letterbox(inp, size), letterbox(tgt, size)
    if mode == "crop":
        inp, tgt = pad_to(inp, size), pad_to(tgt, size)
        rows, cols = crop_window(inp.shape, size, rng)
        return np.ascontiguousarray(inp[rows, cols]), np.ascontiguousarray(tgt[rows, cols])
    raise ValueError(f"unknown fit mode {mode!r}")
