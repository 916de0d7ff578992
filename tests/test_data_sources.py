"""open_dataset and the sources a data module opens: builders, parquet, save_to_disk, errors.

Every dataset here is generated on disk and read through the same calls a user's configuration makes.
"""

from __future__ import annotations

import datasets
import pytest
import torch
from data_helpers import IMAGE_FOLDER_CLASSES, make_classification_module, to_pixels, uniform_png, write_parquet

from mambaout_pl.data import (
    DataError,
    DataNotFoundError,
    SplitNotFoundError,
    open_dataset,
)


def test_parquet_with_integer_labels(tmp_path):
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250)]
    train = write_parquet(tmp_path / "train.parquet", [(uniform_png(colours[i % 3]), i % 3) for i in range(9)])
    val = write_parquet(tmp_path / "val.parquet", [(uniform_png(colours[i]), i) for i in (2, 0, 1)])
    dm = make_classification_module(
        tmp_path, path="parquet", data_files={"train": str(train), "validation": str(val)}, image_size=16, crop_pct=1.0
    )
    assert dm.num_classes == 3 and dm.label_names == ["0", "1", "2"]  # counted: no ClassLabel

    batch = next(iter(dm.val_dataloader()))
    assert batch["label"].tolist() == [2, 0, 1]
    pixels = to_pixels(batch["image"])
    expected = torch.tensor([colours[2], colours[0], colours[1]], dtype=torch.float32).view(3, 3, 1, 1)
    assert torch.allclose(pixels, expected.expand_as(pixels), atol=0.5)


def test_save_to_disk_folder(image_folder, tmp_path):
    saved = tmp_path / "saved"
    loaded = datasets.load_dataset("imagefolder", data_dir=str(image_folder), cache_dir=str(tmp_path / "c"))
    loaded.save_to_disk(str(saved))
    dm = make_classification_module(tmp_path, path=str(saved))
    assert dm.label_names == list(IMAGE_FOLDER_CLASSES)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 24 and len(dm.datasets["val"]) == 12
    batch = next(iter(dm.val_dataloader()))
    assert torch.equal(to_pixels(batch["image"]).mean(dim=(2, 3)).argmax(dim=1), batch["label"])

    # A single saved Dataset becomes the "train" split, validated on a hold-out.
    single = tmp_path / "single"
    loaded["validation"].save_to_disk(str(single))
    dm = make_classification_module(tmp_path, path=str(single), val_fraction=0.25)
    dm.setup("fit")
    assert (len(dm.datasets["train"]), len(dm.datasets["val"])) == (9, 3)


def test_missing_data_dir_and_local_path(tmp_path):
    missing = tmp_path / "no_such_folder"
    with pytest.raises(DataNotFoundError, match=str(missing)) as error:
        make_classification_module(tmp_path, path="imagefolder", data_dir=str(missing)).num_classes
    assert "data_dir" in str(error.value)
    with pytest.raises(DataNotFoundError, match=str(missing)):
        make_classification_module(tmp_path, path=str(missing)).num_classes
    with pytest.raises(DataNotFoundError, match="missing.parquet"):
        open_dataset("parquet", data_files={"train": str(tmp_path / "missing.parquet")})


def test_datasets_errors_are_wrapped_with_the_cause(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="Cannot open dataset path='imagefolder'") as error:
        open_dataset("imagefolder", data_dir=str(tmp_path / "empty"), cache_dir=str(tmp_path / "c"))
    assert isinstance(error.value.__cause__, FileNotFoundError)  # datasets' own error, chained


def test_missing_split_names_available_splits_and_argument(image_folder, tmp_path):
    dm = make_classification_module(tmp_path, path="imagefolder", data_dir=str(image_folder), train_split="training")
    with pytest.raises(SplitNotFoundError, match=r"'training'.*\['train', 'validation'\].*`train_split`"):
        dm.num_classes
    dm = make_classification_module(tmp_path, path="imagefolder", data_dir=str(image_folder), test_split="test")
    with pytest.raises(SplitNotFoundError, match=r"`test_split`"):
        dm.setup("test")
    with pytest.raises(DataError, match="test_split"):
        make_classification_module(tmp_path, path="imagefolder", data_dir=str(image_folder)).setup("test")
