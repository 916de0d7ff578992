"""ImageClassificationDataModule: image classification data from any ``datasets`` source.

Read top to bottom: the data module (arguments, classes, setup, dataloaders), then the torch
datasets that decode and transform one example, then the collate function.

Batches are dicts ``{"image": float [B, 3, H, W], "label": long [B]}``; predict batches hold a
``"label"`` only when the predict split has the label column.

Distributed training:

- map-style data (the default) is sharded by the ``DistributedSampler`` Lightning inserts into
  the train/val/test dataloaders, so each rank sees a disjoint part of every epoch;
- ``streaming=True`` gives an iterable dataset that Lightning cannot shard. We shuffle it (with
  a fixed seed, reshuffled each epoch via ``set_epoch``) and split it across ranks with
  ``datasets.distributed.split_dataset_by_node`` (whole shards when the number of shards is a
  multiple of the world size, else every world_size-th example). Within a rank, ``datasets``
  hands each dataloader worker its own shards, so use at most ``num_shards / world_size``
  workers (extra workers idle). Ranks may get unequal numbers of batches: cap the epoch with
  the trainer's ``limit_train_batches`` / ``max_steps`` so that DDP ranks stay in step.
"""

from __future__ import annotations

import multiprocessing
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Dataset, IterableDataset
from datasets import Image as ImageFeature
from datasets.distributed import split_dataset_by_node
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader

from mambaout_pl.data.resumable import ResumableTrainData, evaluation_sampler
from mambaout_pl.data.sources import (
    AnyDataset,
    ColumnNotFoundError,
    CorruptImageError,
    DataError,
    InvalidLabelError,
    SplitNotFoundError,
    check_columns,
    check_labels,
    check_not_empty,
    get_split,
    integer_labels,
    open_dataset,
    read_rgb_image,
)
from mambaout_pl.data.transforms import create_classification_transforms

Batch = dict[str, torch.Tensor]


