"""Joint image, box and mask transforms for detection, on ``torchvision.transforms.v2`` and ``tv_tensors``.

A sample is ``(image, target)``: a uint8 ``tv_tensors.Image`` and a dict with ``boxes``
(``tv_tensors.BoundingBoxes``), ``labels`` and optionally ``masks`` (``tv_tensors.Mask``),
``iscrowd`` and ``area``; torchvision moves the boxes and masks with the image.

Train (mmdetection's COCO pipeline): resize so the shorter side is ``min_size`` (one drawn per
image when a list is given) and the longer at most ``max_size``, keeping the aspect ratio;
horizontal flip; float in [0, 1]; boxes left with no area are removed with their labels, masks,
``iscrowd`` and ``area``. Eval: float in [0, 1] only, unless ``resize_eval``: the detector resizes
with the same sizes inside (``GeneralizedRCNNTransform``) and returns boxes in the coordinates of
the image it was given, so evaluation happens at the original resolution, where COCO's small,
medium and large area ranges are defined. Neither normalises: the detector does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

__all__ = ["create_detection_transforms"]

_PER_BOX_KEYS = ("labels", "iscrowd", "area")


def _per_box_tensors(sample: Any) -> tuple[torch.Tensor, ...]:
    """The target's per-box tensors besides boxes and masks, for `SanitizeBoundingBoxes` to filter."""
    target = sample[1]
    return tuple(target[key] for key in _PER_BOX_KEYS if key in target)


def create_detection_transforms(
    train: bool,
    min_size: int | Sequence[int] = 800,
    max_size: int = 1333,
    flip_prob: float = 0.5,
    resize_eval: bool = False,
) -> v2.Compose:
    """The train or eval transform of ``(image, target)`` samples (see the module docstring)."""
    sizes = [min_size] if isinstance(min_size, int) else [int(size) for size in min_size]
    if not sizes or min(sizes) < 1 or max(sizes) >= max_size:
        raise ValueError(f"min_size={min_size} must be positive and below max_size={max_size} (e.g. 800 and 1333).")
    if len(sizes) == 1:
        resize: v2.Transform = v2.Resize(sizes[0], max_size=max_size, antialias=True)
    else:
        resize = v2.RandomShortestSize(sizes, max_size=max_size, antialias=True)
    to_float = v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)
    if not train:
        return v2.Compose([resize, to_float] if resize_eval else [to_float])
    return v2.Compose(
        [
            resize,
            v2.RandomHorizontalFlip(flip_prob),
            to_float,
            v2.SanitizeBoundingBoxes(labels_getter=_per_box_tensors),
        ]
    )
