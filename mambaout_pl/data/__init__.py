"""Data: open datasets (Hub, image folder, parquet, saved-to-disk, embedded) and batch them."""

from mambaout_pl.data.classification import ImageClassificationDataModule
from mambaout_pl.data.sources import (
    ColumnNotFoundError,
    CorruptImageError,
    DataError,
    DataNotFoundError,
    InvalidLabelError,
    SplitNotFoundError,
    open_dataset,
)
from mambaout_pl.data.transforms import create_classification_transforms

__all__ = [
    "ImageClassificationDataModule",
    "open_dataset",
    "create_classification_transforms",
    "DataError",
    "DataNotFoundError",
    "SplitNotFoundError",
    "ColumnNotFoundError",
    "InvalidLabelError",
    "CorruptImageError",
]
