"""ImageClassificationDataModule: image classification data from any ``datasets`` source.

The source, splits, hold-out, loaders and batch sizes are ``BaseDataModule``'s; this module reads
the class names, checks the label column, decodes and transforms one image, and stacks samples
into a :class:`~mambaout_pl.data.batches.ClassificationBatch` (``"label"`` only when the split has
labels).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Dataset, IterableDataset
from lightning.pytorch.utilities import rank_zero_warn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from mambaout_pl.data import embedded
from mambaout_pl.data.base import BaseDataModule
from mambaout_pl.data.batches import ClassificationBatch
from mambaout_pl.data.checks import check_columns, check_labels, integer_labels
from mambaout_pl.data.errors import ColumnNotFoundError, InvalidLabelError
from mambaout_pl.data.images import read_rgb_image
from mambaout_pl.data.sources import AnyDataset
from mambaout_pl.data.transforms import create_classification_transforms


class ImageClassificationDataModule(BaseDataModule):
    """Image classification batches from a Hub dataset, an image folder, parquet or ``builtin:digits``.

    Args:
        label_column: Column holding the integer (or ClassLabel) labels.
        image_size: Side of the square images in a batch.
        crop_pct: Eval: resize to ``image_size / crop_pct``, then centre crop ``image_size``.
        interpolation: Eval resize interpolation (bilinear, bicubic, ...).
        train_interpolation: Train crop interpolation; ``"random"`` picks bilinear or bicubic.
        mean: Normalisation mean (RGB, 0..1 scale).
        std: Normalisation standard deviation (RGB, 0..1 scale).
        scale: Range of the random resized crop's area, as a fraction of the image.
        ratio: Range of the random resized crop's aspect ratio.
        hflip: Probability of a horizontal flip.
        vflip: Probability of a vertical flip.
        color_jitter: Colour jitter strength (ignored by timm when ``auto_augment`` is set).
        auto_augment: timm auto-augment policy, e.g. ``"rand-m9-mstd0.5-inc1"``; None for none.
        re_prob: Random erasing probability.
        re_mode: Random erasing fill: ``"const"``, ``"rand"`` or ``"pixel"``.
        re_count: Number of random erasing regions.
        **kwargs: The source, splits and loaders: see :class:`~mambaout_pl.data.base.BaseDataModule`.
    """

    default_path = "builtin:digits"
    task = "classification"
    builtin_datasets = frozenset(embedded.BUILTIN_DATASETS) - embedded.SEGMENTATION_DATASETS - embedded.DETECTION_DATASETS

    def __init__(
        self,
        label_column: str = "label",
        image_size: int = 224,
        crop_pct: float = 0.875,
        interpolation: str = "bicubic",
        train_interpolation: str = "random",
        mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        hflip: float = 0.5,
        vflip: float = 0.0,
        color_jitter: float | None = 0.4,
        auto_augment: str | None = None,
        re_prob: float = 0.0,
        re_mode: str = "pixel",
        re_count: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.train_transform = create_classification_transforms(
            image_size,
            training=True,
            interpolation=train_interpolation,
            scale=scale,
            ratio=ratio,
            hflip=hflip,
            vflip=vflip,
            color_jitter=color_jitter,
            auto_augment=auto_augment,
            re_prob=re_prob,
            re_mode=re_mode,
            re_count=re_count,
            mean=mean,
            std=std,
        )
        self.eval_transform = create_classification_transforms(
            image_size, training=False, interpolation=interpolation, crop_pct=crop_pct, mean=mean, std=std
        )

    def read_label_names(self) -> list[str]:
        """ClassLabel names of the train split, else ``"0" .. str(largest label)``."""
        hp = self.hparams
        train = self.split(hp.train_split, "train_split")
        check_columns(train, {"label_column": hp.label_column}, split=hp.train_split)
        feature = (train.features or {}).get(hp.label_column)
        if isinstance(feature, ClassLabel):
            return list(feature.names)
        if isinstance(train, IterableDataset):
            rank_zero_warn(
                f"Label column {hp.label_column!r} is not a ClassLabel: reading the whole streamed "
                f"split {hp.train_split!r} once to count the classes."
            )
            labels = (example[hp.label_column] for example in train.select_columns([hp.label_column]))
            largest = max(labels, default=-1)
        else:
            largest = int(integer_labels(train, hp.label_column, split=hp.train_split).max(initial=-1))
        if not isinstance(largest, (int, np.integer)) or largest < 0:
            raise InvalidLabelError(
                f"Cannot count the classes of split {hp.train_split!r}: column {hp.label_column!r} "
                f"holds no non-negative integer labels (largest value: {largest!r})."
            )
        return [str(index) for index in range(int(largest) + 1)]

    def check_split(self, dataset: AnyDataset, split: str, role: str) -> AnyDataset:
        """Labelled roles: the label column exists, names the train split's classes and is in range."""
        hp = self.hparams
        if role == "predict":
            return dataset
        check_columns(dataset, {"label_column": hp.label_column}, split=split)
        feature = (dataset.features or {}).get(hp.label_column)
        if isinstance(feature, ClassLabel) and list(feature.names) != self.label_names:
            raise InvalidLabelError(
                f"Split {split!r} names its classes {feature.names}, but the train split names them "
                f"{self.label_names}: the same label would mean different classes. Give every split "
                "the same classes (for an image folder: the same class sub-folders)."
            )
        if isinstance(dataset, Dataset):
            check_labels(dataset, hp.label_column, self.num_classes, split=split)
        return dataset

    def decoder(self, dataset: AnyDataset, split: str, role: str) -> SampleMaker:
        """Decode, check and transform one example into ``{"image", "label"}``."""
        hp = self.hparams
        columns = dataset.column_names
        has_labels = role != "predict" or columns is None or hp.label_column in columns
        return SampleMaker(
            transform=self.train_transform if role == "train" else self.eval_transform,
            image_column=hp.image_column,
            label_column=hp.label_column if has_labels else None,
            num_classes=self.num_classes if role != "predict" else None,
            split=split,
        )

    def collate(self, role: str) -> Callable[[list[dict[str, Any]]], ClassificationBatch]:
        """Every role stacks samples the same way."""
        return collate_samples


