"""SegmentationDataModule: ADE20K-layout folders, parquet, the embedded scenes, bad label maps.

Every dataset here is generated on disk and read through the same calls a user's configuration makes.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import ADE20K_FOLDER_SIZES, ade20k_label_map
from data_helpers import make_segmentation_module
from PIL import Image

from mambaout_pl.data import (
    ADE20K_CLASSES,
    ColumnNotFoundError,
    DataError,
    DataNotFoundError,
    ImageClassificationDataModule,
    InvalidLabelError,
    embedded,
    open_dataset,
)


def test_ade20k_folder_splits_classes_and_batches(ade20k_folder, tmp_path):
    dm = make_segmentation_module(tmp_path, path="ade20k", data_dir=str(ade20k_folder), reduce_zero_label=True)
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
    dm = make_segmentation_module(tmp_path, path="ade20k", data_dir=str(ade20k_folder))
    assert dm.num_classes == 151 and dm.label_names[:2] == ["other", "wall"]
    dm.setup("validate")
    assert set(dm.datasets["val"][0]["mask"].unique().tolist()) == {0, 1, 2}


def test_class_names_file_names_the_classes(ade20k_folder, tmp_path):
    (ade20k_folder / "class_names.txt").write_text("other\nleft\nright\n")
    dm = make_segmentation_module(tmp_path, path="ade20k", data_dir=str(ade20k_folder))
    assert dm.label_names == ["other", "left", "right"]
    dm = make_segmentation_module(tmp_path, path="ade20k", data_dir=str(ade20k_folder), num_classes=5)
    assert dm.label_names == ["0", "1", "2", "3", "4"]
    dm = make_segmentation_module(tmp_path, path="ade20k", data_dir=str(ade20k_folder), label_names=["a", "b", "c"])
    assert dm.num_classes == 3


def test_missing_annotations_folder_is_named(ade20k_folder, tmp_path):
    shutil.rmtree(ade20k_folder / "annotations" / "validation")
    dm = make_segmentation_module(tmp_path, path="ade20k", data_dir=str(ade20k_folder), reduce_zero_label=True)
    expected = str(ade20k_folder / "annotations" / "validation")
    with pytest.raises(
        ColumnNotFoundError, match=f"'validation' has no label maps: folder '{expected}' does not exist"
    ):
        dm.setup("fit")
    # An unlabelled split can still be predicted on.
    dm = make_segmentation_module(
        tmp_path, path="ade20k", data_dir=str(ade20k_folder), reduce_zero_label=True, predict_split="validation"
    )
    batch = next(iter(dm.predict_dataloader()))
    assert "mask" not in batch and batch["name"] == ["ADE_validation_00000000", "ADE_validation_00000001"]


def test_missing_label_map_and_missing_folder_are_named(ade20k_folder, tmp_path):
    missing = ade20k_folder / "annotations" / "training" / "ADE_training_00000002.png"
    missing.unlink()
    with pytest.raises(
        DataNotFoundError,
        match=r"ADE_training_00000002\.jpg' has no label map: expected '.*ADE_training_00000002\.png'",
    ):
        make_segmentation_module(tmp_path, path="ade20k", data_dir=str(ade20k_folder)).num_classes
    with pytest.raises(DataNotFoundError, match="No 'images' folder in data_dir"):
        make_segmentation_module(tmp_path, path="ade20k", data_dir=str(ade20k_folder / "annotations")).num_classes
    with pytest.raises(DataNotFoundError, match="no_such_folder"):
        make_segmentation_module(tmp_path, path="ade20k", data_dir=str(tmp_path / "no_such_folder")).num_classes


def test_mask_of_another_size_names_both_files(ade20k_folder, tmp_path):
    mask_path = ade20k_folder / "annotations" / "training" / "ADE_training_00000001.png"
    Image.fromarray(np.ones((10, 12), np.uint8), mode="L").save(mask_path)
    dm = make_segmentation_module(tmp_path, path="ade20k", data_dir=str(ade20k_folder), reduce_zero_label=True)
    dm.setup("fit")
    with pytest.raises(
        DataError, match=r"ADE_training_00000001\.png' is 12x10 .* image '.*ADE_training_00000001\.jpg' is 40x56"
    ):
        dm.datasets["train"][1]


def test_labels_outside_the_classes_name_the_file_and_the_fix(ade20k_folder, tmp_path):
    # ADE20K's labels run to 150 with 0 = "other": without reduce_zero_label, 150 classes are too few.
    mask_path = ade20k_folder / "annotations" / "training" / "ADE_training_00000000.png"
    labels = ade20k_label_map(48, 40)
    labels[10, 10] = 150
    Image.fromarray(labels, mode="L").save(mask_path)
    dm = make_segmentation_module(tmp_path, path="ade20k", data_dir=str(ade20k_folder), num_classes=150)
    dm.setup("fit")
    with pytest.raises(
        InvalidLabelError, match=r"ADE_training_00000000\.png' holds label value\(s\) 150 .*reduce_zero_label: true"
    ):
        dm.datasets["train"][0]

    labels[10, 10] = 200  # neither a class nor the ignore index, even after reduce_zero_label
    Image.fromarray(labels, mode="L").save(mask_path)
    dm = make_segmentation_module(tmp_path, path="ade20k", data_dir=str(ade20k_folder), reduce_zero_label=True)
    dm.setup("fit")
    with pytest.raises(InvalidLabelError, match=r"value\(s\) 200 .*\[0, 150\).*num_classes` to at least 200"):
        dm.datasets["train"][0]


def test_colour_label_maps_are_refused(ade20k_folder, tmp_path):
    mask_path = ade20k_folder / "annotations" / "training" / "ADE_training_00000000.png"
    Image.new("RGB", (48, 40), (1, 1, 1)).save(mask_path)
    dm = make_segmentation_module(tmp_path, path="ade20k", data_dir=str(ade20k_folder), reduce_zero_label=True)
    dm.setup("fit")
    with pytest.raises(InvalidLabelError, match="is a RGB image; a label map holds one class index per pixel"):
        dm.datasets["train"][0]


def test_parquet_with_image_and_mask_columns(segmentation_parquet, tmp_path):
    dm = make_segmentation_module(
        tmp_path, path="parquet", data_files=segmentation_parquet, num_classes=3, resize_scale=(32, 24)
    )
    assert dm.label_names == ["0", "1", "2"]
    (val,) = list(dm.val_dataloader())
    assert val["mask"].shape == (2, 24, 32) and val["image"].shape == (2, 3, 24, 32)
    assert val["mask"][0, 0].eq(255).all() and val["mask"][0, 1].tolist() == [0] * 11 + [1] * 11 + [2] * 10
    assert val["name"] == ["000000", "000001"]

    with pytest.raises(DataError, match="Set `num_classes`"):
        make_segmentation_module(tmp_path, path="parquet", data_files=segmentation_parquet).num_classes
    with pytest.raises(ColumnNotFoundError, match=r"'label' does not exist.*`mask_column`"):
        make_segmentation_module(
            tmp_path, path="parquet", data_files=segmentation_parquet, num_classes=3, mask_column="label"
        ).setup("fit")


def test_embedded_digit_scenes_are_labelled_scenes(tmp_path):
    # The shared test cache ($MAMBAOUT_PL_CACHE): written once for every test that uses the scenes.
    size = embedded.DIGIT_SCENE_SIZE
    dm = make_segmentation_module(
        tmp_path, path="builtin:digit_scenes", crop_size=size, resize_scale=(2 * size, size), cache_dir=None
    )
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
    with pytest.raises(
        DataError, match="is not a classification dataset; embedded classification datasets: 'builtin:digits'"
    ):
        ImageClassificationDataModule(path="builtin:digit_scenes").num_classes
    with pytest.raises(DataError, match="not a segmentation dataset"):
        make_segmentation_module(tmp_path, path="builtin:digits").num_classes
