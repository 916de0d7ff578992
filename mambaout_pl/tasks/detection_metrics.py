"""COCO scores of a detector, as the official evaluation (``pycocotools.cocoeval.COCOeval``) computes them.

torchmetrics' ``MeanAveragePrecision`` keeps every image's detections and ground truth (masks as
RLE) and runs the COCO evaluation once over all of them at ``compute``; under DDP it gathers the
images of every rank first. The ground truth carries ``iscrowd`` (crowd regions match detections
without counting as misses) and ``area`` (COCO's area ranges read the annotation's area, the mask
area on COCO, for boxes too). Predicted masks are the detector's soft masks thresholded at 0.5.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchmetrics.detection import MeanAveragePrecision

__all__ = ["COCO_SCORES", "MAP_BACKENDS", "coco_scores", "detection_metric", "metric_predictions", "metric_targets"]

MAP_BACKENDS = ("faster_coco_eval", "pycocotools")
#: torchmetrics' result name -> the logged name, for each IoU type.
COCO_SCORES = {
    "map": "mAP",
    "map_50": "mAP_50",
    "map_75": "mAP_75",
    "map_small": "mAP_small",
    "map_medium": "mAP_medium",
    "map_large": "mAP_large",
}


def detection_metric(masks: bool, backend: str = "faster_coco_eval") -> MeanAveragePrecision:
    """COCO box mAP, and mask mAP when ``masks``, with the ``faster_coco_eval`` or ``pycocotools`` backend."""
    if backend not in MAP_BACKENDS:
        raise ValueError(f"map_backend={backend!r} is not one of {list(MAP_BACKENDS)}.")
    iou_type = ("bbox", "segm") if masks else ("bbox",)
    return MeanAveragePrecision(
        box_format="xyxy",
        iou_type=iou_type,
        iou_thresholds=np.linspace(0.5, 0.95, 10).tolist(),
        rec_thresholds=np.linspace(0.0, 1.0, 101).tolist(),
        backend=backend,
    )


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor without its ``tv_tensors`` subclass."""
    return tensor.as_subclass(torch.Tensor)


def metric_predictions(outputs: list[dict[str, torch.Tensor]], masks: bool) -> list[dict[str, torch.Tensor]]:
    """The detector's outputs as ``MeanAveragePrecision`` takes them (masks ``[N, H, W]`` bool)."""
    predictions = []
    for output in outputs:
        prediction = {"boxes": output["boxes"].float(), "scores": output["scores"].float(), "labels": output["labels"]}
        if masks:
            prediction["masks"] = output["masks"][:, 0] > 0.5
        predictions.append(prediction)
    return predictions


def metric_targets(targets: list[dict[str, Any]], masks: bool) -> list[dict[str, torch.Tensor]]:
    """The batch's targets as ``MeanAveragePrecision`` takes them, with ``iscrowd`` and ``area`` where given."""
    converted = []
    for target in targets:
        boxes = _plain(target["boxes"]).float()
        entry = {"boxes": boxes, "labels": _plain(target["labels"]).long()}
        if masks:
            entry["masks"] = _plain(target["masks"]).bool()
        for key in ("iscrowd", "area"):
            if key in target:
                entry[key] = _plain(torch.as_tensor(target[key], device=boxes.device))
        converted.append(entry)
    return converted


def coco_scores(metric: MeanAveragePrecision, prefix: str) -> dict[str, torch.Tensor]:
    """``{prefix}{bbox|segm}_mAP``, ``_mAP_50``, ``_mAP_75``, ``_mAP_small|medium|large`` from ``metric.compute()``.

    A score that COCO leaves undefined (no ground truth in that area range) is -1, as COCOeval reports it.
    """
    results = metric.compute()
    iou_types = metric.iou_type if isinstance(metric.iou_type, tuple) else (metric.iou_type,)
    scores = {}
    for iou_type in iou_types:
        source = f"{iou_type}_" if len(iou_types) > 1 else ""
        for name, logged in COCO_SCORES.items():
            scores[f"{prefix}{iou_type}_{logged}"] = results[f"{source}{name}"].float()
    return scores
