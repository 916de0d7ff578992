"""ImageClassificationDataModule: image classification data from any ``datasets`` source.

The source, splits, hold-out, loaders and batch sizes are ``BaseDataModule``'s; this module reads
the class names, checks the label column, decodes and transforms one image, and stacks samples
into a :class:`~mambaout_pl.data.batches.ClassificationBatch` (``"label"`` only when the split has
labels).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
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
from mambaout_pl.data.errors import ColumnNotFoundError, DataError, InvalidLabelError
from mambaout_pl.data.images import read_rgb_image
from mambaout_pl.data.sources import AnyDataset
from mambaout_pl.data.transforms import create_classification_transforms


class ImageClassificationDataModule(BaseDataModule):
    """Image classification batches from a Hub dataset, an image folder, parquet or ``builtin:digits``.

    Args:
        label_column: Column holding the integer (or ClassLabel) labels.
        label_names: Class names in label order; None takes them from the train split (its ClassLabel
            names, else ``"0"`` up to its largest label). ``predict --ckpt_path`` sets the checkpoint's.
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
    builtin_datasets = (
        frozenset(embedded.BUILTIN_DATASETS) - embedded.SEGMENTATION_DATASETS - embedded.DETECTION_DATASETS
    )
    # The class names reach the task through the CLI's links; saving them here too would clash.
    hparams_ignore = ("label_names",)

    def __init__(
        self,
        label_column: str = "label",
        label_names: list[str] | None = None,
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
        if label_names is not None and len(label_names) < 2:
            raise ValueError(
                f"label_names={label_names!r} names {len(label_names)} class: a classifier needs at least two."
            )
        self._label_names_argument = None if label_names is None else [str(name) for name in label_names]
        if label_column == self.hparams.image_column:
            raise ValueError(
                f"label_column={label_column!r} is also the image_column: set `label_column` to the column of "
                "integer (or ClassLabel) labels and `image_column` to the column of images."
            )
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
        """``label_names``, else the ClassLabel names of the train split, else ``"0" .. str(largest label)``."""
        if self._label_names_argument is not None:
            return list(self._label_names_argument)
        hp = self.hparams
        train = self.split(hp.train_split, "train_split")
        folder = self.image_folder()
        if folder is not None and train.column_names is not None and hp.label_column not in train.column_names:
            check_class_folders(folder, [])
        check_columns(train, {"label_column": hp.label_column}, split=hp.train_split)
        feature = (train.features or {}).get(hp.label_column)
        if isinstance(feature, ClassLabel):
            names = list(feature.names)
            if folder is not None:
                check_class_folders(folder, names)
            if len(names) < 2:
                raise DataError(
                    f"Split {hp.train_split!r} of {self.describe_source()!r} has a single class ({names}): a "
                    "classifier needs at least two. Add the other classes' data."
                )
            return names
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

    def image_folder(self) -> Path | None:
        """The local folder read by the ``imagefolder`` builder, if that is the source."""
        path, data_dir = self.source
        if path != "imagefolder" or data_dir is None or not Path(data_dir).expanduser().is_dir():
            return None
        return Path(data_dir).expanduser()

    def check_split(self, dataset: AnyDataset, split: str, role: str) -> AnyDataset:
        """Labelled roles: the label column exists, names the train split's classes and is in range."""
        hp = self.hparams
        if role == "predict":
            return dataset
        check_columns(dataset, {"label_column": hp.label_column}, split=split)
        feature = (dataset.features or {}).get(hp.label_column)
        if isinstance(feature, ClassLabel) and list(feature.names) != self.label_names:
            named = "`label_names` names" if self._label_names_argument is not None else "the train split names"
            raise InvalidLabelError(
                f"Split {split!r} names its classes {feature.names}, but {named} them "
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
        stored = self._get(example, self.image_column, "image_column")
        sample: dict[str, Any] = {"image": self.transform(read_rgb_image(stored))}
        if self.num_classes is None:
            sample["file"] = (stored.get("path") if isinstance(stored, dict) else None) or ""
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
    if "file" in samples[0]:
        batch["file"] = [sample["file"] for sample in samples]
    return batch


def check_class_folders(folder: Path, label_names: list[str]) -> None:
    """Raise if an image folder's class sub-folder holds no files (``datasets`` drops that class without a word).

    With fewer than two class folders, ``datasets`` gives no labels at all: say so.
    """
    split_folders = [child for child in sorted(folder.iterdir()) if child.is_dir()]
    class_folders = [sub for split in split_folders for sub in sorted(split.iterdir()) if sub.is_dir()]
    class_folders = class_folders or split_folders  # <data_dir>/<class>/<image>: no split folders
    for class_folder in class_folders:
        if class_folder.name not in label_names and not any(path.is_file() for path in class_folder.rglob("*")):
            raise DataError(
                f"Class folder '{class_folder}' holds no images, so class {class_folder.name!r} would be left out "
                "of the classes (and every later class index would shift). Add its images, or remove the folder."
            )
    names = sorted({class_folder.name for class_folder in class_folders})
    if not label_names and len(names) <= 1:
        found = f"only one class folder ({names[0]!r})" if names else "no class folders"
        raise DataError(
            f"Image folder '{folder}' has {found}, so it has no labels: a classifier "
            "needs at least two classes, as <data_dir>/<split>/<class>/<image> folders."
        )
