"""Tasks: LightningModules that train and evaluate a network."""

from mambaout_pl.tasks.base import BaseTask
from mambaout_pl.tasks.classification import ClassificationTask
from mambaout_pl.tasks.detection import InstanceSegmentationTask, ObjectDetectionTask
from mambaout_pl.tasks.segmentation import SegmentationTask

__all__ = [
    "BaseTask",
    "ClassificationTask",
    "InstanceSegmentationTask",
    "ObjectDetectionTask",
    "SegmentationTask",
]
