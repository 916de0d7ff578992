"""What a detection task shows and writes: pictures with boxes, labels and masks drawn, COCO results json and
the images it refers to."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from pycocotools import mask as mask_utils
from torchvision.transforms.v2.functional import to_pil_image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from mambaout_pl.tasks.prediction_writer import PredictionWriter
from mambaout_pl.tasks.segmentation_outputs import palette
from mambaout_pl.training.atomic import atomic_write
from mambaout_pl.training.run_folders import check_new_output

__all__ = [
    "DetectionResultsWriter",
    "coco_results",
    "dataset_category_ids",
    "detection_panel",
    "draw_detections",
    "label_names_of",
    "objects_from_results",
    "picture_name",
]


def label_names_of(label_names: Sequence[str] | None, category_ids: Sequence[int] | None = None) -> dict[int, str]:
    """``{label: name}`` for labels 1..K, or for the dataset's ``category_ids`` when given."""
    if not label_names:
        return {}
    labels = category_ids if category_ids else range(1, len(label_names) + 1)
    return {int(label): name for label, name in zip(labels, label_names, strict=False)}


def dataset_category_ids(trainer: Trainer | None) -> list[int] | None:
    """The dataset's own category id of each label 1..K, when the data module knows them: its
    ``category_ids``, else the ids of its COCO annotation file's categories (labels follow them in id order)."""
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    category_ids = getattr(datamodule, "category_ids", None)
    if category_ids:
        return [int(category_id) for category_id in category_ids]
    annotation_file = getattr(datamodule, "annotation_file", None)
    path = annotation_file("val") if callable(annotation_file) else None
    if path is None:
        return None
    categories = json.loads(Path(path).read_text()).get("categories") or []
    return sorted(int(category["id"]) for category in categories) or None


def draw_detections(
    image: torch.Tensor,
    objects: Mapping[str, torch.Tensor],
    names: Mapping[int, str] | None = None,
    score_threshold: float = 0.5,
    min_side: int = 256,
) -> torch.Tensor:
    """``image`` (float ``[3, H, W]`` in [0, 1]) with the boxes, labels (and scores) and masks of ``objects`` drawn.

    ``objects`` is a target (``boxes`` XYXY, ``labels``, ``masks`` ``[N, H, W]``) or a detector
    output (with ``scores``, ``masks`` ``[N, 1, H, W]`` probabilities); detections scoring below
    ``score_threshold`` are left out, and labels are shown by their ``names``. Small images are
    enlarged so that the shorter side is at least ``min_side``, to keep the labels legible.
    Returns uint8 ``[3, h, w]``.
    """
    image = image.detach().float().cpu().clamp(0.0, 1.0)
    boxes = objects["boxes"].detach().float().cpu().as_subclass(torch.Tensor)
    labels = objects["labels"].detach().cpu().as_subclass(torch.Tensor)
    scores = objects.get("scores")
    keep = torch.ones(len(boxes), dtype=torch.bool) if scores is None else scores.detach().cpu() >= score_threshold
    boxes, labels = boxes[keep], labels[keep]
    masks = objects.get("masks")
    scale = max(1.0, min_side / min(image.shape[-2:]))
    size = (round(image.shape[-2] * scale), round(image.shape[-1] * scale))
    if scale > 1:
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        boxes = boxes * scale
    picture = (image * 255).round().to(torch.uint8)
    colours = [tuple(int(value) for value in palette(256)[1 + int(label) % 255]) for label in labels]
    if masks is not None and len(boxes):
        masks = masks.detach().float().cpu().as_subclass(torch.Tensor)[keep]
        masks = masks[:, 0] if masks.ndim == 4 else masks
        masks = F.interpolate(masks[None], size=size, mode="bilinear", align_corners=False)[0] > 0.5
        picture = draw_segmentation_masks(picture, masks, alpha=0.45, colors=colours)
    if not len(boxes):
        return picture
    texts = [(names or {}).get(int(label), str(int(label))) for label in labels]
    if scores is not None:
        texts = [f"{text} {score:.2f}" for text, score in zip(texts, scores.detach().cpu()[keep].tolist(), strict=True)]
    return draw_bounding_boxes(picture, boxes, labels=texts, colors=colours, width=2)


def detection_panel(
    image: torch.Tensor,
    target: Mapping[str, torch.Tensor],
    output: Mapping[str, torch.Tensor],
    names: Mapping[int, str] | None = None,
    score_threshold: float = 0.5,
) -> torch.Tensor:
    """``truth | prediction`` side by side, float ``[3, h, 2w]`` in [0, 1], for loggers that take images."""
    truth = draw_detections(image, target, names)
    prediction = draw_detections(image, output, names, score_threshold)
    return torch.cat([truth, prediction], dim=-1).float() / 255.0


