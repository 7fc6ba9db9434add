"""SimCLR-style image augmentations in NumPy (Chen et al. 2020, arXiv 2002.05709, App. A).

Everything here runs inside grain worker code on the host, one image at a time, and takes an
explicit ``np.random.Generator`` so that a view is a pure function of (seed, example index).
Images are float32 ``[H, W, C]`` in ``[0, 1]`` with ``C`` = 1 (grey) or 3 (RGB).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """What the two views of an image go through.

    The defaults are SimCLR's ImageNet recipe, except the crop scale, which is kept higher
    because our images are small (8-96 pixels): a 8 % crop of a 32x32 image is a few pixels.
    """

    image_size: int = 32
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_prob: float = 0.2


def resize_bilinear(
    image: np.ndarray, size: int, box: tuple[float, float, float, float] | None = None
) -> np.ndarray:
    """Bilinear resample of the window ``box = (top, left, height, width)`` to ``[size, size, C]``.

    ``box`` is in pixel units of ``image`` (``[H, W, C]``); ``None`` is the whole image.
    Sample points sit at pixel centres, as in ``jax.image.resize``.
    """
    h, w = image.shape[:2]
    top, left, bh, bw = box if box is not None else (0.0, 0.0, float(h), float(w))
    ys = top + (np.arange(size, dtype=np.float32) + 0.5) * (bh / size) - 0.5
    xs = left + (np.arange(size, dtype=np.float32) + 0.5) * (bw / size) - 0.5
    ys = np.clip(ys, 0, h - 1)
    xs = np.clip(xs, 0, w - 1)
    y0 = np.floor(ys).astype(np.int64)
    x0 = np.floor(xs).astype(np.int64)
    y1 = np.minimum(y0 + 1, h - 1)
    x1 = np.minimum(x0 + 1, w - 1)
    wy = (ys - y0)[:, None, None]
    wx = (xs - x0)[None, :, None]
    img = image.astype(np.float32)
    top_row = img[y0][:, x0] * (1 - wx) + img[y0][:, x1] * wx
    bottom_row = img[y1][:, x0] * (1 - wx) + img[y1][:, x1] * wx
    return top_row * (1 - wy) + bottom_row * wy


def random_resized_crop(
    image: np.ndarray,
    rng: np.random.Generator,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> np.ndarray:
    """Inception-style crop: area fraction in ``scale``, aspect ratio log-uniform in ``ratio``."""
    h, w = image.shape[:2]
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw = np.sqrt(target * aspect)
        ch = np.sqrt(target / aspect)
        if cw <= w and ch <= h:
            top = rng.uniform(0, h - ch)
            left = rng.uniform(0, w - cw)
            return resize_bilinear(image, size, (top, left, ch, cw))
    return resize_bilinear(image, size)  # fall back to the whole image, as torchvision does


def _grey(image: np.ndarray) -> np.ndarray:
    if image.shape[-1] == 1:
        return image
    return (image @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]


def _rotate_hue(image: np.ndarray, turns: float) -> np.ndarray:
    # A hue shift is a rotation of the chroma plane of YIQ; cheaper than an HSV round trip.
    to_yiq = np.array(
        [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32
    )
    c, s = np.cos(2 * np.pi * turns), np.sin(2 * np.pi * turns)
    rot = np.array([[1, 0, 0], [0, c, -s], [0, s, c]], np.float32)
    m = np.linalg.inv(to_yiq) @ rot @ to_yiq
    return image @ m.T.astype(np.float32)


def color_jitter(image: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """Brightness, contrast, saturation and hue in a random order (as torchvision's ColorJitter)."""
    rgb = image.shape[-1] == 3
    ops = ["brightness", "contrast"] + (["saturation", "hue"] if rgb else [])
    for op in rng.permutation(ops):
        if op == "brightness" and cfg.brightness > 0:
            image = image * rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
        elif op == "contrast" and cfg.contrast > 0:
            f = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)
            image = (image - _grey(image).mean()) * f + _grey(image).mean()
        elif op == "saturation" and cfg.saturation > 0:
            f = rng.uniform(1 - cfg.saturation, 1 + cfg.saturation)
            image = (image - _grey(image)) * f + _grey(image)
        elif op == "hue" and cfg.hue > 0:
            image = _rotate_hue(image, rng.uniform(-cfg.hue, cfg.hue))
        image = np.clip(image, 0.0, 1.0)
    return image


def simclr_view(image: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """One view: ``[H, W, C]`` float in [0, 1] -> ``[S, S, C]`` float32 (S = image_size)."""
    out = random_resized_crop(image, rng, cfg.image_size, cfg.crop_scale, cfg.crop_ratio)
    if cfg.flip and rng.uniform() < 0.5:
        out = out[:, ::-1]
    if rng.uniform() < cfg.jitter_prob:
        out = color_jitter(out, rng, cfg)
    if out.shape[-1] == 3 and rng.uniform() < cfg.grayscale_prob:
        out = np.repeat(_grey(out), 3, axis=-1)
    return np.ascontiguousarray(out, dtype=np.float32)


def eval_view(image: np.ndarray, image_size: int) -> np.ndarray:
    """The un-augmented view used for evaluation: the whole image resized to ``image_size``."""
    if image.shape[0] == image_size and image.shape[1] == image_size:
        return image.astype(np.float32)
    return resize_bilinear(image, image_size).astype(np.float32)