# ---------------------------------------------------------------------------------------------
# one example -> one sample


@dataclass
class SampleMaker:
    """Decode, check and transform one example into ``{"image", "label"}``; raises CorruptImageError when unreadable."""

    transform: Callable[[Any], torch.Tensor]
    image_column: str
    label_column: str | None  # None: no labels (predict)
    num_classes: int | None  # None: labels optional and not range-checked (predict)
    split: str

    def __call__(self, example: dict[str, Any], index: int) -> dict[str, Any]:
        image = read_rgb_image(self._get(example, self.image_column, "image_column"))
        sample = {"image": self.transform(image)}
        if self.label_column is None or (self.num_classes is None and self.label_column not in example):
            return sample
        label = self._get(example, self.label_column, "label_column")
        in_range = isinstance(label, (int, np.integer)) and 0 <= label < (self.num_classes or 0)
        if self.num_classes is not None and not in_range:
            raise InvalidLabelError(
                f"Label {label!r} at index {index} of column {self.label_column!r} in split "
                f"{self.split!r} is outside [0, {self.num_classes})."
            )
        sample["label"] = int(label)
        return sample

    def _get(self, example: dict[str, Any], column: str, argument: str) -> Any:
        if column not in example:  # only possible for streamed data, whose columns are unknown up front
            raise ColumnNotFoundError(
                f"Column {column!r} does not exist in split {self.split!r}; available columns: "
                f"{sorted(example)}. Set `{argument}` to one of them."
            )
        return example[column]


def collate_samples(samples: list[dict[str, Any]]) -> ClassificationBatch:
    """Stack samples into ``{"image": float [B, 3, H, W], "label": long [B]}`` (label if present)."""
    batch: ClassificationBatch = {"image": torch.stack([sample["image"] for sample in samples])}
    if "label" in samples[0]:
        batch["label"] = torch.tensor([sample["label"] for sample in samples], dtype=torch.long)
    return batch
