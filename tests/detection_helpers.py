"""Hand-built detection batches and COCO files for the detection task and metric tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils

# Each class is a solid square of its own colour on a grey background, so boxes, masks and labels are learnable.
CLASS_COLOURS = ((0.9, 0.1, 0.1), (0.1, 0.9, 0.1), (0.1, 0.1, 0.9))
SMALL_TASK = dict(
    backbone="mambaout_femto",
    num_classes=3,
    min_size=64,
    max_size=96,
    anchor_sizes=(8, 16, 32, 64, 128),
    fpn_channels=32,
    box_batch_size_per_image=32,
    box_detections_per_img=10,
    num_val_images=2,
)


def square_scene(
    generator: torch.Generator, size: tuple[int, int] = (64, 64), count: int = 2
) -> tuple[torch.Tensor, dict]:
    """A grey image with ``count`` coloured squares (label = colour) that do not overlap, and its target."""
    height, width = size
    image = torch.full((3, height, width), 0.5)
    boxes, labels, masks = [], [], []
    occupied = torch.zeros(height, width, dtype=torch.bool)
    while len(boxes) < count:
        side = int(torch.randint(12, 24, (1,), generator=generator))
        x = int(torch.randint(0, width - side, (1,), generator=generator))
        y = int(torch.randint(0, height - side, (1,), generator=generator))
        if occupied[y : y + side, x : x + side].any():
            continue
        occupied[y : y + side, x : x + side] = True
        label = int(torch.randint(1, len(CLASS_COLOURS) + 1, (1,), generator=generator))
        image[:, y : y + side, x : x + side] = torch.tensor(CLASS_COLOURS[label - 1])[:, None, None]
        mask = torch.zeros(height, width, dtype=torch.uint8)
        mask[y : y + side, x : x + side] = 1
        boxes.append([x, y, x + side, y + side])
        labels.append(label)
        masks.append(mask)
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": torch.stack(masks),
        "iscrowd": torch.zeros(count, dtype=torch.int64),
        "area": torch.stack(masks).flatten(1).sum(1).float(),
    }
    return image, target


def square_batch(seed: int = 0, images: int = 2, first_id: int = 1) -> dict[str, list]:
    """A ``DetectionBatch`` of :func:`square_scene` images with image ids ``first_id``, ``first_id + 1``, ..."""
    generator = torch.Generator().manual_seed(seed)
    batch: dict[str, list] = {"images": [], "targets": []}
    for index in range(images):
        image, target = square_scene(generator)
        target["image_id"] = first_id + index
        batch["images"].append(image)
        batch["targets"].append(target)
    return batch


def _ellipse(height: int, width: int, box: list[float]) -> np.ndarray:
    x1, y1, x2, y2 = box
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, max((x2 - x1) / 2, 1), max((y2 - y1) / 2, 1)
    return (((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1).astype(np.uint8)


def evaluation_case(seed: int = 1) -> tuple[list[dict], list[dict], list[tuple[int, int]]]:
    """Ground truth and detector outputs for a few images, with every kind of case COCO scores.

    Small, medium and large objects (by COCO's area ranges), three classes, a crowd region,
    an image without objects, missed objects, duplicates, detections of the wrong class and
    false positives; detections carry soft masks ``[N, 1, H, W]`` as the detector returns them.
    Returns targets (with ``image_id``, ``iscrowd``, ``area``), outputs, and image sizes.
    """
    rng = np.random.default_rng(seed)
    sizes = [(200, 240), (160, 200), (240, 180), (120, 160), (180, 220)]
    targets, outputs = [], []
    for index, (height, width) in enumerate(sizes):
        count = 0 if index == 3 else int(rng.integers(2, 6))
        boxes, labels, masks, crowd = [], [], [], []
        for _ in range(count):
            side = float(rng.choice([14.0, 24.0, 50.0, 110.0])) * float(rng.uniform(0.8, 1.2))
            w, h = min(side * float(rng.uniform(0.7, 1.3)), width - 2), min(side, height - 2)
            x1, y1 = float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h))
            box = [x1, y1, x1 + w, y1 + h]
            boxes.append(box)
            labels.append(int(rng.integers(1, 4)))
            masks.append(_ellipse(height, width, box))
            crowd.append(0)
        if index == 1:  # a crowd region: detections inside it are neither hits nor misses
            crowd[-1] = 1
        gt_masks = torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, height, width, dtype=torch.uint8)
        targets.append(
            {
                "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor(labels, dtype=torch.int64),
                "masks": gt_masks,
                "iscrowd": torch.tensor(crowd, dtype=torch.int64),
                "area": gt_masks.flatten(1).sum(1).float(),
                "image_id": 10 * (index + 1),
            }
        )
        det_boxes, det_labels, det_scores, det_masks = [], [], [], []
        for box, label in zip(boxes, labels, strict=True):
            for _ in range(int(rng.integers(0, 3))):  # 0: a miss; 2: a duplicate
                jitter = rng.normal(0, 0.08 * (box[2] - box[0]), 4)
                x1, y1 = max(box[0] + jitter[0], 0.0), max(box[1] + jitter[1], 0.0)
                x2, y2 = min(box[2] + jitter[2], width - 1.0), min(box[3] + jitter[3], height - 1.0)
                if x2 <= x1 + 1 or y2 <= y1 + 1:
                    continue
                det_boxes.append([x1, y1, x2, y2])
                det_labels.append(label if rng.uniform() < 0.8 else int(rng.integers(1, 4)))
                det_scores.append(float(rng.uniform(0.05, 1.0)))
                det_masks.append(_ellipse(height, width, [x1, y1, x2, y2]) * float(rng.uniform(0.55, 1.0)))
        for _ in range(int(rng.integers(0, 3))):  # false positives
            x1, y1 = float(rng.uniform(0, width - 30)), float(rng.uniform(0, height - 30))
            det_boxes.append([x1, y1, x1 + float(rng.uniform(8, 30)), y1 + float(rng.uniform(8, 30))])
            det_labels.append(int(rng.integers(1, 4)))
            det_scores.append(float(rng.uniform(0.05, 0.6)))
            det_masks.append(_ellipse(height, width, det_boxes[-1]) * 0.7)
        soft = np.stack(det_masks)[:, None] if det_masks else np.zeros((0, 1, height, width))
        outputs.append(
            {
                "boxes": torch.tensor(det_boxes, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor(det_labels, dtype=torch.int64),
                "scores": torch.tensor(det_scores, dtype=torch.float32),
                "masks": torch.from_numpy(soft).float(),
            }
        )
    return targets, outputs, sizes


def write_coco_ground_truth(
    path: Path, targets: list[dict], sizes: list[tuple[int, int]], category_ids: tuple[int, ...] = (1, 2, 3)
) -> Path:
    """The targets as a COCO instances json file (``bbox`` XYWH, RLE ``segmentation``, ``area``, ``iscrowd``),
    label ``l`` written as category ``category_ids[l - 1]``."""
    images, annotations = [], []
    for target, (height, width) in zip(targets, sizes, strict=True):
        images.append(
            {"id": target["image_id"], "height": height, "width": width, "file_name": f"{target['image_id']}.png"}
        )
        for box, label, mask, crowd, area in zip(
            target["boxes"].tolist(),
            target["labels"].tolist(),
            target["masks"].numpy(),
            target["iscrowd"].tolist(),
            target["area"].tolist(),
            strict=True,
        ):
            rle = mask_utils.encode(np.asfortranarray(mask))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": target["image_id"],
                    "category_id": category_ids[label - 1],
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                    "area": area,
                    "iscrowd": crowd,
                    "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")},
                }
            )
    categories = [{"id": category_id, "name": str(category_id)} for category_id in category_ids]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def coco_eval_stats(ground_truth: Path, results: Path, iou_type: str) -> list[float]:
    """The official COCO evaluation (pycocotools' ``COCOeval``) of a results file on a ground-truth file:
    AP, AP50, AP75, AP small, medium, large."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco = COCO(str(ground_truth))
    evaluation = COCOeval(coco, coco.loadRes(str(results)), iou_type)
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    return [float(value) for value in evaluation.stats[:6]]
