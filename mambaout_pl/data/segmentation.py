"""SegmentationDataModule: images with per-pixel label maps from any ``datasets`` source.

Read top to bottom: the data module (arguments, classes, setup, dataloaders), then the torch
dataset that decodes, checks and transforms one example, then the collate functions.

Training batches are ``{"image": float [B, 3, h, w], "mask": long [B, h, w]}`` of equal crops.
Validation, test and predict batches keep each label map at its original size, so predictions are
scored where the labels are: ``"image"`` (rescaled, padded with 0 to the largest in the batch),
``"image_size"`` (long ``[B, 2]``: each image's rescaled height and width before padding),
``"original_size"`` (long ``[B, 2]``: each label map's height and width), ``"mask"`` (long
``[B, H, W]``, padded with ``ignore_index``; absent from unlabelled predict batches) and
``"name"`` (a list of file name stems or row numbers, for writing predictions).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as F

from mambaout_pl.data import embedded
from mambaout_pl.data.ade20k import (
    ADE20K_CLASSES,
    load_ade20k_folder,
    read_class_names,
    split_folder_name,
)
from mambaout_pl.data.resumable import ResumableTrainData, evaluation_sampler
from mambaout_pl.data.segmentation_transforms import SegmentationTransform, create_segmentation_transforms
from mambaout_pl.data.sources import (
    ColumnNotFoundError,
    CorruptImageError,
    DataError,
    InvalidLabelError,
    check_columns,
    check_not_empty,
    get_split,
    open_dataset,
    open_image,
    read_rgb_image,
)

Batch = dict[str, Any]

# Mask modes that hold one class index per pixel.
_INDEX_MODES = ("L", "P", "I", "I;16", "I;16L", "I;16B", "1")


class SegmentationDataModule(ResumableTrainData, LightningDataModule):
    """Semantic segmentation batches from an ADE20K-layout folder, a Hub dataset, parquet or ``builtin:digit_scenes``.

    Args:
        path: What to open when ``data_dir`` is not set: a Hub id or a builder (``"parquet"`` with
            ``data_files``) whose rows hold an image and a label map, a folder written by
            ``save_to_disk``, or ``"builtin:digit_scenes"`` (embedded, no network).
        data_dir: A local folder in the ADEChallengeData2016 layout (``images/{training,validation}``,
            ``annotations/{training,validation}``); read instead of ``path`` when given.
        name: Dataset configuration (subset) name, as in ``datasets.load_dataset``.
        data_files: Data files for a builder: a path or glob, a list, or a dict split -> files.
        revision: Hub dataset revision (branch, tag or commit).
        cache_dir: Cache folder for ``datasets`` and for embedded datasets.
        train_split: Split to train on (an ADE20K-layout folder's ``training`` folder is ``"train"``).
        val_split: Split to validate on.
        test_split: Split for ``trainer.test`` (label maps required).
        predict_split: Split for ``trainer.predict`` (label maps optional).
        image_column: Column holding the images.
        mask_column: Column holding the label maps (single-channel images of class indices).
        num_classes: Number of classes; None takes it from the data (ADE20K layout: 150, a folder's
            ``class_names.txt``, the embedded scenes: 11).
        label_names: Class names in label order; None takes them from the data where it names them.
        reduce_zero_label: Label 0 marks unlabelled pixels and classes start at 1 (ADE20K): 0
            becomes ``ignore_index`` and every other label drops by one.
        ignore_index: Label of pixels that are neither trained on nor scored.
        crop_size: Training crop, an int (square) or ``(height, width)``.
        scale: The ``(long, short)`` sides images are rescaled to fit, keeping their aspect ratio
            (training: times a random ratio; evaluation: as is).
        ratio_range: Range of the random training rescale ratio.
        cat_max_ratio: Largest share of a training crop one class may cover (1: no limit).
        hflip: Probability of a horizontal flip.
        photometric_distortion: Apply mmsegmentation's photometric distortion in training.
        mean: Normalisation mean (RGB, 0..1 scale).
        std: Normalisation standard deviation (RGB, 0..1 scale).
        batch_size: Training batch size per device.
        eval_batch_size: Validation/test/predict batch size per device (images of different sizes
            are padded into one batch and cropped back before inference).
        num_workers: Dataloader worker processes per device.
        pin_memory: Pin batches in page-locked memory for faster host-to-GPU copies (CUDA only).
        persistent_workers: Keep workers alive between epochs (only used when num_workers > 0).
        drop_last: Drop the last incomplete training batch.
        seed: Seed of the training order and augmentations (a function of seed, epoch and
            example, so that a resumed run continues exactly; on several processes Lightning's
            ``DistributedSampler`` orders by ``seed_everything`` instead).
    """

    def __init__(
        self,
        path: str | None = "builtin:digit_scenes",
        data_dir: str | None = None,
        name: str | None = None,
        data_files: str | list[str] | dict[str, str | list[str]] | None = None,
        revision: str | None = None,
        cache_dir: str | None = None,
        train_split: str = "train",
        val_split: str = "validation",
        test_split: str | None = None,
        predict_split: str | None = None,
        image_column: str = "image",
        mask_column: str = "mask",
        num_classes: int | None = None,
        label_names: list[str] | None = None,
        reduce_zero_label: bool = False,
        ignore_index: int = 255,
        crop_size: int | tuple[int, int] = 512,
        scale: tuple[int, int] = (2048, 512),
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        hflip: float = 0.5,
        photometric_distortion: bool = True,
        mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
        batch_size: int = 16,
        eval_batch_size: int = 1,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        drop_last: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        # The resolved class count and names reach the task (and its hyper-parameters) through the
        # CLI's links; saving the unresolved arguments here too would clash with them.
        self.save_hyperparameters(ignore=["num_classes", "label_names"])
        self._num_classes_argument = num_classes
        self._label_names_argument = None if label_names is None else [str(name) for name in label_names]
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be >= 1, or None to take it from the data.")
        if label_names is not None and num_classes is not None and len(label_names) != num_classes:
            raise ValueError(
                f"label_names has {len(label_names)} names but num_classes is {num_classes}; give one name "
                "per class, or set only one of them."
            )
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"batch_size={batch_size} and eval_batch_size={eval_batch_size} must be >= 1.")
        options = dict(
            crop_size=crop_size,
            scale=scale,
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
        self._splits: Any = None  # all splits as opened, loaded on first use
        self._folder: Path | None = None  # the ADE20K-layout folder, when the data is one
        self._label_names: list[str] | None = None
        # torch datasets built by setup, by role: "train", "val", "test", "predict"
        self.datasets: dict[str, torch.utils.data.Dataset] = {}

    # -- what the data is ---------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        """Number of classes (``num_classes``, else from the data)."""
        return len(self.label_names)

    @property
    def label_names(self) -> list[str]:
        """Class names in label order (``label_names``, else the data's, else ``"0"``, ``"1"``, ...)."""
        if self._label_names is None:
            self._label_names = self._resolve_label_names()
        return list(self._label_names)

    def _resolve_label_names(self) -> list[str]:
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
                f"Cannot tell the number of classes of {self._describe_source()}: its label maps do not name "
                "them. Set `num_classes` (and optionally `label_names`)."
            )
        return known

    def _known_label_names(self) -> list[str] | None:
        """The class names the data itself gives: a folder's ``class_names.txt``, else ADE20K's."""
        self._open()
        if self._folder is None:
            return None
        names = read_class_names(self._folder)
        if names is not None:
            return names
        if self.hparams.reduce_zero_label:
            return list(ADE20K_CLASSES)
        return ["other", *ADE20K_CLASSES]

    def _describe_source(self) -> str:
        hp = self.hparams
        if hp.data_dir is not None:
            return f"data_dir={hp.data_dir!r}"
        return f"path={hp.path!r}"

    def _open(self) -> Any:
        if self._splits is None:
            hp = self.hparams
            if hp.data_dir is not None:
                if hp.path is not None and not hp.path.startswith(embedded.BUILTIN_PREFIX):
                    rank_zero_info(f"Reading data_dir={hp.data_dir!r} (ADEChallengeData2016 layout) instead of path={hp.path!r}.")
                self._folder = Path(hp.data_dir).expanduser()
            elif hp.path is None:
                raise DataError("No data: set `data_dir` (an ADEChallengeData2016-layout folder) or `path`.")
            elif hp.path.startswith(embedded.BUILTIN_PREFIX):
                self._folder = self._materialize_builtin(hp.path)
            if self._folder is not None:
                self._splits = load_ade20k_folder(self._folder)
            else:
                self._splits = open_dataset(
                    hp.path,
                    name=hp.name,
                    data_files=hp.data_files,
                    revision=hp.revision,
                    cache_dir=hp.cache_dir,
                )
        return self._splits

    def _materialize_builtin(self, path: str) -> Path:
        try:
            name = embedded.builtin_name(path)
        except ValueError as error:
            raise DataError(f"{error} Set `path` to one of them.") from error
        if name not in embedded.SEGMENTATION_DATASETS:
            known = ", ".join(f"'{embedded.BUILTIN_PREFIX}{n}'" for n in sorted(embedded.SEGMENTATION_DATASETS))
            raise DataError(f"path={path!r} is not a segmentation dataset; embedded segmentation datasets: {known}.")
        return embedded.materialize(path, cache_dir=self.hparams.cache_dir)

    def _split(self, split: str, argument: str) -> Dataset:
        return get_split(self._open(), split, argument=argument, path=self._describe_source())

    # -- setup --------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Write the embedded data or download the Hub data once per node, before ``setup`` runs on every rank."""
        self._open()

    def setup(self, stage: str | None = None) -> None:
        """Open, check and wrap the splits ``stage`` needs (all configured splits when None)."""
        hp = self.hparams
        if stage in (None, "fit", "validate"):
            self.datasets["train"] = self._wrap(hp.train_split, "train_split", "train")
            self.datasets["val"] = self._wrap(hp.val_split, "val_split", "val")
        if stage in (None, "test") and hp.test_split is not None:
            self.datasets["test"] = self._wrap(hp.test_split, "test_split", "test")
        if stage == "test" and hp.test_split is None:
            raise DataError("trainer.test needs a test split: set `test_split` (e.g. 'validation').")
        if stage in (None, "predict") and hp.predict_split is not None:
            self.datasets["predict"] = self._wrap(hp.predict_split, "predict_split", "predict")
        if stage == "predict" and hp.predict_split is None:
            raise DataError("trainer.predict needs a split: set `predict_split` (e.g. 'validation').")

    def _wrap(self, split: str, argument: str, role: str) -> SegmentationSamples:
        hp = self.hparams
        dataset = self._split(split, argument)
        check_not_empty(dataset, split, argument, path=self._describe_source())
        check_columns(dataset, {"image_column": hp.image_column}, split=split)
        has_masks = hp.mask_column in dataset.column_names
        if role != "predict" and not has_masks:
            raise ColumnNotFoundError(self._missing_masks_message(dataset, split))
        columns = {hp.image_column: ImageFeature(decode=False)}
        if has_masks:
            columns[hp.mask_column] = ImageFeature(decode=False)
        for column, feature in columns.items():
            if not isinstance(dataset.features.get(column), ImageFeature):
                raise DataError(
                    f"Column {column!r} of split {split!r} holds {dataset.features.get(column)}, not images. "
                    "Set `image_column` / `mask_column` to image columns (label maps are single-channel images)."
                )
            dataset = dataset.cast_column(column, feature)
        return SegmentationSamples(
            dataset,
            transform=self.train_transform if role == "train" else self.eval_transform,
            image_column=hp.image_column,
            mask_column=hp.mask_column if has_masks else None,
            num_classes=self.num_classes,
            reduce_zero_label=hp.reduce_zero_label,
            ignore_index=hp.ignore_index,
            split=split,
            training=role == "train",
        )

    def _missing_masks_message(self, dataset: Dataset, split: str) -> str:
        hp = self.hparams
        if self._folder is not None:
            folder = self._folder / "annotations" / split_folder_name(split)
            return (
                f"Split {split!r} has no label maps: folder {str(folder)!r} does not exist. Put one PNG label map "
                f"per image there (same file name stem as in {str(self._folder / 'images' / split_folder_name(split))!r}), "
                "or point `data_dir` at the folder holding images/ and annotations/."
            )
        return (
            f"Column {hp.mask_column!r} does not exist in split {split!r}; available columns: "
            f"{dataset.column_names}. Set `mask_column` to the column holding the label maps."
        )

    # -- dataloaders --------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches of equal crops."""
        return self._loader("train", self.hparams.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in dataset order, label maps at their original size."""
        return self._loader("val", self.hparams.eval_batch_size, train=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches in dataset order, label maps at their original size."""
        return self._loader("test", self.hparams.eval_batch_size, train=False)

    def predict_dataloader(self) -> DataLoader:
        """Predict batches in dataset order, with each image's original size and name."""
        return self._loader("predict", self.hparams.eval_batch_size, train=False)

    def _loader(self, role: str, batch_size: int, train: bool) -> DataLoader:
        hp = self.hparams
        if role not in self.datasets:
            self.setup({"train": "fit", "val": "validate"}.get(role, role))
        if train:
            return self.resumable_train_loader(self.datasets[role], batch_size, collate_train)
        return DataLoader(
            self.datasets[role],
            batch_size=batch_size,
            sampler=evaluation_sampler(self.datasets[role], self.trainer),
            num_workers=hp.num_workers,
            pin_memory=hp.pin_memory and torch.cuda.is_available(),
            persistent_workers=hp.persistent_workers and hp.num_workers > 0,
            collate_fn=EvalCollate(hp.ignore_index),
        )


# ---------------------------------------------------------------------------------------------
# one example -> one sample


class SegmentationSamples(torch.utils.data.Dataset):
    """A map-style ``datasets.Dataset`` of (image, label map) rows seen as ready samples.

    Decodes both, checks that they have the same size and that every label is a class or
    ``ignore_index`` (after ``reduce_zero_label``), then applies the transform. Raises naming the
    files (or the row) and the setting to change.
    """

    def __init__(
        self,
        dataset: Dataset,
        transform: SegmentationTransform,
        image_column: str,
        mask_column: str | None,
        num_classes: int,
        reduce_zero_label: bool,
        ignore_index: int,
        split: str,
        training: bool,
    ) -> None:
        self.dataset = dataset
        self.transform = transform
        self.image_column = image_column
        self.mask_column = mask_column
        self.num_classes = num_classes
        self.reduce_zero_label = reduce_zero_label
        self.ignore_index = ignore_index
        self.split = split
        self.training = training

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.dataset[int(index)]
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


def collate_train(samples: list[dict[str, Any]]) -> Batch:
    """Stack equal training crops into ``{"image": float [B, 3, h, w], "mask": long [B, h, w]}``."""
    return {
        "image": torch.stack([sample["image"] for sample in samples]),
        "mask": torch.stack([sample["mask"] for sample in samples]),
    }


class EvalCollate:
    """Pad images (with 0) and label maps (with ``ignore_index``) to the largest in the batch."""

    def __init__(self, ignore_index: int = 255) -> None:
        self.ignore_index = ignore_index

    def __call__(self, samples: list[dict[str, Any]]) -> Batch:
        batch: Batch = {
            "image": _pad_stack([sample["image"] for sample in samples], 0.0),
            "image_size": torch.stack([sample["image_size"] for sample in samples]),
            "original_size": torch.stack([sample["original_size"] for sample in samples]),
            "name": [sample["name"] for sample in samples],
        }
        if all("mask" in sample for sample in samples):
            batch["mask"] = _pad_stack([sample["mask"] for sample in samples], self.ignore_index)
        return batch


def _pad_stack(tensors: Sequence[torch.Tensor], fill: float) -> torch.Tensor:
    height = max(tensor.shape[-2] for tensor in tensors)
    width = max(tensor.shape[-1] for tensor in tensors)
    out = tensors[0].new_full((len(tensors), *tensors[0].shape[:-2], height, width), fill)
    for index, tensor in enumerate(tensors):
        out[index, ..., : tensor.shape[-2], : tensor.shape[-1]] = tensor
    return out