def objects_from_results(results: Sequence[Mapping[str, Any]], height: int, width: int) -> dict[str, torch.Tensor]:
    """COCO results of one image as ``boxes`` XYXY, ``labels`` (the category ids), ``scores`` and, with
    segmentations, ``masks`` ``[N, H, W]``, for :func:`draw_detections`."""
    boxes = torch.tensor([result["bbox"] for result in results], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    objects = {
        "boxes": boxes,
        "labels": torch.tensor([result["category_id"] for result in results], dtype=torch.int64),
        "scores": torch.tensor([result["score"] for result in results], dtype=torch.float32),
    }
    if results and "segmentation" in results[0]:
        rles = [dict(result["segmentation"]) for result in results]
        objects["masks"] = torch.from_numpy(mask_utils.decode(rles).transpose(2, 0, 1).copy())
    elif "segmentation" in (results[0] if results else {}):
        objects["masks"] = torch.zeros(0, height, width, dtype=torch.uint8)
    return objects


def coco_results(
    image_id: int,
    output: dict[str, torch.Tensor],
    category_ids: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """One image's detections as COCO results (``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]``,
    ``score`` and, with masks, ``segmentation`` as RLE), labels mapped to ``category_ids[label - 1]``."""
    boxes = output["boxes"].detach().float().cpu().clone()
    boxes[:, 2:] -= boxes[:, :2]
    labels = output["labels"].detach().cpu().tolist()
    scores = output["scores"].detach().float().cpu().tolist()
    rles = None
    if "masks" in output:
        masks = (output["masks"].detach()[:, 0] > 0.5).cpu().numpy().astype(np.uint8)
        rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0))) if len(masks) else []
    results = []
    for index, (box, label, score) in enumerate(zip(boxes.tolist(), labels, scores, strict=True)):
        result = {
            "image_id": int(image_id),
            "category_id": int(category_ids[label - 1]) if category_ids else int(label),
            "bbox": box,
            "score": score,
        }
        if rles is not None:
            rle = rles[index]
            result["segmentation"] = {
                "size": [int(side) for side in rle["size"]],
                "counts": rle["counts"].decode("ascii"),
            }
        results.append(result)
    return results


#: The files :class:`DetectionResultsWriter` writes: COCO results, and the images they refer to.
RESULTS_FILE = "results.json"
IMAGES_FILE = "images.json"


def picture_name(file_name: str, image_id: int) -> str:
    """The picture of an image: its file name (with its sub-folders) as ``.png``, else ``<image_id>.png``."""
    return f"{PurePosixPath(file_name).with_suffix('')}.png" if file_name else f"{image_id}.png"


class DetectionResultsWriter(PredictionWriter):
    """Write ``trainer.predict``'s COCO results to ``output_dir/results.json`` (one list over all images,
    what COCO's evaluation server takes), the images they refer to to ``output_dir/images.json`` (COCO's
    ``images`` entries: ``id`` as the results' ``image_id``, ``file_name``, and the ``width`` and ``height``
    the boxes are in), and the first ``num_pictures`` images with their detections drawn to
    ``output_dir/pictures/<file name>.png`` (sub-folders kept; ``<image_id>.png`` for an image without a file).

    ``output_dir`` ``None``: ``<trainer.log_dir>/predict``, the run's version folder; an earlier
    ``results.json`` or picture is never overwritten (:class:`~mambaout_pl.errors.OutputExistsError`). Each prediction is
    ``{"image_id": [...], "results": [[COCO result, ...], ...]}`` per batch (see
    ``ObjectDetectionTask.predict_step``); pictures are drawn on the batch's images, with the
    ``label_names`` of labels 1..K (of the data module's ``category_ids`` when it has them). Under DDP the
    ranks' results are gathered and rank 0 writes the files.
    """

    def __init__(
        self,
        output_dir: str | Path | None = None,
        num_pictures: int = 8,
        label_names: Sequence[str] | None = None,
        score_threshold: float = 0.5,
    ) -> None:
        super().__init__(output_dir)
        self.num_pictures = num_pictures
        self.label_names = label_names
        self.score_threshold = score_threshold
        self.names: dict[int, str] = {}
        self.folder: Path | None = None  # the folder written to, once predicting
        self._results: list[dict[str, Any]] = []
        self._images: list[dict[str, Any]] = []
        self._pictures_written = 0

    def reserved_output(self, folder: Path) -> Path:
        return folder / RESULTS_FILE

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.folder = self.output_folder(trainer)
        check_new_output(self.folder / RESULTS_FILE)
        check_new_output(self.folder / IMAGES_FILE)
        self._results = []
        self._images = []
        self._pictures_written = 0
        self.names = label_names_of(self.label_names, dataset_category_ids(trainer))

    def write_batch(self, trainer: Trainer, prediction: Any, batch: Any, batch_indices: Sequence[int] | None) -> None:
        file_names = batch.get("file_names") or [""] * len(prediction["image_id"])
        for index, (image_id, results) in enumerate(zip(prediction["image_id"], prediction["results"], strict=True)):
            self._results.extend(results)
            image = batch["images"][index]
            height, width = image.shape[-2:]
            self._images.append({"id": int(image_id), "file_name": file_names[index], "width": width, "height": height})
            if trainer.is_global_zero and self._pictures_written < self.num_pictures:
                objects = objects_from_results(results, height, width)
                picture = to_pil_image(draw_detections(image, objects, self.names, self.score_threshold))
                path = self.folder / "pictures" / picture_name(file_names[index], image_id)
                check_new_output(path)
                atomic_write(path, lambda file, picture=picture: picture.save(file, format="PNG"), exclusive=True)
                self._pictures_written += 1

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        results, images = self._results, self._images
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            gathered: list[tuple[list[dict[str, Any]], list[dict[str, Any]]]] = [([], [])] * trainer.world_size
            dist.all_gather_object(gathered, (results, images))
            results = [result for part, _ in gathered for result in part]
            images = [image for _, part in gathered for image in part]
        if trainer.is_global_zero:
            images = sorted({image["id"]: image for image in images}.values(), key=lambda image: image["id"])
            for name, content in ((IMAGES_FILE, images), (RESULTS_FILE, results)):
                path = self.folder / name
                atomic_write(
                    path, lambda file, content=content: file.write(json.dumps(content).encode()), exclusive=True
                )
            rank_zero_info(f"COCO results ({len(results)} detections of {len(images)} images) written to {path}")
        self._results, self._images = [], []
