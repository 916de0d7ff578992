"""Data: open datasets (Hub, image folder, parquet, ADE20K or COCO folder, saved-to-disk, embedded) and batch them."""

from mambaout_pl.data.ade20k import ADE20K_CLASSES, load_ade20k_folder
from mambaout_pl.data.base import BaseDataModule
from mambaout_pl.data.batches import (
    ClassificationBatch,
    DetectionBatch,
    DetectionTarget,
    SegmentationEvalBatch,
    SegmentationTrainBatch,
)
from mambaout_pl.data.classification import ImageClassificationDataModule
from mambaout_pl.data.detection import DetectionDataModule
from mambaout_pl.data.errors import (
    AnnotationFormatError,
    ColumnNotFoundError,
    CorruptImageError,
    DataError,
    DataNotFoundError,
    InvalidLabelError,
    SplitNotFoundError,
)
from mambaout_pl.data.segmentation import SegmentationDataModule
from mambaout_pl.data.segmentation_transforms import create_segmentation_transforms
from mambaout_pl.data.sources import open_dataset
from mambaout_pl.data.transforms import create_classification_transforms

__all__ = [
    "BaseDataModule",
    "ImageClassificationDataModule",
    "SegmentationDataModule",
    "DetectionDataModule",
    "ClassificationBatch",
    "SegmentationTrainBatch",
    "SegmentationEvalBatch",
    "DetectionBatch",
    "DetectionTarget",
    "open_dataset",
    "load_ade20k_folder",
    "ADE20K_CLASSES",
    "create_classification_transforms",
    "create_segmentation_transforms",
    "DataError",
    "DataNotFoundError",
    "SplitNotFoundError",
    "ColumnNotFoundError",
    "InvalidLabelError",
    "CorruptImageError",
    "AnnotationFormatError",
]
