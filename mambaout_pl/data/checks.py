"""Checks of a split against the configuration: columns, emptiness, integer labels in range."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pyarrow as pa
from datasets import Dataset, IterableDataset

from mambaout_pl.data.errors import ColumnNotFoundError, DataError, InvalidLabelError


def check_columns(dataset: Dataset | IterableDataset, columns: Mapping[str, str], split: str = "") -> None:
    """Raise if a column named by the argument -> column mapping ``columns`` is missing.

    A streaming dataset whose columns are unknown until it is read is not checked.
    """
    available = dataset.column_names
    if available is None:
        return
    for argument, column in columns.items():
        if column not in available:
            where = f" in split {split!r}" if split else ""
            raise ColumnNotFoundError(
                f"Column {column!r} does not exist{where}; available columns: {available}. "
                f"Set `{argument}` to one of them."
            )


def check_not_empty(dataset: Dataset | IterableDataset, split: str, argument: str, path: str = "") -> None:
    """Raise if a map-style split has no rows (a streamed split's length is unknown until read)."""
    if isinstance(dataset, Dataset) and len(dataset) == 0:
        of = f" of {path!r}" if path else ""
        raise DataError(
            f"Split {split!r}{of} is empty: it has no examples. Add data to it, or set `{argument}` to a "
            "split that has some."
        )


def integer_labels(dataset: Dataset, column: str, split: str) -> np.ndarray:
    """The label column of a map-style dataset as integers, read without decoding any image.

    Raises if the column is not integer-typed or has a missing value.
    """
    table = dataset.select_columns([column]).with_format("arrow")[:]
    array = table.column(column).combine_chunks()
    if not pa.types.is_integer(array.type):
        raise InvalidLabelError(
            f"Column {column!r} of split {split!r} holds {array.type} values, not integer class "
            "indices. Set `label_column` to an integer or ClassLabel column, or encode the labels "
            "first (e.g. `dataset.class_encode_column`)."
        )
    if array.null_count:
        row = int(np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[0])
        raise InvalidLabelError(f"Column {column!r} of split {split!r} has a missing label at row {row}.")
    return array.to_numpy(zero_copy_only=False)


def check_labels(dataset: Dataset, column: str, num_classes: int, split: str) -> None:
    """Raise if any label is missing or outside ``[0, num_classes)``; vectorised over the column."""
    values = integer_labels(dataset, column, split)
    bad = np.flatnonzero((values < 0) | (values >= num_classes))
    if bad.size:
        row = int(bad[0])
        hint = " (-1 usually marks an unlabelled split: use it as `predict_split`)" if values[row] == -1 else ""
        raise InvalidLabelError(
            f"Label {int(values[row])} at row {row} of column {column!r} in split {split!r} is outside "
            f"[0, {num_classes}){hint}; {bad.size} row(s) are out of range. Fix the labels, or check "
            "`label_column` and that every split uses the train split's classes."
        )
