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

import re
from collections.abc import Callable
from typing import Any

from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.auto_augment import AugmentOp

INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")

# timm's auto-augment grammar: a policy name, then "-"-separated sections "<key><number>". timm skips a
# section without a number (``inc`` in ``rand-m9-incl``) and runs on without it.
_AUGMENT_SECTIONS = {
    "rand": {
        "m": "magnitude",
        "n": "ops per image",
        "mstd": "magnitude std",
        "mmax": "largest magnitude",
        "inc": "increasing ops (0/1)",
        "p": "op probability",
    },
    "augmix": {
        "m": "magnitude",
        "w": "width",
        "d": "depth",
        "mstd": "magnitude std",
        "a": "alpha",
        "b": "blended (0/1)",
    },
    "autoaugment": {"mstd": "magnitude std"},
}
_AUTO_AUGMENT_POLICIES = ("original", "originalr", "v0", "v0r", "3a")
_RAND_CHOICES = ("tweights", "t3a", "t3aw")
_SECTION = re.compile(r"([a-z]+)(\d+(?:\.\d+)?)")


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
    check_geometry(image_size, scale, ratio)
    if training and auto_augment:
        check_auto_augment(auto_augment)
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


def check_geometry(image_size: int, scale: tuple[float, float], ratio: tuple[float, float]) -> None:
    """Raise unless ``image_size`` is positive and ``scale`` / ``ratio`` are increasing ranges timm can sample."""
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size={image_size!r} must be a positive number of pixels, e.g. 224.")
    if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(
            f"scale={list(scale)} must be [smallest, largest] crop area as fractions of the image, with "
            "0 < smallest <= largest <= 1, e.g. [0.08, 1.0]."
        )
    if len(ratio) != 2 or not 0.0 < ratio[0] <= ratio[1]:
        raise ValueError(
            f"ratio={list(ratio)} must be [smallest, largest] crop aspect ratio (width / height), with "
            "0 < smallest <= largest, e.g. [0.75, 1.3333]."
        )


def check_auto_augment(policy: str) -> None:
    """Raise unless ``policy`` follows timm's grammar (``rand-m9-mstd0.5-inc1``, ``augmix-m5-w4-d2``, ``original-mstd0.5``).

    timm ignores sections it cannot parse, so a typo would silently train with another augmentation.
    """
    name, *sections = policy.split("-")
    if name in _AUGMENT_SECTIONS and name != "autoaugment":
        family = name
    elif name in _AUTO_AUGMENT_POLICIES:
        family = "autoaugment"
    else:
        raise ValueError(
            f"auto_augment={policy!r}: policy {name!r} is not one of 'rand' (RandAugment), 'augmix' or the "
            f"AutoAugment policies {list(_AUTO_AUGMENT_POLICIES)}; e.g. 'rand-m9-mstd0.5-inc1'."
        )
    keys = _AUGMENT_SECTIONS[family]
    for section in sections:
        if family == "rand" and section in _RAND_CHOICES:
            continue
        match = _SECTION.fullmatch(section)
        if match is None or match.group(1) not in keys:
            accepted = ", ".join(f"{key}<number> ({meaning})" for key, meaning in keys.items())
            if family == "rand":
                accepted += ", " + ", ".join(_RAND_CHOICES)
            raise ValueError(
                f"auto_augment={policy!r}: section {section!r} is not part of timm's {name!r} grammar, and timm "
                f"would silently ignore it. Accepted sections: {accepted}; e.g. 'rand-m9-mstd0.5-inc1'."
            )


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
