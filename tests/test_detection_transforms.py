"""Detection transforms: boxes and masks stay on the image through resize, flip and sanitising."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors

from mambaout_pl.data.detection_transforms import create_detection_transforms


def sample(height: int = 16, width: int = 24) -> tuple[tv_tensors.Image, dict]:
    """A dark image with one bright rectangle (rows 2:6, columns 4:10), its box and mask, and a box with no width."""
    image = torch.full((3, height, width), 10, dtype=torch.uint8)
    image[:, 2:6, 4:10] = 250
    masks = torch.zeros(2, height, width, dtype=torch.uint8)
    masks[0, 2:6, 4:10] = 1
    masks[1, 8:12, 15:16] = 1
    target = {
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor([[4.0, 2.0, 10.0, 6.0], [15.0, 8.0, 15.0, 12.0]]), format="XYXY", canvas_size=(height, width)
        ),
        "labels": torch.tensor([3, 5]),
        "masks": tv_tensors.Mask(masks),
        "iscrowd": torch.tensor([0, 0]),
        "area": torch.tensor([24.0, 4.0]),
        "image_id": 7,
    }
    return tv_tensors.Image(image), target


def test_train_resize_and_flip_move_boxes_and_masks_with_the_image():
    transform = create_detection_transforms(train=True, min_size=32, max_size=100, flip_prob=1.0)
    image, target = transform(*sample())
    # shorter side 16 -> 32: everything doubles, then the 48-pixel-wide image is mirrored
    assert image.shape == (3, 32, 48) and image.dtype == torch.float32
    assert target["boxes"].tolist() == [[28.0, 4.0, 40.0, 12.0]]
    assert tuple(target["boxes"].canvas_size) == (32, 48)
    expected_mask = torch.zeros(32, 48, dtype=torch.uint8)
    expected_mask[4:12, 28:40] = 1
    assert torch.equal(target["masks"].as_subclass(torch.Tensor), expected_mask[None])
    assert image[:, 5:11, 29:39].min() > 0.9 and image[:, :, :26].max() < 0.1 and image[:, 14:].max() < 0.1
    # the box without width is gone, with its label, mask, iscrowd and area
    assert target["labels"].tolist() == [3] and target["iscrowd"].tolist() == [0]
    assert target["area"].tolist() == [24.0] and target["image_id"] == 7


def test_train_without_flip_and_longer_side_capped():
    transform = create_detection_transforms(train=True, min_size=32, max_size=48, flip_prob=0.0)
    image, target = transform(*sample(height=16, width=32))
    # 32 on the shorter side would make the longer 64 > 48: the longer side is capped at 48 (scale 1.5)
    assert image.shape == (3, 24, 48)
    assert target["boxes"].tolist() == [[6.0, 3.0, 15.0, 9.0]]
    mask = target["masks"][0]
    rows, columns = torch.nonzero(mask, as_tuple=True)
    assert (columns.min(), rows.min(), columns.max() + 1, rows.max() + 1) == (6, 3, 15, 9)


def test_flip_happens_half_the_time():
    transform = create_detection_transforms(train=True, min_size=16, max_size=100)
    torch.manual_seed(0)
    flipped = [transform(*sample())[1]["boxes"][0, 0].item() != 4.0 for _ in range(200)]
    assert 70 <= sum(flipped) <= 130


def test_multi_scale_train_sizes_draw_the_shorter_side_from_the_list():
    transform = create_detection_transforms(train=True, min_size=[16, 24, 32], max_size=100)
    torch.manual_seed(0)
    sides = {transform(*sample())[0].shape[1] for _ in range(30)}
    assert sides == {16, 24, 32}


def test_eval_converts_without_resizing_unless_asked():
    image, target = sample()
    eval_image, eval_target = create_detection_transforms(train=False, min_size=32, max_size=100)(image, target)
    torch.testing.assert_close(eval_image.as_subclass(torch.Tensor), image.float() / 255)
    assert eval_target["boxes"].tolist() == target["boxes"].tolist()  # boxes stay where COCO evaluation wants them
    resized_image, resized_target = create_detection_transforms(
        train=False, min_size=32, max_size=100, resize_eval=True
    )(image, target)
    assert resized_image.shape == (3, 32, 48) and resized_target["boxes"][0].tolist() == [8.0, 4.0, 20.0, 12.0]


def test_min_size_must_fit_below_max_size():
    with pytest.raises(ValueError, match="min_size=1400 must be positive and below max_size=1333"):
        create_detection_transforms(train=True, min_size=1400)
