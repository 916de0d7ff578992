"""Painting scikit-learn's handwritten digits onto smooth colour scenes, for the embedded datasets."""

from __future__ import annotations

import numpy as np
from PIL import Image


def smooth_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A float ``[size, size, 3]`` scene: a linear blend of two random colours, with a little noise."""
    start, end = rng.uniform(0, 255, size=(2, 3))
    direction = rng.uniform(-1.0, 1.0, size=2)
    rows, columns = np.mgrid[0:size, 0:size] / (size - 1)
    blend = np.clip(0.5 + direction[0] * (rows - 0.5) + direction[1] * (columns - 0.5), 0.0, 1.0)[..., None]
    return (1.0 - blend) * start + blend * end + rng.normal(0.0, 6.0, size=(size, size, 3))


def paint_digit(
    scene: np.ndarray, digit: np.ndarray, top: int, left: int, side: int, rng: np.random.Generator
) -> np.ndarray:
    """Paint an 8x8 ``digit`` (values 0-16) scaled to ``side`` pixels into ``scene`` in place, in a
    colour that contrasts with the scene under it; returns its ink coverage, float ``[side, side]`` in [0, 1]."""
    glyph = Image.fromarray(np.rint(digit * (255.0 / 16.0)).astype(np.uint8), mode="L")
    ink = np.asarray(glyph.resize((side, side), Image.Resampling.BILINEAR), dtype=np.float64) / 255.0
    window = scene[top : top + side, left : left + side]
    background = window.mean(axis=(0, 1))
    colour = np.where(background > 127.5, rng.uniform(0, 60, size=3), rng.uniform(195, 255, size=3))
    window[:] = (1.0 - ink[..., None]) * window + ink[..., None] * colour
    return ink
