"""SegmentationDataModule: images with per-pixel label maps from any ``datasets`` source.

The source, splits, hold-out, loaders and batch sizes are ``BaseDataModule``'s; this module names
the classes, checks the label-map column, decodes and checks one (image, label map) pair, and
collates samples into a :class:`~mambaout_pl.data.batches.SegmentationTrainBatch` (equal crops) or,
for validation, test and predict, a :class:`~mambaout_pl.data.batches.SegmentationEvalBatch`: each
label map at its original size, images padded into one batch with their sizes, so that predictions
are scored where the labels are.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from datasets import Image as ImageFeature
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms.v2 import functional as F

from mambaout_pl.data import embedded
from mambaout_pl.data.ade20k import ADE20K_CLASSES, read_class_names, split_folder_name
from mambaout_pl.data.base import BaseDataModule
from mambaout_pl.data.batches import SegmentationEvalBatch, SegmentationTrainBatch, pad_stack
from mambaout_pl.data.errors import ColumnNotFoundError, CorruptImageError, DataError, InvalidLabelError
from mambaout_pl.data.images import open_image, read_rgb_image
from mambaout_pl.data.label_damage import (
    DAMAGE_THRESHOLD,
    DamagedLabelMapWarning,
    describe_edge_values,
    edge_only_values,
)
from mambaout_pl.data.segmentation_transforms import SegmentationTransform, create_segmentation_transforms
from mambaout_pl.data.sources import ADE20K_LAYOUT, AnyDataset

# Mask modes that hold one class index per pixel.
_INDEX_MODES = ("L", "P", "I", "I;16", "I;16L", "I;16B", "1")
# Image formats that change pixel values when saved: no label map survives them.
_LOSSY_FORMATS = ("JPEG", "MPO")


class SegmentationDataModule(BaseDataModule):
    """Semantic segmentation batches from an ADE20K-layout folder, a Hub dataset, parquet or ``builtin:digit_scenes``.

    Read an ADEChallengeData2016-layout folder (``images/{training,validation}``,
    ``annotations/{training,validation}``) with ``path="ade20k"`` and ``data_dir`` the folder.

    Args:
        mask_column: Column holding the label maps (single-channel images of class indices).
        num_classes: Number of classes; None takes it from the data (ADE20K layout: 150, a folder's
            ``class_names.txt``, the embedded scenes: 11).
        label_names: Class names in label order; None takes them from the data where it names them.
        reduce_zero_label: Label 0 marks unlabelled pixels and classes start at 1 (ADE20K): 0
            becomes ``ignore_index`` and every other label drops by one.
        ignore_index: Label of pixels that are neither trained on nor scored.
        crop_size: Training crop, an int (square) or ``(height, width)``.
        resize_scale: The ``(long, short)`` sides images are rescaled to fit, keeping their aspect
            ratio (training: times a random ratio; evaluation: as is).
        ratio_range: Range of the random training rescale ratio.
        cat_max_ratio: Largest share of a training crop one class may cover (1: no limit).
        hflip: Probability of a horizontal flip.
        photometric_distortion: Apply mmsegmentation's photometric distortion in training.
        mean: Normalisation mean (RGB, 0..1 scale).
        std: Normalisation standard deviation (RGB, 0..1 scale).
        **kwargs: The source, splits and loaders: see :class:`~mambaout_pl.data.base.BaseDataModule`.
    """

    default_path = "builtin:digit_scenes"
    task = "segmentation"
    builtin_datasets = frozenset(embedded.SEGMENTATION_DATASETS)
    # The resolved class count and names reach the task (and its hyper-parameters) through the
    # CLI's links; saving the unresolved arguments here too would clash with them.
    hparams_ignore = ("num_classes", "label_names")

    def __init__(
        self,
        mask_column: str = "mask",
        num_classes: int | None = None,
        label_names: list[str] | None = None,
        reduce_zero_label: bool = False,
        ignore_index: int = 255,
        crop_size: int | tuple[int, int] = 512,
        resize_scale: tuple[int, int] = (2048, 512),
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        hflip: float = 0.5,
        photometric_distortion: bool = True,
        mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
        **kwargs: Any,
    ) -> None:
        if "scale" in kwargs:
            raise TypeError("SegmentationDataModule's `scale` is now `resize_scale`: rename the key.")
        super().__init__(**kwargs)
        if mask_column == self.hparams.image_column:
            raise ValueError(
                f"mask_column={mask_column!r} is also the image_column: set `mask_column` to the column of label "
                "maps and `image_column` to the column of images."
            )
        self._num_classes_argument = num_classes
        self._label_names_argument = None if label_names is None else [str(name) for name in label_names]
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be >= 1, or None to take it from the data.")
        if label_names is not None and num_classes is not None and len(label_names) != num_classes:
            raise ValueError(
                f"label_names has {len(label_names)} names but num_classes is {num_classes}; give one name "
                "per class, or set only one of them."
            )
        options = dict(
            crop_size=crop_size,
            scale=resize_scale,
            ratio_range=ratio_range,
            cat_max_ratio=cat_max_ratio,
            hflip=hflip,
            photometric_distortion=photometric_distortion,
            ignore_index=ignore_index,
            mean=mean,
            std=std,
        )
        self.train_transform = create_segmentation_transforms(training=True, **options)
        self.eval_transform = create_segmentation_transforms(training=False, **options)

    @property
    def folder(self) -> Path | None:
        """The ADE20K-layout folder the data is read from, if it is one."""
        path, data_dir = self.source
        return Path(data_dir).expanduser() if path == ADE20K_LAYOUT and data_dir is not None else None

    def read_label_names(self) -> list[str]:
        """``label_names``, else the data's, else ``"0"``, ``"1"``, ... up to ``num_classes``."""
        if self._label_names_argument is not None:
            return list(self._label_names_argument)
        known = self._known_label_names()
        num_classes = self._num_classes_argument
        if num_classes is not None:
            if known is not None and len(known) == num_classes:
                return known
            return [str(index) for index in range(num_classes)]
        if known is None:
            raise DataError(
                f"Cannot tell the number of classes of {self.describe_source()!r}: its label maps do not name "
                "them. Set `num_classes` (and optionally `label_names`)."
            )
        return known

    def _known_label_names(self) -> list[str] | None:
        """The class names the data itself gives: a folder's ``class_names.txt``, else ADE20K's."""
        self.open()
        if self.folder is None:
            return None
        names = read_class_names(self.folder)
        if names is not None:
            return names
        if self.hparams.reduce_zero_label:
            return list(ADE20K_CLASSES)
        return ["other", *ADE20K_CLASSES]

    def check_split(self, dataset: AnyDataset, split: str, role: str) -> AnyDataset:
        """Label maps present (optional for predict); image and label-map columns hold images."""
        hp = self.hparams
        columns = dataset.column_names
        has_masks = columns is None or hp.mask_column in columns
        if role != "predict" and not has_masks:
            raise ColumnNotFoundError(self._missing_masks_message(columns, split))
        if dataset.features is None:  # streamed data whose features are unknown until read
            return dataset
        for column in (hp.image_column, hp.mask_column) if has_masks else (hp.image_column,):
            if not isinstance(dataset.features.get(column), ImageFeature):
                raise DataError(
                    f"Column {column!r} of split {split!r} holds {dataset.features.get(column)}, not images. "
                    "Set `image_column` / `mask_column` to image columns (label maps are single-channel images)."
                )
        if has_masks:
            dataset = dataset.cast_column(hp.mask_column, ImageFeature(decode=False))
        return dataset

    def _missing_masks_message(self, columns: list[str], split: str) -> str:
        folder = self.folder
        if folder is not None:
            annotations = folder / "annotations" / split_folder_name(split)
            images = folder / "images" / split_folder_name(split)
            return (
                f"Split {split!r} has no label maps: folder {str(annotations)!r} does not exist. Put one PNG label "
                f"map per image there (same file name stem as in {str(images)!r}), or point `data_dir` at the "
                "folder holding images/ and annotations/."
            )
        return (
            f"Column {self.hparams.mask_column!r} does not exist in split {split!r}; available columns: "
            f"{columns}. Set `mask_column` to the column holding the label maps."
        )

    def decoder(self, dataset: AnyDataset, split: str, role: str) -> SegmentationSampleMaker:
        """Decode and check one (image, label map) pair, then transform it for ``role``."""
        hp = self.hparams
        columns = dataset.column_names
        has_masks = columns is None or hp.mask_column in columns
        return SegmentationSampleMaker(
            transform=self.train_transform if role == "train" else self.eval_transform,
            image_column=hp.image_column,
            mask_column=hp.mask_column if has_masks else None,
            num_classes=self.num_classes,
            reduce_zero_label=hp.reduce_zero_label,
            ignore_index=hp.ignore_index,
            split=split,
            training=role == "train",
        )

    def collate(self, role: str) -> Callable[[list[dict[str, Any]]], SegmentationTrainBatch | SegmentationEvalBatch]:
        """Training crops are stacked; evaluation images are padded (see ``batches.py``)."""
        return collate_train if role == "train" else EvalCollate(self.hparams.ignore_index)


