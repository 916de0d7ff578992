"""Segmentation scores as mmsegmentation's ``IoUMetric`` reports them on ADE20K, degenerate inputs included.

Areas are summed over every scored pixel of the dataset before dividing, not averaged per image.
A pixel is scored unless its label is ``ignore_index`` (also when ``ignore_index`` is a class
index: that class is then never labelled, and a prediction of it only counts against it). For
each class: its intersection (labelled and predicted so), its label area and its prediction area,
where a label outside ``[0, num_classes)`` counts for no class but its pixel's prediction still
counts in that prediction's area (mmsegmentation's histograms drop values outside the range). Then
``IoU`` = intersection / union (NaN for a class neither labelled nor predicted), ``Acc`` =
intersection / label area (NaN for a class never labelled), ``mIoU`` and ``mAcc`` their means over
the non-NaN classes (NaN when every class is NaN), and ``aAcc`` all intersections over all label
areas (NaN when no pixel is scored). mmsegmentation sums its areas in float32; here they are
counted exactly (int64) and divided in float64.

torchmetrics has no metric with these semantics: ``MulticlassJaccardIndex`` drops an
``ignore_index`` that is a class from its mean and fails on labels outside the classes,
``MulticlassAccuracy(average="macro")`` counts a class that is predicted but absent as 0, and
``torchmetrics.segmentation.MeanIoU`` averages per image and has no ignore index. So the state is
one summed confusion matrix (:class:`SegmentationConfusion`), synchronised across processes by
torchmetrics, and every score comes from it (:func:`confusion_scores`).
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric, MetricCollection


class SegmentationConfusion(Metric):
    """The summed confusion matrix ``[K + 1, K + 1]`` of ``K`` classes: rows labels, columns predictions, the
    last row and column the labels and predictions outside ``[0, K)``; pixels labelled ``ignore_index`` are
    left out. ``update(predictions, labels)`` takes class indices of any equal shape."""

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int = 255, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be >= 1.")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        size = num_classes + 1
        self.add_state("matrix", default=torch.zeros(size, size, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predictions: torch.Tensor, labels: torch.Tensor) -> None:
        if predictions.shape != labels.shape:
            raise ValueError(
                f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} differ in shape."
            )
        scored = labels != self.ignore_index
        classes = self.num_classes
        rows = self._class_or_outside(labels[scored].long())
        columns = self._class_or_outside(predictions[scored].long())
        counts = torch.bincount(rows * (classes + 1) + columns, minlength=(classes + 1) ** 2)
        self.matrix += counts.reshape(classes + 1, classes + 1)

    def _class_or_outside(self, indices: torch.Tensor) -> torch.Tensor:
        inside = (indices >= 0) & (indices < self.num_classes)
        return torch.where(inside, indices, self.num_classes)

    def compute(self) -> torch.Tensor:
        return self.matrix


class SegmentationMeanIoU(SegmentationConfusion):
    """``mIoU`` of :func:`confusion_scores` (it shares :class:`SegmentationConfusion`'s state in a collection)."""

    higher_is_better = True

    def compute(self) -> torch.Tensor:
        return confusion_scores(self.matrix)["mIoU"]


def segmentation_metrics(num_classes: int, ignore_index: int = 255, prefix: str = "val/") -> MetricCollection:
    """``mIoU`` and the summed ``confusion`` matrix (see :class:`SegmentationConfusion`), sharing one state."""
    return MetricCollection(
        {
            "mIoU": SegmentationMeanIoU(num_classes, ignore_index),
            "confusion": SegmentationConfusion(num_classes, ignore_index),
        },
        prefix=prefix,
        compute_groups=[["mIoU", "confusion"]],
    )


def confusion_scores(confusion: torch.Tensor) -> dict[str, torch.Tensor]:
    """``mIoU``, ``mAcc``, ``aAcc`` and per-class ``IoU`` and ``Acc`` (see the module docstring) from the
    ``[K + 1, K + 1]`` matrix of :class:`SegmentationConfusion`."""
    confusion = confusion.double()
    classes = confusion.shape[0] - 1
    intersection = confusion.diagonal()[:classes]
    label_area = confusion[:classes].sum(dim=1)
    prediction_area = confusion[:, :classes].sum(dim=0)
    union = label_area + prediction_area - intersection
    iou = intersection / union  # 0 / 0: NaN
    accuracy = intersection / label_area
    return {
        "mIoU": iou.nanmean(),
        "mAcc": accuracy.nanmean(),
        "aAcc": intersection.sum() / label_area.sum(),
        "IoU": iou,
        "Acc": accuracy,
    }
