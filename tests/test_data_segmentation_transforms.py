"""Joint image / label-map transforms of segmentation.

Every dataset here is generated on disk and read through the same calls a user's configuration makes.
"""

from __future__ import annotations

import numpy as np
import torch
from data_helpers import to_pixels
from torchvision import tv_tensors

from mambaout_pl.data import (
    create_segmentation_transforms,
)
from mambaout_pl.data.segmentation_transforms import RandomCategoryCrop, rescale_size


def labelled_image(height: int = 60, width: int = 80) -> tuple[torch.Tensor, torch.Tensor]:
    """An image whose red channel spells its label map (label * 20), labels 0..5 in blocks, 255 in a corner."""
    labels = torch.zeros(height, width, dtype=torch.long)
    for index in range(6):
        labels[:, index * width // 6 : (index + 1) * width // 6] = index
    labels[:5, :5] = 255
    image = torch.stack([labels.clamp(max=5) * 20, torch.full_like(labels, 100), torch.full_like(labels, 50)]).to(
        torch.uint8
    )
    return image, labels


def test_rescale_fits_the_long_and_the_short_side():
    assert rescale_size(512, 683, (2048, 512)) == (512, 683)  # ADE20K's usual shape: short side 512
    assert rescale_size(300, 2000, (2048, 512)) == (307, 2048)  # very wide: the long side limits
    assert rescale_size(40, 40, (128, 64)) == (64, 64)


def test_train_transform_keeps_image_and_mask_aligned_and_masks_nearest():
    torch.manual_seed(0)
    transform = create_segmentation_transforms(
        training=True,
        crop_size=48,
        scale=(160, 80),
        ratio_range=(0.5, 2.0),
        photometric_distortion=False,
    )
    image, labels = labelled_image()
    for _ in range(20):
        out_image, out_mask = transform(image, labels)
        assert out_image.shape == (3, 48, 48) and out_image.dtype == torch.float32
        assert out_mask.shape == (48, 48) and out_mask.dtype == torch.long
        assert set(out_mask.unique().tolist()) <= {0, 1, 2, 3, 4, 5, 255}  # nearest only: no new values
        labelled = out_mask != 255
        red = to_pixels(out_image)[0][labelled]
        # Where a label is, its colour is: at most a blend with a neighbouring block at the border.
        assert (red - out_mask[labelled] * 20.0).abs().le(20.5).float().mean() > 0.97


def test_train_transform_pads_small_crops_with_the_ignore_index():
    transform = create_segmentation_transforms(
        training=True,
        crop_size=64,
        scale=(30, 15),
        ratio_range=(1.0, 1.0),
        hflip=0.0,
        photometric_distortion=False,
    )
    image, labels = labelled_image(40, 40)
    out_image, out_mask = transform(image, labels)
    assert out_image.shape == (3, 64, 64)
    assert (out_mask[15:] == 255).all() and (out_mask[:, 15:] == 255).all()  # rescaled to 15x15, padded
    assert (out_image[:, 15:] == 0).all()


def test_category_crop_avoids_crops_dominated_by_one_class():
    labels = torch.zeros(100, 100, dtype=torch.long)
    labels[:, 80:] = 1  # class 0 covers 80%: most 20x20 crops hold class 0 only
    mask = tv_tensors.Mask(labels)
    image = tv_tensors.Image(torch.zeros(3, 100, 100))
    torch.manual_seed(0)
    limited = RandomCategoryCrop(20, cat_max_ratio=0.75)
    shares = []
    for _ in range(100):
        _, crop = limited(image, mask)
        shares.append((crop == 0).float().mean().item())
    # One draw has 15 of 81 offsets with class 0 below 75%; up to 11 draws: ~90% of the crops.
    assert np.mean([share < 0.75 for share in shares]) > 0.75
    unlimited = RandomCategoryCrop(20, cat_max_ratio=1.0)
    assert np.mean([(unlimited(image, mask)[1] == 0).float().mean().item() < 0.75 for _ in range(100)]) < 0.35


def test_eval_transform_rescales_the_image_and_leaves_the_mask():
    transform = create_segmentation_transforms(training=False, scale=(2048, 512))
    image, labels = labelled_image(256, 400)
    out_image, out_mask = transform(image, labels)
    assert out_image.shape == (3, 512, 800)
    assert out_mask is labels or torch.equal(out_mask, labels)