# ---------------------------------------------------------------------------------------------
# one example -> one sample


class SegmentationSampleMaker:
    """Decode one (image, label map) row, check it, and transform it into a sample.

    Checks that both have the same size and that every label is a class or ``ignore_index``
    (after ``reduce_zero_label``). Raises naming the files (or the row) and the setting to change.
    """

    def __init__(
        self,
        transform: SegmentationTransform,
        image_column: str,
        mask_column: str | None,
        num_classes: int,
        reduce_zero_label: bool,
        ignore_index: int,
        split: str,
        training: bool,
    ) -> None:
        self.transform = transform
        self.image_column = image_column
        self.mask_column = mask_column
        self.num_classes = num_classes
        self.reduce_zero_label = reduce_zero_label
        self.ignore_index = ignore_index
        self.split = split
        self.training = training
        self._damage_reported = False

    def __call__(self, row: dict[str, Any], index: int) -> dict[str, Any]:
        image_value = row[self.image_column]
        image = read_rgb_image(image_value)
        width, height = image.size
        sample: dict[str, Any] = {"name": self._name(row, index), "original_size": torch.tensor([height, width])}
        mask = None
        if self.mask_column is not None:
            mask = self._read_mask(row[self.mask_column], image_value, (height, width), index)
        pixels = F.pil_to_tensor(image)
        if self.training:
            sample["image"], sample["mask"] = self.transform(pixels, mask)
            return sample
        sample["image"], _ = self.transform(pixels)
        sample["image_size"] = torch.tensor(sample["image"].shape[-2:])
        if mask is not None:
            sample["mask"] = mask
        return sample

    def _name(self, row: dict[str, Any], index: int) -> str:
        if "name" in row and isinstance(row["name"], str):
            return row["name"]
        if isinstance(row.get("file_name"), str):  # predict_images: the path under their folder
            return str(PurePosixPath(row["file_name"]).with_suffix(""))
        path = row[self.image_column].get("path") if isinstance(row[self.image_column], dict) else None
        return Path(path).stem if path else f"{index:06d}"

    def _where(self, value: Any, index: int) -> str:
        path = value.get("path") if isinstance(value, dict) else None
        return repr(path) if path else f"row {index} of split {self.split!r}"

    def _read_mask(self, value: Any, image_value: Any, image_size: tuple[int, int], index: int) -> torch.Tensor:
        """The label map as long ``[H, W]``, checked, with ``reduce_zero_label`` applied."""
        where = self._where(value, index)
        try:
            mask_image = open_image(value)
        except CorruptImageError as error:
            raise CorruptImageError(f"Cannot decode the label map {where}: {error.__cause__ or error}") from error
        if mask_image.format in _LOSSY_FORMATS:
            raise InvalidLabelError(
                f"Label map {where} is stored as {mask_image.format}, whose lossy compression changes class "
                "indices along every edge (and may still look valid). Save label maps losslessly, as PNG, from the "
                "original labels."
            )
        if mask_image.mode not in _INDEX_MODES:
            raise InvalidLabelError(
                f"Label map {where} is a {mask_image.mode} image; a label map holds one class index per pixel "
                "(an 8-bit grayscale or palette PNG). Convert colour-coded label maps to class indices first."
            )
        labels = np.asarray(mask_image).astype(np.int64)
        if labels.shape != image_size:
            raise DataError(
                f"Label map {where} is {labels.shape[1]}x{labels.shape[0]} (width x height) but its image "
                f"{self._where(image_value, index)} is {image_size[1]}x{image_size[0]}: a label map must have "
                "its image's size. Fix or remove this pair."
            )
        raw = labels
        if self.reduce_zero_label:
            labels = np.where(raw == 0, self.ignore_index, raw - 1)
            labels[raw == self.ignore_index] = self.ignore_index
        invalid = (labels >= self.num_classes) & (labels != self.ignore_index) | (labels < 0)
        fringe: dict[int, int] = {}
        if invalid.any() or not self._damage_reported:  # after the split's one warning, only a refusal needs it
            ignored = (self.ignore_index, 0) if self.reduce_zero_label else (self.ignore_index,)
            fringe = edge_only_values(raw, ignored)
        damaged = len(fringe) >= DAMAGE_THRESHOLD
        if damaged and invalid.any() and set(np.unique(raw[invalid]).tolist()) <= set(fringe):
            raise InvalidLabelError(
                f"Label map {where} holds label value(s) {describe_edge_values(fringe)} that occur only along the "
                "edges between regions, as lossy (JPEG) compression leaves them, and some are no class in "
                f"[0, {self.num_classes}) nor the ignore index {self.ignore_index}: it was saved as JPEG at some point. "
                "Recreate the label maps from the original labels, saved losslessly (PNG)."
            )
        if damaged and not self._damage_reported:
            self._damage_reported = True
            warnings.warn(
                f"Label map {where} looks damaged by lossy (JPEG) compression: label value(s) "
                f"{describe_edge_values(fringe)} occur only along the edges between regions, never inside one, and "
                "train as classes there. Recreate the label maps from the original labels, saved losslessly (PNG). "
                f"Further label maps of split {self.split!r} are not reported.",
                DamagedLabelMapWarning,
                stacklevel=2,
            )
        if invalid.any():
            values = sorted(int(v) for v in np.unique(raw[invalid]))
            shown = ", ".join(str(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
            hint = (
                "set `reduce_zero_label: true` if 0 marks unlabelled pixels and classes start at 1 (ADE20K)"
                if not self.reduce_zero_label and max(values) == self.num_classes
                else f"set `num_classes` to at least {max(values) + (0 if self.reduce_zero_label else 1)}"
            )
            raise InvalidLabelError(
                f"Label map {where} holds label value(s) {shown} that are neither a class in "
                f"[0, {self.num_classes}) nor the ignore index {self.ignore_index}"
                f"{' (after reduce_zero_label)' if self.reduce_zero_label else ''}: {hint}, or fix the label map."
            )
        return torch.from_numpy(labels)


# ---------------------------------------------------------------------------------------------
# samples -> batches


def collate_train(samples: list[dict[str, Any]]) -> SegmentationTrainBatch:
    """Stack equal training crops into ``{"image": float [B, 3, h, w], "mask": long [B, h, w]}``."""
    return {
        "image": torch.stack([sample["image"] for sample in samples]),
        "mask": torch.stack([sample["mask"] for sample in samples]),
    }


class EvalCollate:
    """Pad images (with 0) and label maps (with ``ignore_index``) to the largest in the batch, keeping their sizes."""

    def __init__(self, ignore_index: int = 255) -> None:
        self.ignore_index = ignore_index

    def __call__(self, samples: list[dict[str, Any]]) -> SegmentationEvalBatch:
        batch: SegmentationEvalBatch = {
            "image": pad_stack([sample["image"] for sample in samples], 0.0),
            "image_size": torch.stack([sample["image_size"] for sample in samples]),
            "original_size": torch.stack([sample["original_size"] for sample in samples]),
            "name": [sample["name"] for sample in samples],
        }
        if all("mask" in sample for sample in samples):
            batch["mask"] = pad_stack([sample["mask"] for sample in samples], self.ignore_index)
        return batch
