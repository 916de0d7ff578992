"""Image transforms for classification: thin wrappers over ``timm.data.create_transform``.

Train: random resized crop (``scale``, ``ratio``, ``interpolation``, which may be ``'random'``),
flips, colour jitter or an auto-augment policy (e.g. the paper's ``'rand-m9-mstd0.5-inc1'``;
timm switches colour jitter off when one is set), then normalisation and random erasing.
Eval: resize to ``image_size / crop_pct`` and centre crop ``image_size``, then normalisation.
Both take an RGB PIL image and return a float tensor ``[3, image_size, image_size]``.

Recent Pillow (13 here) refuses ``ImageOps.posterize(image, 0)`` ("bits must be between or equal
to 1 and 8") where older Pillow cleared every bit (a black image). timm's increasing posterize
asks for 0 bits at magnitude 10, which ``'rand-m9-mstd0.5-inc1'`` draws (clipped from N(9, 0.5))
about 2% of the time, so plain timm training crashes now and then. :func:`make_posterize_safe` swaps in
:func:`safe_posterize`, which keeps the old meaning; our factory always applies it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.auto_augment import AugmentOp

INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")


def create_classification_transforms(
    image_size: int = 224,
    training: bool = False,
    *,
    interpolation: str = "bicubic",
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    hflip: float = 0.5,
    vflip: float = 0.0,
    color_jitter: float | tuple[float, ...] | None = 0.4,
    auto_augment: str | None = None,
    re_prob: float = 0.0,
    re_mode: str = "pixel",
    re_count: int = 1,
    crop_pct: float = 0.875,
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD,
) -> Callable[[Image.Image], Any]:
    """Build the train (``training=True``) or eval transform; see the module docstring.

    Augmentation arguments apply to training only, ``crop_pct`` to eval only. ``interpolation``
    may be ``'random'`` (bilinear or bicubic per image) for training.
    """
    allowed = INTERPOLATIONS + (("random",) if training else ())
    if interpolation not in allowed:
        raise ValueError(
            f"interpolation={interpolation!r} is not one of {list(allowed)}"
            + ("" if training else " ('random' is for training only)")
        )
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct={crop_pct} must be in (0, 1].")
    common = dict(input_size=image_size, interpolation=interpolation, mean=tuple(mean), std=tuple(std))
    if not training:
        return create_transform(**common, is_training=False, crop_pct=crop_pct)
    transform = create_transform(
        **common,
        is_training=True,
        scale=tuple(scale),
        ratio=tuple(ratio),
        hflip=hflip,
        vflip=vflip,
        color_jitter=color_jitter,
        auto_augment=auto_augment or None,
        re_prob=re_prob,
        re_mode=re_mode,
        re_count=re_count,
    )
    make_posterize_safe(transform)
    return transform


def safe_posterize(image: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """``ImageOps.posterize`` for 0..8 bits kept, where 0 clears every bit as old Pillow did."""
    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return image.point([0] * 256 * len(image.getbands()))
    return ImageOps.posterize(image, bits_to_keep)


def make_posterize_safe(transform: Any) -> int:
    """Replace the posterize function of every timm augment op inside ``transform``; return how many.

    Walks ``Compose.transforms``, ``RandAugment.ops``, ``AugMixAugment.ops`` and
    ``AutoAugment.policy``.
    """
    if isinstance(transform, AugmentOp):
        if "Posterize" in transform.name:
            transform.aug_fn = safe_posterize
            return 1
        return 0
    if isinstance(transform, (list, tuple)):
        return sum(make_posterize_safe(item) for item in transform)
    return sum(
        make_posterize_safe(getattr(transform, attribute))
        for attribute in ("transforms", "ops", "policy")
        if isinstance(getattr(transform, attribute, None), (list, tuple))
    )
