"""Split checks: missing columns, labels out of range.

Every dataset here is generated on disk and read through the same calls a user's configuration makes.
"""

from __future__ import annotations

import pytest
from data_helpers import make_classification_module, uniform_png, write_parquet

from mambaout_pl.data import (
    ColumnNotFoundError,
    InvalidLabelError,
)


@pytest.mark.parametrize("argument,column", [("label_column", "target"), ("image_column", "img")])
def test_missing_column_names_available_columns_and_argument(image_folder, tmp_path, argument, column):
    dm = make_classification_module(tmp_path, path="imagefolder", data_dir=str(image_folder), **{argument: column})
    with pytest.raises(ColumnNotFoundError, match=rf"'{column}'.*\['image', 'label'\].*`{argument}`"):
        dm.setup("fit")


def test_label_out_of_range_names_value_row_and_column(tmp_path):
    colour = (10, 20, 30)
    train = write_parquet(tmp_path / "train.parquet", [(uniform_png(colour), i % 3) for i in range(6)])
    val = write_parquet(tmp_path / "val.parquet", [(uniform_png(colour), label) for label in (0, 1, 7, 2, 9)])
    dm = make_classification_module(tmp_path, path="parquet", data_files={"train": str(train), "validation": str(val)})
    assert dm.num_classes == 3
    expected = r"Label 7 at row 2 of column 'label' in split 'validation'.*\[0, 3\); 2 row"
    with pytest.raises(InvalidLabelError, match=expected):
        dm.setup("fit")

    unlabelled = write_parquet(tmp_path / "test.parquet", [(uniform_png(colour), -1)] * 2)
    files = {"train": str(train), "validation": str(train), "test": str(unlabelled)}
    dm = make_classification_module(tmp_path, path="parquet", data_files=files, test_split="test", predict_split="test")
    with pytest.raises(InvalidLabelError, match=r"Label -1 .*predict_split"):
        dm.setup("test")
    dm.setup("predict")  # unlabelled data is fine for prediction
    assert next(iter(dm.predict_dataloader()))["label"].tolist() == [-1, -1]
