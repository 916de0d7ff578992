"""Segmentation scores as mmsegmentation reports them on ADE20K.

Intersections and unions are summed over every scored pixel of the dataset (pixels labelled
``ignore_index`` are left out) before dividing, not averaged per image. From the summed confusion
matrix: ``IoU`` per class (NaN for a class neither present nor predicted), ``Acc`` per class
(NaN for a class absent from the labels), ``mIoU`` and ``mAcc`` their means over the non-NaN
classes, and ``aAcc`` the share of all scored pixels predicted right.

torchmetrics' ``MulticlassJaccardIndex(average="macro", ignore_index=...)`` computes this very
mIoU (it skips classes neither present nor predicted) and is used for it. Its
``MulticlassAccuracy(average="macro")`` is not mmsegmentation's mAcc (it counts a class that is
predicted but absent as 0), and ``torchmetrics.segmentation.MeanIoU`` averages per image and has no
ignore index, so mAcc, aAcc and the per-class scores come from the confusion matrix.
"""

from __future__ import annotations

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassJaccardIndex


def segmentation_metrics(num_classes: int, ignore_index: int = 255, prefix: str = "val/") -> MetricCollection:
    """``mIoU`` and the summed ``confusion`` matrix (rows: labels, columns: predictions), sharing one state."""
    return MetricCollection(
        {
            "mIoU": MulticlassJaccardIndex(num_classes, average="macro", ignore_index=ignore_index),
            "confusion": MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index),
        },
        prefix=prefix,
        compute_groups=[["mIoU", "confusion"]],
    )


def confusion_scores(confusion: torch.Tensor) -> dict[str, torch.Tensor]:
    """``mIoU``, ``mAcc``, ``aAcc`` and per-class ``IoU`` and ``Acc`` from a summed confusion matrix."""
    confusion = confusion.double()
    intersection = confusion.diagonal()
    label_area = confusion.sum(dim=1)
    union = label_area + confusion.sum(dim=0) - intersection
    nan = torch.tensor(float("nan"), dtype=confusion.dtype, device=confusion.device)
    iou = torch.where(union > 0, intersection / union.clamp_min(1), nan)
    accuracy = torch.where(label_area > 0, intersection / label_area.clamp_min(1), nan)
    return {
        "mIoU": iou.nanmean(),
        "mAcc": accuracy.nanmean(),
        "aAcc": intersection.sum() / label_area.sum().clamp_min(1),
        "IoU": iou,
        "Acc": accuracy,
    }
