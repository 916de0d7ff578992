"""ImageClassificationDataModule: class names, labels and batches of an image folder.

Every dataset here is generated on disk and read through the same calls a user's configuration makes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from data_helpers import IMAGE_FOLDER_CLASSES, make_classification_module, to_pixels

from mambaout_pl.data import DataNotFoundError, InvalidLabelError


def test_image_folder_classes_batches_and_labels(image_folder, tmp_path):
    dm = make_classification_module(tmp_path, path="imagefolder", data_dir=str(image_folder), batch_size=5)
    assert dm.num_classes == 3  # known right after construction, before setup
    assert dm.label_names == list(IMAGE_FOLDER_CLASSES)

    dm.setup("fit")
    assert len(dm.datasets["train"]) == 24 and len(dm.datasets["val"]) == 12  # the folder's own split

    train_batches = list(dm.train_dataloader())
    assert len(train_batches) == 4  # 24 // 5, last incomplete batch dropped
    val_batches = list(dm.val_dataloader())
    assert [len(batch["label"]) for batch in val_batches] == [5, 5, 2]
    for batch in train_batches + val_batches:
        assert set(batch) == {"image", "label"}
        assert batch["image"].dtype == torch.float32 and batch["label"].dtype == torch.long
        assert batch["image"].shape[1:] == (3, 32, 32)
        # The folder's class colours: red cat (0), green dog (1), blue fish (2).
        dominant_channel = to_pixels(batch["image"]).mean(dim=(2, 3)).argmax(dim=1)
        assert torch.equal(dominant_channel, batch["label"])

    # Labels follow the class folder names, row by row.
    raw = dm.datasets["train"].dataset
    for row in raw:
        assert Path(row["image"]["path"]).parent.name == dm.label_names[row["label"]]
    assert sorted(torch.cat([b["label"] for b in val_batches]).tolist()) == [0] * 4 + [1] * 4 + [2] * 4


def test_label_names_given_are_checked_against_the_folders(image_folder, tmp_path):
    renamed = make_classification_module(
        tmp_path, path="imagefolder", data_dir=str(image_folder), label_names=["kitten", "puppy", "goldfish"]
    )
    assert renamed.num_classes == 3 and renamed.label_names == ["kitten", "puppy", "goldfish"]
    with pytest.raises(InvalidLabelError, match=r"names its classes \['cat', 'dog', 'fish'\], but `label_names` names"):
        renamed.setup("fit")
    same = make_classification_module(
        tmp_path, path="imagefolder", data_dir=str(image_folder), label_names=list(IMAGE_FOLDER_CLASSES)
    )
    same.setup("fit")
    assert len(same.datasets["train"]) == 24


def test_predict_images_are_read_without_labels_and_without_the_training_source(image_folder, tmp_path):
    dm = make_classification_module(
        tmp_path,
        path="imagefolder",
        data_dir=str(tmp_path / "deleted"),  # the training data is not needed to predict
        label_names=["a", "b", "c"],
        predict_images=str(image_folder / "validation"),  # class sub-folders: no labels all the same
        eval_batch_size=5,
    )
    dm.setup("predict")
    batches = list(dm.predict_dataloader())
    assert [len(batch["file"]) for batch in batches] == [5, 5, 2]
    files = [file for batch in batches for file in batch["file"]]
    assert files == sorted(str(path) for path in (image_folder / "validation").rglob("*.png"))
    assert all(set(batch) == {"image", "file"} for batch in batches)
    dominant_channel = torch.cat([to_pixels(batch["image"]).mean(dim=(2, 3)).argmax(dim=1) for batch in batches])
    assert [IMAGE_FOLDER_CLASSES[channel] for channel in dominant_channel] == [Path(f).parent.name for f in files]


def test_predict_images_that_are_not_there_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    for images, message in (
        (tmp_path / "missing", r"predict_images: '.*missing' is neither a folder, an image file nor a glob"),
        (tmp_path / "empty", r"predict_images = '.*empty' holds no image files"),
    ):
        dm = make_classification_module(tmp_path, label_names=["a", "b"], predict_images=str(images))
        with pytest.raises(DataNotFoundError, match=message):
            dm.setup("predict")
