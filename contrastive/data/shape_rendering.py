"""Rendering of the ``shapes`` scenes: one object on a noisy background, drawn with NumPy.

:func:`render` turns an object's attributes (shape, colour, size, position, texture; see
:mod:`contrastive.data.captioned_shapes`) and a generator into a ``uint8[32, 32, 3]`` image,
vectorised over the object's bounding box.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["IMAGE_SIZE", "render"]

IMAGE_SIZE = 32

_COLOUR_RGB = np.array(
    [
        [0.90, 0.10, 0.10],  # red
        [0.10, 0.80, 0.15],  # green
        [0.15, 0.25, 0.95],  # blue
        [0.95, 0.90, 0.10],  # yellow
        [0.10, 0.85, 0.90],  # cyan
        [0.90, 0.10, 0.85],  # magenta
        [1.00, 0.55, 0.00],  # orange
        [0.95, 0.95, 0.95],  # white
    ],
    np.float32,
)
_RADIUS = (3.5, 5.5, 7.5)  # half-extent in pixels; with +-10 % jitter the classes stay disjoint
_CELL_CENTRE = (8.0, 16.0, 24.0)  # row / column centres of the 3x3 position grid
_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5


def _shape_mask(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of ``shape`` in object coordinates (``u, v`` in radii, v pointing down)."""
    au, av = np.abs(u), np.abs(v)
    if shape == 0:  # circle
        return u * u + v * v <= 1.0
    if shape == 1:  # square
        return np.maximum(au, av) <= 0.85
    if shape == 2:  # triangle, apex up
        return (v <= 0.75) & (au <= 0.55 * (v + 1.0))
    if shape == 3:  # diamond
        return au + av <= 1.0
    if shape == 4:  # cross
        return ((au <= 0.33) & (av <= 1.0)) | ((av <= 0.33) & (au <= 1.0))
    if shape == 5:  # ring
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.5**2)
    if shape == 6:  # hexagon, flat top
        return np.maximum(av, 0.866 * au + 0.5 * av) <= 0.9
    return (u * u + (v / 0.55) ** 2) <= 1.0  # oval, wide


def render(attrs: dict[str, int], rng: np.random.Generator) -> np.ndarray:
    """One scene of the object ``attrs`` with random jitter -> ``uint8[32, 32, 3]``.

    Pixel value: ``grey + alpha * (colour - grey) + noise``, with ``alpha`` 1 on the object's
    lit pixels, 0.3 on the dark half of a stripe/check pattern and 0 on the background, and
    uniform noise of standard deviation 0.04 (uniform: a third of the cost of Gaussian).
    """
    jy, jx, jr, theta, phase, bg, r, g, b = rng.random(9).tolist()
    row, col = divmod(int(attrs["position"]), 3)
    cy = _CELL_CENTRE[row] + 3.0 * (jy - 0.5)
    cx = _CELL_CENTRE[col] + 3.0 * (jx - 0.5)
    radius = _RADIUS[int(attrs["size"])] * (0.9 + 0.2 * jr)
    theta = 0.5 * (theta - 0.5)
    # Python floats, not NumPy float64 scalars: those would promote the float32 grids.
    c, s = math.cos(theta) / radius, math.sin(theta) / radius
    # Only the object's bounding window is rasterised: every shape lies within 1.21 radii
    # of its centre (the rotated square's corner, 0.85 * sqrt(2)).
    ext = 1.21 * radius + 1.0
    y0, y1 = max(0, int(cy - ext)), min(IMAGE_SIZE, int(cy + ext) + 1)
    x0, x1 = max(0, int(cx - ext)), min(IMAGE_SIZE, int(cx + ext) + 1)
    dy, dx = _YY[y0:y1, x0:x1] - cy, _XX[y0:y1, x0:x1] - cx
    u = c * dx + s * dy  # rotated object coordinates, in radii
    v = c * dy - s * dx
    window = _shape_mask(int(attrs["shape"]), u, v).astype(np.float32)
    texture = int(attrs["texture"])
    if texture:  # 2 px bands in object coordinates: stripes (along v) or checks (u and v)
        # +64 keeps the values positive, so that truncation is floor (|px| < 64 on the grid).
        k = (v * (radius / 2.0) + (2.0 * phase + 64.0)).astype(np.int32)
        if texture == 2:
            k += (u * (radius / 2.0) + 64.0).astype(np.int32)
        window *= 1.0 - 0.7 * (k & 1).astype(np.float32)  # the dark half keeps 30 %
    alpha = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 1), np.float32)
    alpha[y0:y1, x0:x1, 0] = window
    grey = 0.05 + 0.25 * bg
    colour = np.clip(_COLOUR_RGB[int(attrs["colour"])] + 0.12 * (np.float32([r, g, b]) - 0.5), 0, 1)
    # 255 * (grey + alpha * (colour - grey) + 0.14 * (noise - 0.5)) + 0.5, in place.
    image = rng.random((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    image *= 0.14 * 255.0
    image += 255.0 * (grey - 0.07) + 0.5
    image += alpha * (255.0 * (colour - grey)).astype(np.float32)
    return np.clip(image, 0.0, 255.0, out=image).astype(np.uint8)
