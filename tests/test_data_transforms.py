"""Classification transforms: timm's eval and train pipelines, RandAugment made safe.

Every dataset here is generated on disk and read through the same calls a user's configuration makes.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from data_helpers import to_pixels
from PIL import Image, ImageOps
from timm.data import create_transform
from timm.data.auto_augment import AugmentOp, RandAugment

from mambaout_pl.data import (
    create_classification_transforms,
)
from mambaout_pl.data.transforms import make_posterize_safe


def test_eval_transform_resizes_and_centre_crops():
    transform = create_classification_transforms(32, training=False, crop_pct=0.875)
    image = Image.new("RGB", (64, 48), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 8, 48))  # a blue band that the centre crop cuts away
    output = transform(image)
    assert output.shape == (3, 32, 32)
    assert torch.allclose(to_pixels(output)[:, 4:-4, 4:-4].mean(dim=(1, 2)), torch.tensor([255.0, 0.0, 0.0]), atol=1.0)
    with pytest.raises(ValueError, match="random"):
        create_classification_transforms(32, training=False, interpolation="random")


def test_train_transform_options_reach_timm():
    options = dict(ratio=(1.0, 1.0), color_jitter=None, interpolation="nearest")
    transform = create_classification_transforms(40, training=True, scale=(0.5, 0.5), **options)
    crop = transform.transforms[0]
    assert crop.scale == (0.5, 0.5) and crop.ratio == (1.0, 1.0) and crop.size == (40, 40)
    assert transform.transforms[1].p == 0.5  # default hflip

    # Whole-image crop and certain flips: the output is the image turned upside down.
    pixels = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    transform = create_classification_transforms(40, training=True, scale=(1.0, 1.0), hflip=1.0, vflip=1.0, **options)
    output = to_pixels(transform(Image.fromarray(pixels)))
    expected = torch.from_numpy(pixels[::-1, ::-1].copy()).permute(2, 0, 1).float()
    assert torch.allclose(output, expected, atol=0.01)


def _posterize_op(transform):
    randaugment = next(t for t in transform.transforms if isinstance(t, RandAugment))
    return next(op for op in randaugment.ops if op.name == "PosterizeIncreasing")


def pillow_refuses_zero_bits() -> bool:
    try:
        ImageOps.posterize(Image.new("RGB", (1, 1)), 0)
    except ValueError:
        return True
    return False


def test_posterize_at_zero_bits_no_longer_crashes():
    image = Image.fromarray(np.random.default_rng(0).integers(1, 256, (8, 8, 3), dtype=np.uint8))

    # Plain timm at magnitude 10 asks Pillow for 0 bits, which Pillow 11 and 13 refuse (12.3 clears every bit).
    plain = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    assert plain.level_fn(10, plain.hparams) == (0,)
    if pillow_refuses_zero_bits():
        with pytest.raises(ValueError, match="bits must be between"):
            plain(image)
    else:
        assert np.asarray(plain(image)).max() == 0

    transform = create_classification_transforms(16, training=True, auto_augment="rand-m9-mstd0.5-inc1")
    ours = _posterize_op(transform)
    ours.prob, ours.magnitude, ours.magnitude_std = 1.0, 10, 0.0
    assert np.asarray(ours(image)).max() == 0  # 0 bits kept: every bit cleared, as old Pillow did
    ours.magnitude = 5  # 4 - int(0.5 * 4) = 2 bits kept: unchanged semantics
    assert np.array_equal(np.asarray(ours(image)), np.asarray(ImageOps.posterize(image, 2)))
    assert make_posterize_safe(create_transform(16, is_training=True, auto_augment="rand-m9-mstd0.5-inc1")) == 1


def _run_seeded(transform, image, seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return transform(image)


def test_paper_train_transform_runs_many_times():
    options = dict(scale=(0.08, 1.0), hflip=0.5, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, re_mode="pixel")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8))
    plain = create_transform(16, is_training=True, interpolation="random", **options)
    ours = create_classification_transforms(16, training=True, interpolation="random", **options)

    seeds = range(1000)
    crashed = []
    for seed in seeds:
        try:
            expected = _run_seeded(plain, image, seed)
        except ValueError as error:
            assert "bits must be" in str(error)
            crashed.append(seed)
            continue
        if seed % 100 == 0:  # where plain timm works, ours gives the very same output
            assert torch.equal(_run_seeded(ours, image, seed), expected)
    assert bool(crashed) == pillow_refuses_zero_bits(), "these seeds reach posterize at magnitude 10 with plain timm"

    for seed in seeds:
        output = _run_seeded(ours, image, seed)
        assert output.shape == (3, 16, 16) and torch.isfinite(output).all()
