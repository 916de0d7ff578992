"""Property-based tests (hypothesis): transforms and the segmentation metric on generated inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mambaout_pl.data import create_classification_transforms, create_segmentation_transforms
from mambaout_pl.data.images import to_rgb
from mambaout_pl.data.resumable import EpochShuffleSampler, sample_seed
from mambaout_pl.tasks.segmentation_metrics import confusion_scores, segmentation_metrics

IGNORE = 255
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def label_maps(draw, num_classes: int = 4, max_side: int = 24) -> np.ndarray:
    height = draw(st.integers(4, max_side))
    width = draw(st.integers(4, max_side))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=(height, width))
    labels[rng.random((height, width)) < draw(st.floats(0.0, 0.5))] = IGNORE
    return labels.astype(np.int64)


@FAST
@given(labels=label_maps(), crop=st.integers(8, 20), flip=st.sampled_from([0.0, 1.0]), seed=st.integers(0, 1000))
def test_segmentation_train_transform_keeps_labels_and_gives_crops_of_the_crop_size(labels, crop, flip, seed) -> None:
    torch.manual_seed(seed)
    transform = create_segmentation_transforms(
        training=True, crop_size=crop, scale=(64, 16), ratio_range=(0.5, 2.0), hflip=flip, ignore_index=IGNORE
    )
    pixels = torch.from_numpy(np.stack([labels % 256] * 3).astype(np.uint8))
    image, mask = transform(pixels, torch.from_numpy(labels))
    assert image.shape == (3, crop, crop) and mask.shape == (crop, crop)
    assert torch.isfinite(image).all()
    # masks are resized with nearest and padded with the ignore index: no new label appears
    assert set(mask.unique().tolist()) <= set(np.unique(labels).tolist()) | {IGNORE}


@FAST
@given(labels=label_maps())
def test_segmentation_eval_transform_keeps_the_mask_and_the_aspect_ratio(labels) -> None:
    transform = create_segmentation_transforms(training=False, scale=(64, 32))
    pixels = torch.zeros((3, *labels.shape), dtype=torch.uint8)
    image, mask = transform(pixels, torch.from_numpy(labels))
    assert torch.equal(mask, torch.from_numpy(labels))
    height, width = image.shape[-2:]
    assert max(height, width) <= 64 and min(height, width) <= 32
    assert abs(height / width - labels.shape[0] / labels.shape[1]) < 0.25


@FAST
@given(
    width=st.integers(1, 80),
    height=st.integers(1, 80),
    mode=st.sampled_from(["L", "LA", "RGB", "RGBA", "P", "CMYK", "I;16", "I", "F", "1"]),
    size=st.sampled_from([16, 24]),
)
def test_classification_transforms_give_finite_square_rgb_tensors_for_any_image(width, height, mode, size) -> None:
    image = to_rgb(Image.new(mode, (width, height)))
    assert image.mode == "RGB"
    for training in (False, True):
        tensor = create_classification_transforms(size, training=training)(image)
        assert tensor.shape == (3, size, size) and torch.isfinite(tensor).all()


@FAST
@given(maps=st.lists(label_maps(num_classes=5, max_side=12), min_size=1, max_size=4), seed=st.integers(0, 1000))
def test_segmentation_scores_count_every_labelled_pixel_once_in_any_order(maps, seed) -> None:
    rng = np.random.default_rng(seed)
    predictions = [rng.integers(0, 5, size=labels.shape) for labels in maps]
    together = segmentation_metrics(num_classes=5, ignore_index=IGNORE)
    one_by_one = segmentation_metrics(num_classes=5, ignore_index=IGNORE)
    for prediction, labels in zip(predictions, maps):
        together.update(torch.from_numpy(prediction)[None], torch.from_numpy(labels)[None])
    for index in rng.permutation(len(maps)):
        one_by_one.update(torch.from_numpy(predictions[index])[None], torch.from_numpy(maps[index])[None])
    confusion = together.compute()["val/confusion"]
    assert torch.equal(confusion, one_by_one.compute()["val/confusion"])
    assert confusion.sum().item() == sum(int((labels != IGNORE).sum()) for labels in maps)
    scores = confusion_scores(confusion)
    for name in ("mIoU", "mAcc", "aAcc"):
        value = scores[name].item()
        assert np.isnan(value) or 0.0 <= value <= 1.0


@FAST
@given(maps=st.lists(label_maps(num_classes=5, max_side=12), min_size=1, max_size=3))
def test_a_perfect_prediction_scores_one(maps) -> None:
    metrics = segmentation_metrics(num_classes=5, ignore_index=IGNORE)
    for labels in maps:
        prediction = np.where(labels == IGNORE, 0, labels)  # anything where nothing is labelled
        metrics.update(torch.from_numpy(prediction)[None], torch.from_numpy(labels)[None])
    scores = confusion_scores(metrics.compute()["val/confusion"])
    if any((labels != IGNORE).any() for labels in maps):
        assert scores["mIoU"].item() == pytest.approx(1.0)
        assert scores["aAcc"].item() == pytest.approx(1.0)


@FAST
@given(length=st.integers(1, 50), seed=st.integers(0, 10**6), epoch=st.integers(0, 100))
def test_training_order_and_sample_seeds_depend_only_on_seed_epoch_and_index(length, seed, epoch) -> None:
    first, second = EpochShuffleSampler(range(length), seed=seed), EpochShuffleSampler(range(length), seed=seed)
    first.set_epoch(epoch)
    second.set_epoch(epoch)
    order = list(first)
    assert sorted(order) == list(range(length)) and order == list(second)
    assert sample_seed(seed, epoch, 0) == sample_seed(seed, epoch, 0) != sample_seed(seed, epoch + 1, 0)
