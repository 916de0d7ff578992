"""DetectionDataModule: images with boxes, classes and instance masks, from a COCO folder, the Hub, parquet or ``builtin:digit_detection``.

The source, splits, loaders and batch sizes are ``BaseDataModule``'s. Every source is read as rows
of an image and an objects column, the layout of the Hub's detection datasets (e.g.
``detection-datasets/coco``): per object a box, a category (a ``ClassLabel``), and optionally an
area, a crowd flag and a mask. A COCO folder (``path: coco``) and the embedded digits are read by
``coco.py`` into that layout (``objects.category`` is the category's index in id order), so all
sources go through the same checks and the same decoder.

Before training, the objects of each map-style split are checked without decoding any image:
a category outside the classes, a box that is not 4 finite numbers or has a negative size, a crowd
flag other than 0 or 1, a negative area, and polygons or RLE masks that break COCO's format (or,
with ``width``/``height`` columns, whose RLE size is not the image's) raise, naming the row and the
object; boxes with no width or height, or outside their image, are left out and boxes reaching
past the border are clipped, with one counted warning per split (outside the image: where the data has ``width`` and ``height`` columns, as COCO's and most
Hub datasets do; else the decoder clips and drops them alike, uncounted). A few image headers are
compared with those sizes, to catch annotations that belong to other images.
Training leaves out crowd regions and the images with no object left; evaluation keeps
every image, and the crowd regions marked ``iscrowd``, for the COCO evaluation to ignore.
Evaluation images keep their original size: torchvision's detectors resize inside and return
boxes in the pixels of the image they were given, where COCO's area ranges are defined.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import ClassLabel, Dataset, IterableDataset
from datasets import Image as ImageFeature
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2.functional import pil_to_tensor

from mambaout_pl.data import embedded
from mambaout_pl.data.base import BaseDataModule
from mambaout_pl.data.batches import DetectionBatch, DetectionTarget
from mambaout_pl.data.coco import decode_segmentation
from mambaout_pl.data.coco_format import AnnotationProblems, segmentation_problem
from mambaout_pl.data.detection_transforms import create_detection_transforms
from mambaout_pl.data.errors import (
    AnnotationFormatError,
    ColumnNotFoundError,
    CorruptImageError,
    DataError,
    InvalidLabelError,
)
from mambaout_pl.data.images import open_image, read_rgb_image
from mambaout_pl.data.sources import COCO_LAYOUT, AnyDataset

__all__ = ["AnnotationWarning", "DetectionDataModule", "collate_detection"]

BoxFormat = Literal["xywh", "xyxy"]

_EXIF_ORIENTATION = 0x0112


class AnnotationWarning(UserWarning):
    """Boxes of a split that were left out or clipped because they lie (partly) outside their image."""


class DetectionDataModule(BaseDataModule):
    """Object detection and instance segmentation batches (:class:`~mambaout_pl.data.batches.DetectionBatch`).

    Read a COCO folder with ``path="coco"`` and ``data_dir`` the folder holding
    ``annotations/instances_<split>.json`` and ``<split>/``; a Hub dataset or parquet files
    (``path="parquet"``, ``data_files``) with an image column and an objects column; or the
    embedded ``"builtin:digit_detection"`` (a COCO folder of handwritten digits, no network).
    Labels are 1..K, with 0 left to the background as torchvision's detectors expect.

    Args:
        objects_column: Column holding each image's objects: a list of dicts, or a dict of lists
            (the Hub's ``Sequence`` of dicts), with the keys below.
        bbox_key: Key of an object's box, in pixels, laid out as ``box_format`` says.
        category_key: Key of an object's category: a ``ClassLabel`` (its names are the classes) or
            an integer 0..K-1 with ``label_names`` given.
        mask_key: Key of an object's mask (COCO polygons, RLE, their JSON string, or a mask image);
            read only when ``masks``.
        area_key: Key of an object's area in pixels, passed on to the evaluation where present.
        iscrowd_key: Key of an object's crowd flag, where present.
        image_id_column: Column of the image ids used for scoring; the row number when absent.
        box_format: ``"xywh"`` (COCO's ``[x, y, width, height]``, the Hub's usual layout) or
            ``"xyxy"`` (``[x1, y1, x2, y2]``; the dataset card says which). A COCO folder's boxes
            are always ``"xywh"``.
        masks: Read the instance masks (Mask R-CNN); False for boxes only (Faster R-CNN).
        label_names: Class names, for data whose categories are plain integers.
        min_size: Training resize: the shorter side, or a list of sides to draw one from per image.
        max_size: Training resize: the most the longer side may be.
        hflip: Probability of a horizontal flip in training.
        train_split: Split to train on (COCO: ``"train2017"``).
        val_split: Split to validate on (COCO: ``"val2017"``).
        batch_size: Training images per device (the paper: 2 on each of 8 GPUs).
        eval_batch_size: Validation/test/predict images per device; None means ``batch_size``.
        **kwargs: The source, splits and loaders: see :class:`~mambaout_pl.data.base.BaseDataModule`.
    """

    default_path = "builtin:digit_detection"
    task = "detection"
    builtin_datasets = frozenset(embedded.DETECTION_DATASETS)
    # The class names reach the task through the CLI's links; saving them here too would clash.
    hparams_ignore = ("label_names",)

    def __init__(
        self,
        objects_column: str = "objects",
        bbox_key: str = "bbox",
        category_key: str = "category",
        mask_key: str = "segmentation",
        area_key: str = "area",
        iscrowd_key: str = "iscrowd",
        image_id_column: str = "image_id",
        box_format: BoxFormat = "xywh",
        masks: bool = True,
        label_names: list[str] | None = None,
        min_size: int | list[int] = 800,
        max_size: int = 1333,
        hflip: float = 0.5,
        train_split: str = "train2017",
        val_split: str | None = "val2017",
        batch_size: int = 2,
        eval_batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        if box_format not in ("xywh", "xyxy"):
            raise ValueError(f"box_format={box_format!r} must be 'xywh' (COCO) or 'xyxy'.")
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"hflip={hflip} must be a probability in [0, 1].")
        super().__init__(
            train_split=train_split,
            val_split=val_split,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            **kwargs,
        )
        self._label_names_argument = None if label_names is None else [str(name) for name in label_names]
        sizes = min_size if isinstance(min_size, int) else list(min_size)
        self.train_transform = create_detection_transforms(True, min_size=sizes, max_size=max_size, flip_prob=hflip)
        self.eval_transform = create_detection_transforms(False)

    # -- the data -----------------------------------------------------------------------------

    @property
    def box_format(self) -> BoxFormat:
        """The layout of the boxes as stored: a COCO folder's are always ``"xywh"``."""
        if self.is_coco_folder and self.hparams.box_format != "xywh":
            raise DataError(
                f"box_format={self.hparams.box_format!r}, but {self.describe_source()!r} is a COCO folder, whose "
                "boxes are always [x, y, width, height]: remove `box_format`."
            )
        return self.hparams.box_format

    @property
    def is_coco_folder(self) -> bool:
        """Whether the data is a COCO folder (also the embedded digits), read by ``coco.py``."""
        return self.source[0] == COCO_LAYOUT

    def annotation_file(self, role: str = "val") -> Path | None:
        """The COCO annotation file of ``role``'s split (``"val"``, ``"test"``), for the official evaluation; None if not a COCO folder.

        A held-out validation part has none either: its images are a subset of the file's.
        """
        split = self.hparams[f"{role}_split"]
        if not self.is_coco_folder or split is None:
            return None
        path = Path(self.source[1]) / "annotations" / f"instances_{split}.json"
        return path if path.is_file() else None

    def read_label_names(self) -> list[str]:
        """``label_names``, else the names of the train split's category ``ClassLabel``."""
        if self._label_names_argument is not None:
            return list(self._label_names_argument)
        hp = self.hparams
        train = self.split(hp.train_split, "train_split")
        feature = self._category_feature(train, hp.train_split)
        if isinstance(feature, ClassLabel):
            return list(feature.names)
        raise DataError(
            f"Cannot tell the classes of {self.describe_source()!r}: {hp.objects_column}.{hp.category_key} of split "
            f"{hp.train_split!r} holds {feature}, not a ClassLabel. Set `label_names` (one name per category "
            "0..K-1), or `category_key` to the objects' ClassLabel key."
        )

    def _category_feature(self, dataset: AnyDataset, split: str) -> Any:
        """The feature of the objects' categories (None when streamed data does not say)."""
        hp = self.hparams
        self._check_objects_column(dataset, split)
        if dataset.features is None:
            return None
        fields = _object_fields(dataset.features[hp.objects_column])
        if fields is None or hp.bbox_key not in fields or hp.category_key not in fields:
            available = sorted(fields) if fields is not None else dataset.features[hp.objects_column]
            raise ColumnNotFoundError(
                f"The objects of split {split!r} ({hp.objects_column!r}) have no {hp.bbox_key!r} or "
                f"{hp.category_key!r}; they hold {available}. Set `bbox_key` and `category_key` to the keys of "
                "the boxes and the categories."
            )
        return fields[hp.category_key]

    def _check_objects_column(self, dataset: AnyDataset, split: str) -> None:
        hp = self.hparams
        columns = dataset.column_names
        if columns is not None and hp.objects_column not in columns:
            raise ColumnNotFoundError(
                f"Column {hp.objects_column!r} does not exist in split {split!r}; available columns: {columns}. "
                "Set `objects_column` to the column holding each image's boxes and categories."
            )

    # -- checks before training ---------------------------------------------------------------

    def check_split(self, dataset: AnyDataset, split: str, role: str) -> AnyDataset:
        """Objects present (optional for predict) and checked; training keeps the images with an object."""
        hp = self.hparams
        columns = dataset.column_names
        if role == "predict" and columns is not None and hp.objects_column not in columns:
            return dataset
        feature = self._category_feature(dataset, split)
        if isinstance(feature, ClassLabel) and split != hp.train_split and list(feature.names) != self.label_names:
            raise InvalidLabelError(
                f"Split {split!r} names its categories {feature.names}, but the train split {hp.train_split!r} names "
                f"them {self.label_names}: the same label would mean different classes. Give every split the same "
                "categories (for a COCO folder: the same 'categories' in each annotation file)."
            )
        if hp.masks and dataset.features is not None:
            fields = _object_fields(dataset.features[hp.objects_column]) or {}
            if hp.mask_key not in fields:
                raise ColumnNotFoundError(
                    f"The objects of split {split!r} have no masks ({hp.mask_key!r} is not among {sorted(fields)}). "
                    "Set `mask_key` to the objects' mask key, or `masks: false` to train boxes only."
                )
        if isinstance(dataset, IterableDataset):
            if role != "train":
                return dataset
            return dataset.filter(TrainableObjects(hp.objects_column, hp.bbox_key, hp.iscrowd_key, self.box_format))
        self._check_image_sizes(dataset, split)
        kept = self._scan(dataset, split)
        if role != "train":
            return dataset
        if not kept.any():
            raise DataError(
                f"Split {split!r} of {self.describe_source()!r} has no image with an object to train on (every image "
                "is empty or holds only crowd regions or invalid boxes). Check the annotations and `box_format`."
            )
        if not kept.all():
            rank_zero_info(
                f"Training on {int(kept.sum())} of the {len(dataset)} images of split {split!r}: the other "
                f"{int((~kept).sum())} have no object to train on (no annotation, or only crowd regions)."
            )
            dataset = dataset.select(np.flatnonzero(kept), keep_in_memory=True)
        return dataset

    def _scan(self, dataset: Dataset, split: str) -> np.ndarray:
        """Check every box and category of ``dataset`` (no image decoded); which rows have an object to train on."""
        hp = self.hparams
        size_columns = [column for column in ("width", "height") if column in dataset.column_names]
        table = dataset.select_columns([hp.objects_column, *size_columns]).with_format("arrow")[:]
        objects = table.column(hp.objects_column).combine_chunks()
        keys = {"bbox": hp.bbox_key, "category": hp.category_key, "iscrowd": hp.iscrowd_key, "area": hp.area_key}
        where = f"split {split!r} of {self.describe_source()!r}"
        flat = _flat_objects(objects, keys, where, hp.objects_column)
        row, boxes, categories, crowd = flat["row"], flat["bbox"], flat["category"], flat["iscrowd"]
        self._check_object_values(flat, where)
        if hp.masks and not self.is_coco_folder:  # a COCO folder's masks were checked with its file
            self._check_masks(table, where)
        bad = (categories < 0) | (categories >= self.num_classes)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise InvalidLabelError(
                f"Row {int(row[first])} of split {split!r} in {self.describe_source()!r} has an object of category "
                f"{int(categories[first])} ({hp.objects_column}.{hp.category_key}), outside the {self.num_classes} "
                f"categories 0..{self.num_classes - 1}; {int(bad.sum())} object(s) are. Fix those objects, or give "
                "every category a name in `label_names`."
            )
        size = None
        if len(size_columns) == 2:
            widths = table.column("width").to_numpy().astype(np.float64)
            heights = table.column("height").to_numpy().astype(np.float64)
            size = (widths[row], heights[row])
        clipped_boxes, valid = clip_boxes(to_xyxy(boxes, self.box_format), size)
        clipped = valid & np.any(clipped_boxes != to_xyxy(boxes, self.box_format), axis=1)
        dropped = int((~valid).sum())
        if dropped or clipped.any():
            first = int(row[np.flatnonzero(~valid | clipped)[0]])
            warnings.warn(
                f"Split {split!r} of {self.describe_source()!r}: left out {dropped} boxes with no width or height or "
                f"lying outside their image, and clipped {int(clipped.sum())} boxes reaching past the image border "
                f"to it (the first at row {first}; boxes read as box_format={self.box_format!r}). Fix those "
                "annotations to keep them, or check `box_format`.",
                AnnotationWarning,
                stacklevel=2,
            )
        kept = np.zeros(len(dataset), dtype=bool)
        kept[row[valid & (crowd == 0)]] = True
        return kept

    def _check_object_values(self, flat: dict[str, np.ndarray], where: str) -> None:
        """Raise naming the first object whose box is not finite or has a negative size, whose crowd flag is
        not 0 or 1, or whose area is negative or not finite (COCO's rules; empty boxes are left out later)."""
        hp = self.hparams
        boxes = flat["bbox"]
        if self.box_format == "xywh":
            sizes = boxes[:, 2:]
            layout = (
                "[x, y, width, height] with width and height >= 0 (for [x1, y1, x2, y2] boxes set box_format='xyxy')"
            )
        else:
            sizes = boxes[:, 2:] - boxes[:, :2]
            layout = (
                "[x1, y1, x2, y2] with x2 >= x1 and y2 >= y1 (for [x, y, width, height] boxes set box_format='xywh')"
            )
        area = flat["area"]
        checks = [
            (~np.isfinite(boxes).all(axis=1), hp.bbox_key, boxes, "4 finite numbers"),
            (np.isfinite(boxes).all(axis=1) & (sizes < 0).any(axis=1), hp.bbox_key, boxes, layout),
            (~np.isin(flat["iscrowd"], (0, 1)), hp.iscrowd_key, flat["iscrowd"], "0 or 1 (or missing: 0)"),
            (~np.isnan(area) & (~np.isfinite(area) | (area < 0)), hp.area_key, area, "a finite number of pixels >= 0"),
        ]
        for bad, key, values, allowed in checks:
            if bad.any():
                first = int(np.flatnonzero(bad)[0])
                value = values[first].tolist()
                raise AnnotationFormatError(
                    f"Row {int(flat['row'][first])}, object {int(flat['position'][first])} of {where} has "
                    f"{hp.objects_column}.{key} {value}, which must be {allowed}; {int(bad.sum())} object(s) break "
                    "this. Fix those objects."
                )

    def _check_masks(self, table: pa.Table, where: str) -> None:
        """Check each object's polygons or RLE (not mask images, checked when decoded) against COCO's format and,
        where the data has ``width`` and ``height`` columns, its image's size."""
        hp = self.hparams
        objects = table.column(hp.objects_column).combine_chunks()
        if pa.types.is_struct(objects.type):  # a dict of lists
            index = objects.type.get_field_index(hp.mask_key)
            masks = pc.struct_field(objects, [index]) if index >= 0 else None
            rows = pc.list_parent_indices(masks) if masks is not None else None
            masks = pc.list_flatten(masks) if masks is not None else None
        else:
            flat = pc.list_flatten(objects)
            index = flat.type.get_field_index(hp.mask_key)
            masks = pc.struct_field(flat, [index]) if index >= 0 else None
            rows = pc.list_parent_indices(objects)
        if masks is None or pa.types.is_struct(masks.type) and masks.type.get_field_index("bytes") >= 0:
            return  # no masks, or mask images
        rows = rows.to_numpy()
        sizes = None
        if "width" in table.column_names and "height" in table.column_names:
            sizes = (table.column("height").to_pylist(), table.column("width").to_pylist())
        problems = AnnotationProblems(f"The masks ({hp.objects_column}.{hp.mask_key}) of {where}")
        position = 0
        for number, (row, value) in enumerate(zip(rows.tolist(), masks.to_pylist(), strict=True)):
            position = 0 if number == 0 or rows[number - 1] != row else position + 1
            if value is None or (isinstance(value, (str, list)) and not value):
                continue
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    problems.add(f"row {row}, object {position}", "mask", value, "COCO's polygons or RLE as JSON")
                    continue
            if isinstance(value, list) and isinstance(value[0], (int, float)):
                value = [value]  # one polygon as a flat list of coordinates
            height, width = (sizes[0][row], sizes[1][row]) if sizes is not None else (None, None)
            allowed = segmentation_problem(value, height, width)
            if allowed is not None:
                problems.add(f"row {row}, object {position}", "mask", value, allowed)
        problems.raise_if_any()

    def _check_image_sizes(self, dataset: Dataset, split: str, count: int = 8) -> None:
        """Compare the sizes of a few images, spread over ``dataset``, with its ``width``/``height`` columns.

        Reads only the image headers: a cheap check, before training, that the annotations and
        the images belong together (every image is checked again when decoded).
        """
        hp = self.hparams
        if not {"width", "height"} <= set(dataset.column_names) or len(dataset) == 0:
            return
        rows = np.unique(np.linspace(0, len(dataset) - 1, num=min(count, len(dataset))).round().astype(int))
        columns = dataset.select_columns([hp.image_column, "width", "height"]).select(rows)
        if isinstance(columns.features.get(hp.image_column), ImageFeature):
            columns = columns.cast_column(hp.image_column, ImageFeature(decode=False))
        for row, example in zip(rows, columns, strict=True):
            try:
                width, height = image_size(example[hp.image_column])
            except CorruptImageError:
                continue  # reported, or skipped with `skip_corrupt`, when decoded
            if (width, height) != (example["width"], example["height"]):
                value = example[hp.image_column]
                path = value.get("path") if isinstance(value, dict) else None
                where = repr(path) if path else f"row {int(row)}"
                raise DataError(
                    f"Image {where} of split {split!r} is {width}x{height} (width x height) but its annotations say "
                    f"{example['width']}x{example['height']}. Use the annotations that belong to these images (for a "
                    "COCO folder: the instances_<split>.json of the same <split>/ folder)."
                )

    # -- one example -> one sample; samples -> a batch ----------------------------------------

    def decoder(self, dataset: AnyDataset, split: str, role: str) -> DetectionSampleMaker:
        """Decode and check one image and its objects, then transform them for ``role``."""
        hp = self.hparams
        columns = dataset.column_names
        has_objects = columns is None or hp.objects_column in columns
        return DetectionSampleMaker(
            transform=self.train_transform if role == "train" else self.eval_transform,
            image_column=hp.image_column,
            objects_column=hp.objects_column if has_objects else None,
            image_id_column=hp.image_id_column,
            bbox_key=hp.bbox_key,
            category_key=hp.category_key,
            mask_key=hp.mask_key if hp.masks else None,
            area_key=hp.area_key,
            iscrowd_key=hp.iscrowd_key,
            box_format=self.box_format,
            num_classes=self.num_classes,
            training=role == "train",
            split=split,
        )

    def collate(self, role: str) -> Callable[[list[dict[str, Any]]], DetectionBatch]:
        """Images stay a list (the detector batches them), each with its target."""
        return collate_detection


def collate_detection(samples: list[dict[str, Any]]) -> DetectionBatch:
    """``{"images": [float [3, H_i, W_i]], "targets": [DetectionTarget], "file_names": [str]}``."""
    return {
        "images": [sample["image"] for sample in samples],
        "targets": [sample["target"] for sample in samples],
        "file_names": [sample.get("file_name", "") for sample in samples],
    }


def file_name(row: dict[str, Any], image: Any) -> str:
    """The image's file name as the data gives it (a COCO ``file_name``, a path under ``predict_images``' folder),
    else its file's name; ``""`` for an image without a file."""
    if isinstance(row.get("file_name"), str):
        return row["file_name"]
    path = image.get("path") if isinstance(image, dict) else None
    return Path(path).name if path else ""


# ---------------------------------------------------------------------------------------------
# boxes and objects


def to_xyxy(boxes: np.ndarray, box_format: BoxFormat) -> np.ndarray:
    """``[N, 4]`` boxes in ``box_format`` as ``(x1, y1, x2, y2)``."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if box_format == "xyxy":
        return boxes.copy()
    return np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)


def clip_boxes(boxes: np.ndarray, size: tuple[Any, Any] | None) -> tuple[np.ndarray, np.ndarray]:
    """``(x1, y1, x2, y2)`` boxes clipped to their image (``size``: widths and heights), and which keep an area.

    A box with no width or height, or wholly outside its image, is not valid (COCO's reader treats
    its annotations the same way).
    """
    clipped = boxes.copy()
    if size is not None:
        width, height = size
        clipped[:, 0::2] = np.clip(clipped[:, 0::2], 0.0, np.asarray(width, dtype=np.float64).reshape(-1, 1))
        clipped[:, 1::2] = np.clip(clipped[:, 1::2], 0.0, np.asarray(height, dtype=np.float64).reshape(-1, 1))
    finite = np.isfinite(boxes).all(axis=1)
    valid = finite & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    valid &= (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    return clipped, valid


def object_list(objects: Any) -> list[dict[str, Any]]:
    """An objects value as a list of dicts: a dict of lists (the Hub's ``Sequence`` of dicts) is transposed."""
    if objects is None:
        return []
    if isinstance(objects, dict):
        keys = list(objects)
        return [dict(zip(keys, values, strict=True)) for values in zip(*(objects[key] for key in keys), strict=True)]
    return list(objects)


def _object_fields(feature: Any) -> dict[str, Any] | None:
    """The per-object features of an objects column (a ``List`` of dicts or a dict of ``List``s)."""
    if isinstance(feature, dict):
        return {key: getattr(value, "feature", value) for key, value in feature.items()}
    inner = getattr(feature, "feature", None)
    return dict(inner) if isinstance(inner, dict) else None


def _flat_objects(objects: pa.Array, keys: dict[str, str], where: str, column: str) -> dict[str, np.ndarray]:
    """Every object of an arrow objects column, read without the masks: ``row`` and ``position`` (its row and
    its place in the row), ``bbox`` ``[N, 4]``, ``category``, ``iscrowd`` (missing: 0) and ``area`` (missing:
    NaN), from the fields named by ``keys``."""
    if pa.types.is_struct(objects.type):  # a dict of lists
        field = pc.struct_field
        row = pc.list_parent_indices(field(objects, [objects.type.get_field_index(keys["bbox"])])).to_numpy()
        fields = {
            name: pc.list_flatten(field(objects, [objects.type.get_field_index(key)]))
            for name, key in keys.items()
            if objects.type.get_field_index(key) >= 0
        }
    else:  # a list of dicts
        row = pc.list_parent_indices(objects).to_numpy()
        flat = pc.list_flatten(objects)
        fields = {
            name: pc.struct_field(flat, [flat.type.get_field_index(key)])
            for name, key in keys.items()
            if flat.type.get_field_index(key) >= 0
        }
    count = len(row)
    starts = np.searchsorted(row, row, side="left") if count else row
    position = np.arange(count) - starts
    lengths = pc.fill_null(pc.list_value_length(fields["bbox"]), 0).to_numpy()
    if (lengths != 4).any():
        first = int(np.flatnonzero(lengths != 4)[0])
        raise AnnotationFormatError(
            f"Row {int(row[first])}, object {int(position[first])} of {where} has {int(lengths[first])} numbers in "
            f"{column}.{keys['bbox']}, which must have 4; {int((lengths != 4).sum())} object(s) break this. Fix "
            "those boxes."
        )
    if not pa.types.is_integer(fields["category"].type):
        raise AnnotationFormatError(
            f"{column}.{keys['category']} of {where} holds {fields['category'].type} values, not integer category "
            "indices. Set `category_key` to the objects' ClassLabel or integer key."
        )
    boxes = pc.list_flatten(fields["bbox"]).to_numpy(zero_copy_only=False).astype(np.float64)
    flat_fields = {"row": row.astype(np.int64), "position": position.astype(np.int64), "bbox": boxes.reshape(count, 4)}
    flat_fields["category"] = fields["category"].to_numpy(zero_copy_only=False).astype(np.int64)
    for name, missing in (("iscrowd", 0.0), ("area", np.nan)):
        values = np.full(count, missing)
        if name in fields:
            values = fields[name].to_numpy(zero_copy_only=False).astype(np.float64)
            values[np.isnan(values)] = missing  # nulls
        flat_fields[name] = values
    return flat_fields


@dataclass
class TrainableObjects:
    """Whether a streamed example has an object to train on: a box with an area that is not a crowd region."""

    objects_column: str
    bbox_key: str
    iscrowd_key: str
    box_format: BoxFormat

    def __call__(self, example: dict[str, Any]) -> bool:
        objects = object_list(example.get(self.objects_column))
        boxes = to_xyxy(np.array([obj[self.bbox_key] for obj in objects], dtype=np.float64), self.box_format)
        crowd = np.array([int(obj.get(self.iscrowd_key) or 0) for obj in objects], dtype=np.int64)
        return bool(np.any(clip_boxes(boxes, None)[1] & (crowd == 0)))


def image_size(value: Any) -> tuple[int, int]:
    """``(width, height)`` of a stored image once upright, from its header alone where it is a local file or bytes."""
    if isinstance(value, dict) and (value.get("bytes") is not None or "://" not in (value.get("path") or "://")):
        source = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"]
        try:
            with Image.open(source) as image:
                width, height = image.size
                # EXIF orientations 5-8 turn the image a quarter: decoded upright, its sides swap.
                return (height, width) if image.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8) else (width, height)
        except Exception as error:
            raise CorruptImageError(f"Cannot read image {value.get('path') or '<in-memory bytes>'}: {error}") from error
    return open_image(value).size


@dataclass
class DetectionSampleMaker:
    """Decode one row into ``{"image": float [3, H, W], "target": DetectionTarget}``, checked and transformed."""

    transform: Callable[[Any, Any], Any]
    image_column: str
    objects_column: str | None  # None: no objects (predict)
    image_id_column: str
    bbox_key: str
    category_key: str
    mask_key: str | None  # None: no masks
    area_key: str
    iscrowd_key: str
    box_format: BoxFormat
    num_classes: int
    training: bool
    split: str

    def __call__(self, row: dict[str, Any], index: int) -> dict[str, Any]:
        value = row[self.image_column]
        image = read_rgb_image(value)
        width, height = image.size
        where = self._where(value, index)
        if "width" in row and "height" in row and (row["width"], row["height"]) != (width, height):
            raise DataError(
                f"Image {where} is {width}x{height} (width x height) but its annotations say {row['width']}x"
                f"{row['height']}. Use the annotations that belong to these images (for a COCO folder: the "
                "instances_<split>.json of the same <split>/ folder)."
            )
        image_id = row.get(self.image_id_column, index)
        if not isinstance(image_id, (int, np.integer)):
            raise DataError(
                f"Column {self.image_id_column!r} of {where} holds {image_id!r}, not an integer image id. Set "
                "`image_id_column` to an integer column, or to a name the data has no column for to number the rows."
            )
        objects = [] if self.objects_column is None else object_list(row.get(self.objects_column))
        boxes = to_xyxy(np.array([obj[self.bbox_key] for obj in objects], dtype=np.float64), self.box_format)
        boxes, keep = clip_boxes(boxes, (width, height))
        crowd = np.array([int(obj.get(self.iscrowd_key) or 0) for obj in objects], dtype=np.int64)
        if self.training:
            keep &= crowd == 0
        kept = [obj for obj, keep_object in zip(objects, keep, strict=True) if keep_object]
        labels = np.array([self._label(obj, where) for obj in kept], dtype=np.int64)
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(boxes[keep]).float(), format="XYXY", canvas_size=(height, width)
            ),
            "labels": torch.from_numpy(labels),
        }
        if not self.training:
            target["iscrowd"] = torch.from_numpy(crowd[keep])
            if all(obj.get(self.area_key) is not None for obj in kept):
                target["area"] = torch.tensor([float(obj[self.area_key]) for obj in kept], dtype=torch.float32)
        if self.mask_key is not None:
            masks = np.zeros((len(kept), height, width), dtype=np.uint8)
            for position, obj in enumerate(kept):
                masks[position] = self._mask(obj.get(self.mask_key), height, width, f"object {position} of {where}")
            target["masks"] = tv_tensors.Mask(torch.from_numpy(masks))
        pixels, target = self.transform(tv_tensors.Image(pil_to_tensor(image)), target)
        sample_target: DetectionTarget = {key: tensor.as_subclass(torch.Tensor) for key, tensor in target.items()}
        sample_target["image_id"] = int(image_id)
        return {"image": pixels.as_subclass(torch.Tensor), "target": sample_target, "file_name": file_name(row, value)}

    def _label(self, obj: dict[str, Any], where: str) -> int:
        category = obj[self.category_key]
        if not isinstance(category, (int, np.integer)) or not 0 <= category < self.num_classes:
            raise InvalidLabelError(
                f"An object of {where} has category {category!r}, outside the {self.num_classes} categories "
                f"0..{self.num_classes - 1}. Fix the object, or give every category a name in `label_names`."
            )
        return int(category) + 1

    def _where(self, value: Any, index: int) -> str:
        path = value.get("path") if isinstance(value, dict) else None
        return repr(path) if path else f"row {index} of split {self.split!r}"

    def _mask(self, value: Any, height: int, width: int, where: str) -> np.ndarray:
        """One object's mask as uint8 ``[height, width]``: polygons, RLE, their JSON, or a mask image."""
        if value is None or (isinstance(value, (str, list)) and not value):
            return np.zeros((height, width), dtype=np.uint8)
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise AnnotationFormatError(
                    f"The mask of {where} is a string that is not COCO's JSON ({error}): give polygons or an RLE dict."
                ) from error
        if isinstance(value, list) and isinstance(value[0], (int, float)):
            value = [value]  # one polygon as a flat list of coordinates
        if isinstance(value, Image.Image) or (isinstance(value, dict) and ("bytes" in value or "path" in value)):
            try:
                pixels = np.asarray(open_image(value))
            except CorruptImageError as error:
                raise CorruptImageError(f"Cannot decode the mask of {where}: {error}") from error
            if pixels.shape[:2] != (height, width):
                raise DataError(
                    f"The mask of {where} is {pixels.shape[1]}x{pixels.shape[0]} (width x height) but its image is "
                    f"{width}x{height}. Give each mask its image's size."
                )
            return (pixels.reshape(height, width, -1).max(axis=2) > 0).astype(np.uint8)
        return decode_segmentation(value, height, width, where)
