"""Label maps damaged by lossy compression: label values that occur only along the edges between regions.

A label map once saved as JPEG and later as PNG still holds one integer per pixel, but the
compression's ringing has changed the pixels along every edge to values in between: the two
classes' indices become a fringe of other indices, often valid classes too (ADE20K has 150). A
class of the scene covers a region, so some of its pixels have four neighbours of the same value;
a value none of whose pixels has is a fringe, and several such values in one map are the mark of
the damage.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = ["DAMAGE_THRESHOLD", "DamagedLabelMapWarning", "describe_edge_values", "edge_only_values"]

#: A label map with this many edge-only values is reported as damaged (one or two are thin objects: poles, wires).
DAMAGE_THRESHOLD = 3


class DamagedLabelMapWarning(UserWarning):
    """A label map whose values look changed by lossy compression (see :func:`edge_only_values`)."""


def edge_only_values(labels: np.ndarray, ignored: Iterable[int] = ()) -> dict[int, int]:
    """The values of ``labels`` (``[H, W]`` integers) none of whose pixels has its four neighbours of its own
    value, with their pixel counts; values in ``ignored`` (the ignore index) are left out."""
    padded = np.pad(labels, 1, mode="edge")
    centre = padded[1:-1, 1:-1]
    inside = (
        (centre == padded[:-2, 1:-1])
        & (centre == padded[2:, 1:-1])
        & (centre == padded[1:-1, :-2])
        & (centre == padded[1:-1, 2:])
    )
    if labels.size and labels.min() >= 0:  # label maps read from images: counting is linear
        counts, inside_counts = np.bincount(labels.ravel()), np.bincount(labels[inside], minlength=labels.max() + 1)
        values = np.flatnonzero((counts > 0) & (inside_counts == 0))
        found = dict(zip(values.tolist(), counts[values].tolist(), strict=True))
    else:
        values, counts = np.unique(labels, return_counts=True)
        with_inside = set(np.unique(labels[inside]).tolist())
        found = {v: c for v, c in zip(values.tolist(), counts.tolist(), strict=True) if v not in with_inside}
    skipped = set(ignored)
    return {int(value): int(count) for value, count in found.items() if value not in skipped}


def describe_edge_values(values: dict[int, int], shown: int = 10) -> str:
    """``5, 6, 9 (3 values, 41 pixels)`` for messages."""
    listed = ", ".join(str(value) for value in sorted(values)[:shown]) + (", ..." if len(values) > shown else "")
    return f"{listed} ({len(values)} values, {sum(values.values())} pixels)"