class ImageClassificationDataModule(ResumableTrainData, LightningDataModule):
    """Image classification batches from a Hub dataset, an image folder, parquet or ``builtin:digits``.

    Args:
        path: What to open: a Hub id (``"ILSVRC/imagenet-1k"``), a builder (``"imagefolder"``,
            ``"parquet"``) with ``data_dir``/``data_files``, a local folder (also one written by
            ``save_to_disk``), or an embedded dataset (``"builtin:digits"``, no network).
        name: Dataset configuration (subset) name, as in ``datasets.load_dataset``.
        data_dir: Folder of the data files (for ``"imagefolder"``: ``<data_dir>/<split>/<class>/*``).
        data_files: Data files: a path or glob, a list of them, or a dict split -> files.
        revision: Hub dataset revision (branch, tag or commit).
        cache_dir: Cache folder for ``datasets`` and for embedded datasets.
        train_split: Split to train on.
        val_split: Split to validate on; when the dataset has no such split, a seeded
            ``val_fraction`` of ``train_split`` is held out instead.
        test_split: Split for ``trainer.test`` (labels required).
        predict_split: Split for ``trainer.predict`` (labels optional; -1 allowed).
        val_fraction: Fraction of ``train_split`` held out for validation when ``val_split`` is
            missing (0 disables the hold-out).
        seed: Seed of the validation hold-out, of the training order and augmentations (a function
            of seed, epoch and example, so that a resumed run continues exactly; on several
            processes Lightning's ``DistributedSampler`` orders by ``seed_everything`` instead) and
            of the streaming shuffle.
        image_column: Column holding the images.
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
        batch_size: Training batch size per device.
        eval_batch_size: Validation/test/predict batch size per device; None means ``batch_size``.
        num_workers: Dataloader worker processes per device.
        pin_memory: Pin batches in page-locked memory for faster host-to-GPU copies (CUDA only).
        persistent_workers: Keep workers alive between epochs (only used when num_workers > 0).
        drop_last: Drop the last incomplete training batch (Mixup needs even batch sizes).
        streaming: Stream the data (``IterableDataset``) instead of preparing it on disk first.
        shuffle_buffer_size: Streaming only: examples in the shuffle buffer of each worker.
        skip_corrupt: Skip images that cannot be decoded (counted in ``num_skipped``, with a
            warning) instead of raising: map-style data fills the slot with the next readable
            example, so batch sizes do not change; streamed data leaves it out.
    """

    def __init__(
        self,
        path: str = "builtin:digits",
        name: str | None = None,
        data_dir: str | None = None,
        data_files: str | list[str] | dict[str, str | list[str]] | None = None,
        revision: str | None = None,
        cache_dir: str | None = None,
        train_split: str = "train",
        val_split: str | None = "validation",
        test_split: str | None = None,
        predict_split: str | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        image_column: str = "image",
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
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        drop_last: bool = True,
        streaming: bool = False,
        shuffle_buffer_size: int = 1000,
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} must be in [0, 1).")
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError(f"batch_size={batch_size} and eval_batch_size={eval_batch_size} must be >= 1.")
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
        self._splits: Any = None  # all splits as opened, loaded on first use
        self._label_names: list[str] | None = None
        # torch datasets built by setup, by role: "train", "val", "test", "predict"
        self.datasets: dict[str, torch.utils.data.Dataset] = {}
        self._skipped = multiprocessing.Value("q", 0)  # shared with dataloader workers

    # -- what the data is ---------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        """Number of classes, from the train split (opened on first access)."""
        return len(self.label_names)

    @property
    def label_names(self) -> list[str]:
        """Class names in label order: ClassLabel names, else ``"0" .. str(max label)``."""
        if self._label_names is None:
            self._label_names = self._read_label_names()
        return list(self._label_names)

    @property
    def num_skipped(self) -> int:
        """Corrupt images skipped so far in this process and its workers (``skip_corrupt=True``)."""
        return int(self._skipped.value)

    def _open(self) -> Any:
        """All splits, opened once (``datasets`` caches prepared data on disk)."""
        if self._splits is None:
            hp = self.hparams
            self._splits = open_dataset(
                hp.path,
                name=hp.name,
                data_dir=hp.data_dir,
                data_files=hp.data_files,
                revision=hp.revision,
                streaming=hp.streaming,
                cache_dir=hp.cache_dir,
            )
        return self._splits

    def _split(self, split: str, argument: str) -> AnyDataset:
        return get_split(self._open(), split, argument=argument, path=self.hparams.path)

    def _read_label_names(self) -> list[str]:
        hp = self.hparams
        train = self._split(hp.train_split, "train_split")
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

    # -- setup --------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Download and prepare the data once per node, before ``setup`` runs on every rank."""
        self._open()

    def setup(self, stage: str | None = None) -> None:
        """Open, check and wrap the splits ``stage`` needs (all configured splits when None)."""
        hp = self.hparams
        if stage in (None, "fit", "validate"):
            self._setup_train_and_val()
        if stage in (None, "test") and hp.test_split is not None:
            self.datasets["test"] = self._wrap(self._checked(hp.test_split, "test_split"), hp.test_split, "test")
        if stage == "test" and hp.test_split is None:
            raise DataError("trainer.test needs a test split: set `test_split` (e.g. 'test' or 'validation').")
        if stage in (None, "predict") and hp.predict_split is not None:
            split = self._checked(hp.predict_split, "predict_split", labels=False)
            self.datasets["predict"] = self._wrap(split, hp.predict_split, "predict")
        if stage == "predict" and hp.predict_split is None:
            raise DataError("trainer.predict needs a split: set `predict_split` (e.g. 'test').")

    def _setup_train_and_val(self) -> None:
        hp = self.hparams
        train = self._checked(hp.train_split, "train_split")
        if hp.val_split is not None and hp.val_split in self._open():
            val, val_name = self._checked(hp.val_split, "val_split"), hp.val_split
        elif hp.val_fraction > 0 and not hp.streaming:
            train, val = self._hold_out(train)
            val_name = f"{hp.train_split} (held-out validation part)"
            missing = "No `val_split` set" if hp.val_split is None else f"No split {hp.val_split!r}"
            rank_zero_info(
                f"{missing}: validating on {len(val)} examples held out of "
                f"{hp.train_split!r} (val_fraction={hp.val_fraction}, seed={hp.seed})."
            )
        else:
            available = sorted(self._open())
            how = "set `val_split` to one of them"
            if not hp.streaming:
                how += " or `val_fraction` > 0 to hold out part of train"
            missing = "no `val_split` is set" if hp.val_split is None else f"split {hp.val_split!r} does not exist"
            raise SplitNotFoundError(
                f"No validation data: {missing} (available splits: {available}) "
                f"and {'streaming data cannot be held out' if hp.streaming else 'val_fraction is 0'}; {how}."
            )
        self.datasets["train"] = self._wrap(train, hp.train_split, "train")
        self.datasets["val"] = self._wrap(val, val_name, "val")

    def _checked(self, split: str, argument: str, labels: bool = True) -> AnyDataset:
        """Split ``split`` with its columns and labels checked and its images left undecoded."""
        hp = self.hparams
        dataset = self._split(split, argument)
        check_not_empty(dataset, split, argument, path=hp.path if hp.data_dir is None else hp.data_dir)
        check_columns(dataset, {"image_column": hp.image_column}, split=split)
        if labels:
            check_columns(dataset, {"label_column": hp.label_column}, split=split)
            self._check_class_names(dataset, split)
            if isinstance(dataset, Dataset):
                check_labels(dataset, hp.label_column, self.num_classes, split=split)
        if dataset.features is not None:  # streaming data may not know its features before reading
            dataset = dataset.cast_column(hp.image_column, ImageFeature(decode=False))
        return dataset

    def _check_class_names(self, dataset: AnyDataset, split: str) -> None:
        feature = (dataset.features or {}).get(self.hparams.label_column)
        if isinstance(feature, ClassLabel) and list(feature.names) != self.label_names:
            raise InvalidLabelError(
                f"Split {split!r} names its classes {feature.names}, but the train split names them "
                f"{self.label_names}: the same label would mean different classes. Give every split "
                "the same classes (for an image folder: the same class sub-folders)."
            )

    def _hold_out(self, train: Dataset) -> tuple[Dataset, Dataset]:
        """Split ``train`` into (train, val) with a permutation seeded by ``seed``."""
        order = np.random.default_rng(self.hparams.seed).permutation(len(train))
        num_val = max(1, round(self.hparams.val_fraction * len(train)))
        if num_val >= len(train):
            raise DataError(f"val_fraction={self.hparams.val_fraction} leaves no training examples of {len(train)}.")
        val_rows, train_rows = np.sort(order[:num_val]), np.sort(order[num_val:])
        return train.select(train_rows, keep_in_memory=True), train.select(val_rows, keep_in_memory=True)

    def _wrap(self, dataset: AnyDataset, split_name: str, role: str) -> torch.utils.data.Dataset:
        """A torch dataset of ready samples; streaming data is also shuffled and split by rank."""
        hp = self.hparams
        columns = dataset.column_names
        has_labels = role != "predict" or columns is None or hp.label_column in columns
        make_sample = SampleMaker(
            transform=self.train_transform if role == "train" else self.eval_transform,
            image_column=hp.image_column,
            label_column=hp.label_column if has_labels else None,
            num_classes=self.num_classes if role != "predict" else None,
            split=split_name,
            skip_corrupt=hp.skip_corrupt,
            skipped=self._skipped,
        )
        if isinstance(dataset, Dataset):
            return ClassificationSamples(dataset, make_sample)
        if role == "train":
            dataset = dataset.shuffle(seed=hp.seed, buffer_size=hp.shuffle_buffer_size)
        rank, world_size = self._rank_and_world_size()
        if world_size > 1:
            dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        return StreamingClassificationSamples(dataset, make_sample)

    def _rank_and_world_size(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    # -- dataloaders --------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; the last incomplete batch is dropped when ``drop_last``."""
        return self._loader("train", self.hparams.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in dataset order."""
        return self._loader("val", self._eval_batch_size(), train=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches in dataset order."""
        return self._loader("test", self._eval_batch_size(), train=False)

    def predict_dataloader(self) -> DataLoader:
        """Predict batches in dataset order (``"label"`` only when the split has labels)."""
        return self._loader("predict", self._eval_batch_size(), train=False)

    def _eval_batch_size(self) -> int:
        return self.hparams.eval_batch_size or self.hparams.batch_size

    def _loader(self, role: str, batch_size: int, train: bool) -> DataLoader:
        hp = self.hparams
        if role not in self.datasets:
            self.setup({"train": "fit", "val": "validate"}.get(role, role))
        dataset = self.datasets[role]
        streamed = isinstance(dataset, StreamingClassificationSamples)
        if train and not streamed:
            return self.resumable_train_loader(dataset, batch_size, collate_samples)
        loader_class = EpochReshufflingDataLoader if streamed and train else DataLoader
        loader = loader_class(
            dataset,
            batch_size=batch_size,
            sampler=None if streamed else evaluation_sampler(dataset, self.trainer),
            drop_last=train and hp.drop_last,
            num_workers=hp.num_workers,
            pin_memory=hp.pin_memory and torch.cuda.is_available(),
            persistent_workers=hp.persistent_workers and hp.num_workers > 0,
            collate_fn=collate_samples,
        )
        if loader_class is EpochReshufflingDataLoader:
            loader.current_epoch = lambda: self.trainer.current_epoch if self.trainer is not None else 0
        return loader


# ---------------------------------------------------------------------------------------------
# one example -> one sample


# Consecutive unreadable examples after which ``skip_corrupt`` gives up on a dataset.
_MAX_CONSECUTIVE_CORRUPT = 64


@dataclass
class SampleMaker:
    """Decode, check and transform one example into ``{"image", "label"}``.

    Returns None for an unreadable image when ``skip_corrupt`` (and counts it), else raises.
    """

    transform: Callable[[Any], torch.Tensor]
    image_column: str
    label_column: str | None  # None: no labels (predict)
    num_classes: int | None  # None: labels optional and not range-checked (predict)
    split: str
    skip_corrupt: bool
    skipped: Any  # a multiprocessing.Value counting skipped images

    def __call__(self, example: dict[str, Any], index: int) -> dict[str, Any] | None:
        try:
            image = read_rgb_image(self._get(example, self.image_column, "image_column"))
        except CorruptImageError as error:
            message = f"Corrupt image at index {index} of split {self.split!r}: {error}"
            if not self.skip_corrupt:
                raise CorruptImageError(message + " Fix or remove the file, or set `skip_corrupt=True`.") from error
            with self.skipped.get_lock():
                self.skipped.value += 1
            warnings.warn(f"{message} Skipped (skip_corrupt=True).", stacklevel=2)
            return None
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


class ClassificationSamples(torch.utils.data.Dataset):
    """A map-style ``datasets.Dataset`` seen as samples (see :class:`SampleMaker`).

    With ``skip_corrupt``, an unreadable example is replaced by the next readable one, so that
    batches keep their size (even sizes for Mixup, never an empty batch).
    """

    def __init__(self, dataset: Dataset, make_sample: SampleMaker) -> None:
        self.dataset = dataset
        self.make_sample = make_sample

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        for offset in range(min(_MAX_CONSECUTIVE_CORRUPT, len(self.dataset))):
            row = (int(index) + offset) % len(self.dataset)
            sample = self.make_sample(self.dataset[row], row)
            if sample is not None:
                return sample
        raise CorruptImageError(
            f"{_MAX_CONSECUTIVE_CORRUPT} consecutive images from index {index} of split "
            f"{self.make_sample.split!r} cannot be decoded; check the image files."
        )


class StreamingClassificationSamples(torch.utils.data.IterableDataset):
    """A streaming ``datasets.IterableDataset`` seen as samples; ``datasets`` shards it by worker.

    With ``skip_corrupt``, unreadable examples are left out of the stream.
    """

    def __init__(self, dataset: IterableDataset, make_sample: SampleMaker) -> None:
        self.dataset = dataset
        self.make_sample = make_sample

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (shared with persistent workers by ``datasets``)."""
        self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for index, example in enumerate(self.dataset):
            sample = self.make_sample(example, index)
            if sample is not None:
                yield sample


class EpochReshufflingDataLoader(DataLoader):
    """A DataLoader that calls ``dataset.set_epoch(current_epoch())`` each time an epoch starts.

    Lightning only tells samplers the epoch, and an iterable dataset has no sampler.
    """

    current_epoch: Callable[[], int] = staticmethod(lambda: 0)

    def __iter__(self):
        self.dataset.set_epoch(self.current_epoch())
        return super().__iter__()


def collate_samples(samples: list[dict[str, Any]]) -> Batch:
    """Stack samples into ``{"image": float [B, 3, H, W], "label": long [B]}`` (label if present)."""
    batch = {"image": torch.stack([sample["image"] for sample in samples])}
    if "label" in samples[0]:
        batch["label"] = torch.tensor([sample["label"] for sample in samples], dtype=torch.long)
    return batch
