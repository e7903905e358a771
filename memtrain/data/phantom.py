"""Synthetic thorax radiographs, generated deterministically from (seed, index) at any size.

No files are involved: the anatomy is drawn from a random generator seeded by
``(seed, index)`` in normalised coordinates, so the same phantom at 512 px and at
4096 px is the same animal at two resolutions. The physics is simple but real:

* **anatomy** — a body outline (perturbed ellipse), two lungs cut by a diaphragm dome,
  a heart, a spine of vertebrae, rib pairs (hollow cylinders: cortical shell brighter
  than marrow), clavicles and a textured lung parenchyma;
* **Beer–Lambert attenuation** — each tissue contributes ``mu * thickness`` to the
  line integral, ``primary = exp(-sum(mu_i * t_i))`` with soft tissue, lung and bone
  coefficients of a ~50 keV beam;
* **scatter haze** — a broad, low-frequency scatter field proportional to the
  primary under the body (scatter-to-primary ratio drawn per image), which is what
  flattens contrast in real radiographs;
* **anode heel effect** — a gentle exposure gradient along one axis;
* **quantum noise** — Poisson photon counts;
* **12-bit detector** — the log-converted signal quantised to 0..4095.

The input is that 12-bit image scaled to [0, 1]. The target is its conventional
contrast enhancement (:func:`memtrain.data.enhance.conventional_enhance`, CLAHE plus
unsharp masking), as the paper's references came from conventional algorithms.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# Linear attenuation coefficients (1/cm) at ~50 keV effective energy.
MU_SOFT = 0.22
MU_LUNG = 0.06
MU_BONE = 0.80
DETECTOR_BITS = 12
DETECTOR_MAX = 2**DETECTOR_BITS - 1
# Line integral mapped to the full detector range after log conversion.
LOG_RANGE = 6.0


def phantom_radiograph(seed: int, index: int, size: int) -> np.ndarray:
    """The raw radiograph (float32, [0, 1], 12-bit quantised) of phantom ``index`` at ``size``².

    Bones are bright, air is dark (log-converted, display convention).
    """
    geo_seq, noise_seq = np.random.SeedSequence([int(seed), int(index)]).spawn(2)
    geo = np.random.default_rng(geo_seq)
    noise = np.random.default_rng(noise_seq)

    u = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0  # x, left to right
    grid = _Grid(u)
    t_body, t_lung, t_bone = (np.zeros((size, size), np.float32) for _ in range(3))

    # --- body outline: a perturbed ellipsoid seen from the front -----------------------
    depth = geo.uniform(9.0, 15.0)  # cm through the thickest part
    cx, cy = geo.normal(0.0, 0.03), geo.normal(0.05, 0.03)
    ax, ay = geo.uniform(0.62, 0.80), geo.uniform(0.78, 0.95)
    angle = geo.normal(0.0, 0.08)
    harmonics = [(k, geo.normal(0, 0.025), geo.uniform(0, 2 * np.pi)) for k in range(2, 6)]
    rho2, theta = grid.polar(cx, cy, ax, ay, angle, bbox=None)
    radius = 1.0 + sum(c * np.cos(k * theta + ph) for k, c, ph in harmonics)
    inside = np.clip(1.0 - rho2 / radius**2, 0.0, None)
    t_body += depth * np.sqrt(inside)
    body_weight = np.sqrt(inside)

    # --- lungs (above a diaphragm dome), heart between them -----------------------------
    dome_y = cy + geo.uniform(0.18, 0.30)
    dome_curv = geo.uniform(0.4, 0.8)
    lung_depth = depth * geo.uniform(0.55, 0.75)
    lung_t = np.zeros_like(t_lung)
    for side in (-1.0, 1.0):
        lx = cx + side * geo.uniform(0.24, 0.30) * ax / 0.7
        ly = cy - geo.uniform(0.08, 0.15)
        grid.add_ellipsoid(lung_t, lx, ly, geo.uniform(0.19, 0.25), geo.uniform(0.40, 0.50), side * geo.uniform(0.05, 0.2), lung_depth)
    below_dome = grid.y[:, None] > (dome_y - dome_curv * (grid.x[None, :] - cx) ** 2)
    lung_t[below_dome] = 0.0
    heart = np.zeros_like(t_lung)
    grid.add_ellipsoid(
        heart, cx + geo.normal(0.06, 0.02), dome_y - 0.12, geo.uniform(0.17, 0.23), geo.uniform(0.17, 0.23), geo.normal(0.3, 0.1), lung_depth * 1.1
    )
    # Lung parenchyma: vessels and bronchi as smooth density texture (generated at a
    # fixed resolution so it is the same anatomy at every size).
    texture = ndimage.gaussian_filter(geo.normal(0.0, 1.0, (96, 96)).astype(np.float32), 1.2)
    texture = _upsample(texture / (texture.std() + 1e-6), size)
    t_lung += np.clip(lung_t - heart, 0.0, None) * (1.0 - 0.12 * texture)
    t_lung = np.minimum(t_lung, t_body)

    # --- spine: a column of vertebrae with discs between them ----------------------------
    spine_x = cx + geo.normal(0.0, 0.015)
    spine_bend = geo.normal(0.0, 0.03)
    vert_h = geo.uniform(0.085, 0.11)
    y = -1.05
    while y < 1.05:
        xv = spine_x + spine_bend * y**2
        grid.add_superellipse(t_bone, xv, y + vert_h / 2, 0.055, vert_h / 2 * 0.82, 2.5 * geo.uniform(0.9, 1.1), power=4)
        y += vert_h

    # --- ribs: hollow curved bands sweeping out and down from the spine ------------------
    n_ribs = int(geo.integers(7, 10))
    rib_top = cy - 0.62
    rib_gap = geo.uniform(0.085, 0.105)
    for k in range(n_ribs):
        y0 = rib_top + k * rib_gap
        for side in (-1.0, 1.0):
            length = ax * geo.uniform(0.85, 0.98)
            drop = geo.uniform(0.18, 0.30) + 0.02 * k
            width = geo.uniform(0.016, 0.022)
            grid.add_rib(t_bone, spine_x, y0, side, length, drop, width, depth_cm=1.4)
    # --- clavicles ------------------------------------------------------------------------
    for side in (-1.0, 1.0):
        grid.add_rib(t_bone, spine_x + side * 0.05, rib_top - 0.08, side, ax * 0.75, -0.06, 0.02, depth_cm=1.8)
    t_bone *= (t_body > 0).astype(np.float32)

    # --- Beer–Lambert, scatter, heel effect, quantum noise, 12-bit log detector ----------
    line_integral = MU_SOFT * t_body + (MU_LUNG - MU_SOFT) * t_lung + (MU_BONE - MU_SOFT) * t_bone
    primary = np.exp(-line_integral)
    spr = geo.uniform(0.6, 1.6)  # scatter-to-primary ratio under the body
    mean_primary = float((primary * body_weight).sum() / max(body_weight.sum(), 1.0))
    haze = _upsample(ndimage.gaussian_filter(_downsample(body_weight, 64), 6.0), size)
    scatter = spr * mean_primary * haze / max(float(haze.max()), 1e-6)
    heel_dir = geo.uniform(0, 2 * np.pi)
    heel = 1.0 + geo.uniform(0.03, 0.08) * (np.cos(heel_dir) * grid.x[None, :] + np.sin(heel_dir) * grid.y[:, None])
    photons = geo.uniform(1.5e4, 4e4)
    counts = noise.poisson(photons * heel * (primary + scatter)).astype(np.float32)
    signal = -np.log(np.maximum(counts, 1.0) / photons)
    detector = np.clip(np.round(signal / LOG_RANGE * DETECTOR_MAX), 0, DETECTOR_MAX)
    return (detector / DETECTOR_MAX).astype(np.float32)


class _Grid:
    """Pixel-centre coordinates in [-1, 1] plus helpers that draw into bounding boxes."""

    def __init__(self, u: np.ndarray) -> None:
        self.x = u
        self.y = u
        self.n = len(u)

    def _window(self, cx: float, cy: float, half: float):
        lo = lambda c: int(np.clip(np.floor((c - half + 1) / 2 * self.n), 0, self.n))  # noqa: E731
        hi = lambda c: int(np.clip(np.ceil((c + half + 1) / 2 * self.n), 0, self.n))  # noqa: E731
        return slice(lo(cy), hi(cy)), slice(lo(cx), hi(cx))

    def polar(self, cx, cy, ax, ay, angle, bbox):
        xs, ys = self.x[None, :] - cx, self.y[:, None] - cy
        c, s = np.cos(angle), np.sin(angle)
        xr, yr = (c * xs + s * ys) / ax, (-s * xs + c * ys) / ay
        return xr**2 + yr**2, np.arctan2(yr, xr)

    def add_ellipsoid(self, out, cx, cy, ax, ay, angle, depth):
        rows, cols = self._window(cx, cy, max(ax, ay))
        xs, ys = self.x[None, cols] - cx, self.y[rows, None] - cy
        c, s = np.cos(angle), np.sin(angle)
        rho2 = ((c * xs + s * ys) / ax) ** 2 + ((-s * xs + c * ys) / ay) ** 2
        out[rows, cols] += depth * np.sqrt(np.clip(1.0 - rho2, 0.0, None))

    def add_superellipse(self, out, cx, cy, ax, ay, depth, power):
        rows, cols = self._window(cx, cy, max(ax, ay))
        rho = np.abs((self.x[None, cols] - cx) / ax) ** power + np.abs((self.y[rows, None] - cy) / ay) ** power
        out[rows, cols] += depth * np.clip(1.0 - rho, 0.0, None) ** (1.0 / power)

    def add_rib(self, out, x0, y0, side, length, drop, width, depth_cm):
        """A hollow cylinder of radius ``width`` along a curve that rises a little, then falls by ``drop``.

        The curve is y = y0 - 0.15*drop*s + drop*s^2.2 with s = side*(x - x0)/length in [0, 1].
        """
        x_end = x0 + side * length
        rows, cols = self._window((x0 + x_end) / 2, y0 + drop / 2, max(length / 2, abs(drop) / 2) + width * 2)
        xs = self.x[None, cols]
        d = np.clip(side * (xs - x0) / length, 0.0, 1.0)
        centre = y0 - 0.15 * drop * d + drop * d**2.2
        dist = np.abs(self.y[rows, None] - centre) / width
        along = (side * (xs - x0) >= 0) & (side * (xs - x0) <= length)
        outer = np.sqrt(np.clip(1.0 - dist**2, 0.0, None))
        inner = np.sqrt(np.clip(1.0 - (dist / 0.6) ** 2, 0.0, None)) * 0.6
        taper = 1.0 - 0.4 * d  # ribs thin towards the sternum
        out[rows, cols] += depth_cm * width / 0.02 * (outer - 0.7 * inner) * along * taper


def _upsample(img: np.ndarray, size: int) -> np.ndarray:
    zoom = size / img.shape[0]
    return ndimage.zoom(img, zoom, order=1, mode="nearest", grid_mode=True)[:size, :size].astype(np.float32)


def _downsample(img: np.ndarray, size: int) -> np.ndarray:
    step = max(1, img.shape[0] // size)
    return img[::step, ::step].astype(np.float32)
