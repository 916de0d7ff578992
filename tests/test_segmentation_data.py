"""Segmentation data: joint transforms, the ADE20K-layout folder, parquet, the embedded scenes, bad input.

Every dataset is generated on disk (``tests/conftest.py``) and read through the same code a
user's configuration reaches; nothing touches the network.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ADE20K_FOLDER_SIZES, ade20k_label_map
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import tv_tensors

from mambaout_pl.data import (
    ADE20K_CLASSES,
    ColumnNotFoundError,
    DataError,
    DataNotFoundError,
    ImageClassificationDataModule,
    InvalidLabelError,
    SegmentationDataModule,
    create_segmentation_transforms,
    open_dataset,
)
from mambaout_pl.data import embedded
from mambaout_pl.data.segmentation_transforms import RandomCategoryCrop, rescale_size

MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)


def make_module(tmp_path: Path, **kwargs) -> SegmentationDataModule:
    """A data module with small, single-process defaults and a private cache."""
    defaults = dict(
        crop_size=32, resize_scale=(64, 32), batch_size=2, eval_batch_size=2, num_workers=0, pin_memory=False,
        cache_dir=str(tmp_path / "hf_cache"),
    )
    return SegmentationDataModule(**{**defaults, **kwargs})


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    return (images * STD + MEAN) * 255.0


# --------------------------------------------------------------------------------------------
# transforms


def labelled_image(height: int = 60, width: int = 80) -> tuple[torch.Tensor, torch.Tensor]:
    """An image whose red channel spells its label map (label * 20), labels 0..5 in blocks, 255 in a corner."""
    labels = torch.zeros(height, width, dtype=torch.long)
    for index in range(6):
        labels[:, index * width // 6 : (index + 1) * width // 6] = index
    labels[:5, :5] = 255
    image = torch.stack([labels.clamp(max=5) * 20, torch.full_like(labels, 100), torch.full_like(labels, 50)]).to(torch.uint8)
    return image, labels


def test_rescale_fits_the_long_and_the_short_side():
    assert rescale_size(512, 683, (2048, 512)) == (512, 683)  # ADE20K's usual shape: short side 512
    assert rescale_size(300, 2000, (2048, 512)) == (307, 2048)  # very wide: the long side limits
    assert rescale_size(40, 40, (128, 64)) == (64, 64)


def test_train_transform_keeps_image_and_mask_aligned_and_masks_nearest():
    torch.manual_seed(0)
    transform = create_segmentation_transforms(
        training=True, crop_size=48, scale=(160, 80), ratio_range=(0.5, 2.0), photometric_distortion=False,
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
        training=True, crop_size=64, scale=(30, 15), ratio_range=(1.0, 1.0), hflip=0.0, photometric_distortion=False,
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


# --------------------------------------------------------------------------------------------
# the ADE20K layout


def test_ade20k_folder_splits_classes_and_batches(ade20k_folder, tmp_path):
    dm = make_module(tmp_path, path="ade20k", data_dir=str(ade20k_folder), reduce_zero_label=True)
    assert dm.num_classes == 150 and dm.label_names == list(ADE20K_CLASSES)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 4 and len(dm.datasets["val"]) == 2

    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["mask"].shape == (2, 32, 32)
    assert set(batch["mask"].unique().tolist()) <= {0, 1, 255}  # ADE labels 1, 2 -> 0, 1; 0 -> ignored

    (val,) = list(dm.val_dataloader())
    sizes = ADE20K_FOLDER_SIZES["validation"]
    assert val["name"] == ["ADE_validation_00000000", "ADE_validation_00000001"]
    assert val["original_size"].tolist() == [[h, w] for w, h in sizes]
    # Rescaled to fit (64, 32): short side 32, padded to the larger of the two.
    assert val["image_size"].tolist() == [[38, 32], [32, 45]]
    assert val["image"].shape == (2, 3, 38, 45)
    assert val["mask"].shape == (2, 48, 56)  # original label maps, padded with the ignore index
    for index, (width, height) in enumerate(sizes):
        raw = torch.from_numpy(ade20k_label_map(width, height)).long()
        expected = torch.where(raw == 0, torch.tensor(255), raw - 1)
        assert torch.equal(val["mask"][index, :height, :width], expected)
        assert (val["mask"][index, height:] == 255).all() and (val["mask"][index, :, width:] == 255).all()


def test_ade20k_folder_without_reduce_zero_label_has_the_other_class(ade20k_folder, tmp_path):
    dm = make_module(tmp_path, path="ade20k", data_dir=str(ade20k_folder))
    assert dm.num_classes == 151 and dm.label_names[:2] == ["other", "wall"]
    dm.setup("validate")
    assert set(dm.datasets["val"][0]["mask"].unique().tolist()) == {0, 1, 2}


def test_class_names_file_names_the_classes(ade20k_folder, tmp_path):
    (ade20k_folder / "class_names.txt").write_text("other\nleft\nright\n")
    dm = make_module(tmp_path, path="ade20k", data_dir=str(ade20k_folder))
    assert dm.label_names == ["other", "left", "right"]
    dm = make_module(tmp_path, path="ade20k", data_dir=str(ade20k_folder), num_classes=5)
    assert dm.label_names == ["0", "1", "2", "3", "4"]
    dm = make_module(tmp_path, path="ade20k", data_dir=str(ade20k_folder), label_names=["a", "b", "c"])
    assert dm.num_classes == 3


def test_missing_annotations_folder_is_named(ade20k_folder, tmp_path):
    shutil.rmtree(ade20k_folder / "annotations" / "validation")
    dm = make_module(tmp_path, path="ade20k", data_dir=str(ade20k_folder), reduce_zero_label=True)
    expected = str(ade20k_folder / "annotations" / "validation")
    with pytest.raises(ColumnNotFoundError, match=f"'validation' has no label maps: folder '{expected}' does not exist"):
        dm.setup("fit")
    # An unlabelled split can still be predicted on.
    dm = make_module(tmp_path, path="ade20k", data_dir=str(ade20k_folder), reduce_zero_label=True, predict_split="validation")
    batch = next(iter(dm.predict_dataloader()))
    assert "mask" not in batch and batch["name"] == ["ADE_validation_00000000", "ADE_validation_00000001"]


def test_missing_label_map_and_missing_folder_are_named(ade20k_folder, tmp_path):
    missing = ade20k_folder / "annotations" / "training" / "ADE_training_00000002.png"
    missing.unlink()
    with pytest.raises(DataNotFoundError, match=r"ADE_training_00000002\.jpg' has no label map: expected '.*ADE_training_00000002\.png'"):
        make_module(tmp_path, path="ade20k", data_dir=str(ade20k_folder)).num_classes
    with pytest.raises(DataNotFoundError, match="No 'images' folder in data_dir"):
        make_module(tmp_path, path="ade20k", data_dir=str(ade20k_folder / "annotations")).num_classes
    with pytest.raises(DataNotFoundError, match="no_such_folder"):
        make_module(tmp_path, path="ade20k", data_dir=str(tmp_path / "no_such_folder")).num_classes


def test_mask_of_another_size_names_both_files(ade20k_folder, tmp_path):
    mask_path = ade20k_folder / "annotations" / "training" / "ADE_training_00000001.png"
    Image.fromarray(np.ones((10, 12), np.uint8), mode="L").save(mask_path)
    dm = make_module(tmp_path, path="ade20k", data_dir=str(ade20k_folder), reduce_zero_label=True)
    dm.setup("fit")
    with pytest.raises(DataError, match=r"ADE_training_00000001\.png' is 12x10 .* image '.*ADE_training_00000001\.jpg' is 40x56"):
        dm.datasets["train"][1]


def test_labels_outside_the_classes_name_the_file_and_the_fix(ade20k_folder, tmp_path):
    # ADE20K's labels run to 150 with 0 = "other": without reduce_zero_label, 150 classes are too few.
    mask_path = ade20k_folder / "annotations" / "training" / "ADE_training_00000000.png"
    labels = ade20k_label_map(48, 40)
    labels[10, 10] = 150
    Image.fromarray(labels, mode="L").save(mask_path)
    dm = make_module(tmp_path, path="ade20k", data_dir=str(ade20k_folder), num_classes=150)
    dm.setup("fit")
    with pytest.raises(InvalidLabelError, match=r"ADE_training_00000000\.png' holds label value\(s\) 150 .*reduce_zero_label: true"):
        dm.datasets["train"][0]

    labels[10, 10] = 200  # neither a class nor the ignore index, even after reduce_zero_label
    Image.fromarray(labels, mode="L").save(mask_path)
    dm = make_module(tmp_path, path="ade20k", data_dir=str(ade20k_folder), reduce_zero_label=True)
    dm.setup("fit")
    with pytest.raises(InvalidLabelError, match=r"value\(s\) 200 .*\[0, 150\).*num_classes` to at least 200"):
        dm.datasets["train"][0]


def test_colour_label_maps_are_refused(ade20k_folder, tmp_path):
    mask_path = ade20k_folder / "annotations" / "training" / "ADE_training_00000000.png"
    Image.new("RGB", (48, 40), (1, 1, 1)).save(mask_path)
    dm = make_module(tmp_path, path="ade20k", data_dir=str(ade20k_folder), reduce_zero_label=True)
    dm.setup("fit")
    with pytest.raises(InvalidLabelError, match="is a RGB image; a label map holds one class index per pixel"):
        dm.datasets["train"][0]


# --------------------------------------------------------------------------------------------
# parquet and the embedded scenes


def test_parquet_with_image_and_mask_columns(segmentation_parquet, tmp_path):
    dm = make_module(tmp_path, path="parquet", data_files=segmentation_parquet, num_classes=3, resize_scale=(32, 24))
    assert dm.label_names == ["0", "1", "2"]
    (val,) = list(dm.val_dataloader())
    assert val["mask"].shape == (2, 24, 32) and val["image"].shape == (2, 3, 24, 32)
    assert val["mask"][0, 0].eq(255).all() and val["mask"][0, 1].tolist() == [0] * 11 + [1] * 11 + [2] * 10
    assert val["name"] == ["000000", "000001"]

    with pytest.raises(DataError, match="Set `num_classes`"):
        make_module(tmp_path, path="parquet", data_files=segmentation_parquet).num_classes
    with pytest.raises(ColumnNotFoundError, match=r"'label' does not exist.*`mask_column`"):
        make_module(tmp_path, path="parquet", data_files=segmentation_parquet, num_classes=3, mask_column="label").setup("fit")


def test_embedded_digit_scenes_are_labelled_scenes(tmp_path):
    # The shared test cache ($MAMBAOUT_PL_CACHE): written once for every test that uses the scenes.
    size = embedded.DIGIT_SCENE_SIZE
    dm = make_module(tmp_path, path="builtin:digit_scenes", crop_size=size, resize_scale=(2 * size, size), cache_dir=None)
    assert dm.label_names == ["background", *[str(digit) for digit in range(10)]]
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 1200 and len(dm.datasets["val"]) == 200
    folder = embedded.materialize("builtin:digit_scenes")
    for index in range(20):
        scene = np.asarray(Image.open(folder / "images" / "validation" / f"scene_{index:05d}.png"))
        labels = np.asarray(Image.open(folder / "annotations" / "validation" / f"scene_{index:05d}.png"))
        assert scene.shape == (size, size, 3) and labels.shape == (size, size)
        assert 0.02 < (labels > 0).mean() < 0.5 and labels.max() <= 10
        # Each digit's ink differs from the background in its box: the digits are visible.
        for digit in set(np.unique(labels).tolist()) - {0}:
            rows, columns = np.nonzero(labels == digit)
            box = (slice(rows.min(), rows.max() + 1), slice(columns.min(), columns.max() + 1))
            ink, background = scene[box][labels[box] == digit], scene[box][labels[box] == 0]
            if len(background):
                assert np.abs(ink.mean(0) - background.mean(0)).max() > 40
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, size, size) and batch["mask"].max() <= 255

    # open_dataset reads the scenes as the ADE20K-layout folder they are written as.
    opened = open_dataset("builtin:digit_scenes")
    assert sorted(opened) == ["train", "validation"] and len(opened["validation"]) == 200
    assert {"image", "mask", "name"} <= set(opened["train"].column_names)
    with pytest.raises(DataError, match="is not a classification dataset; embedded classification datasets: 'builtin:digits'"):
        ImageClassificationDataModule(path="builtin:digit_scenes").num_classes
    with pytest.raises(DataError, match="not a segmentation dataset"):
        make_module(tmp_path, path="builtin:digits").num_classes
