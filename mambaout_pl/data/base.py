"""BaseDataModule: the part of every task's data module that does not depend on the task.

It opens the source (``sources.py``), picks and checks the splits, holds out a seeded validation
part when there is no validation split, wraps each split as a torch dataset of samples, and hands
out the four loaders by role: training in a seeded order that a checkpoint resumes mid-epoch
(``resumable.py``), evaluation in order with each example on exactly one rank. A task's data module
supplies the rest: its label names, the checks of a split, how one example becomes a sample, and
how samples become a batch (``batches.py``).

Distributed training:

- map-style data (the default) is sharded by the ``DistributedSampler`` Lightning inserts into
  the training loader, and by :func:`evaluation_sampler` into the others, so each rank sees a
  disjoint part of every epoch;
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
from collections.abc import Callable, Iterator, Sized
from typing import Any

import numpy as np
import torch
from datasets import Dataset, IterableDataset
from datasets import Image as ImageFeature
from datasets.distributed import split_dataset_by_node
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Sampler

from mambaout_pl.data import embedded
from mambaout_pl.data.checks import check_columns, check_not_empty
from mambaout_pl.data.errors import CorruptImageError, DataError, SplitNotFoundError
from mambaout_pl.data.resumable import EpochShuffleSampler, ResumableDataLoader, SeededSamples, train_loader_state
from mambaout_pl.data.sources import AnyDataset, get_split, open_dataset, open_images, resolve_builtin
from mambaout_pl.data.workers import init_worker

#: One example (a row of the dataset) and its index -> one sample; raises CorruptImageError when unreadable.
Decoder = Callable[[dict[str, Any], int], dict[str, Any]]

# Consecutive unreadable examples after which ``skip_corrupt`` gives up on a dataset.
_MAX_CONSECUTIVE_CORRUPT = 64

ROLES = ("train", "val", "test", "predict")
_STAGE_OF_ROLE = {"train": "fit", "val": "validate", "test": "test", "predict": "predict"}


class BaseDataModule(LightningDataModule):
    """Splits of a ``datasets`` source as training, validation, test and predict batches.

    Args:
        path: What to open: a Hub id (``"ILSVRC/imagenet-1k"``), a builder (``"imagefolder"``,
            ``"parquet"``, ``"ade20k"`` for an ADEChallengeData2016-layout folder, ``"coco"`` for a
            COCO folder) with ``data_dir``/``data_files``, a local folder (also one written by
            ``save_to_disk``), or an embedded dataset (``"builtin:digits"``, ``"builtin:digit_scenes"``,
            ``"builtin:digit_detection"``, no network). None: the
            data module's embedded quick-start dataset.
        name: Dataset configuration (subset) name, as in ``datasets.load_dataset``.
        data_dir: Folder of the data files, as in ``datasets.load_dataset`` (for ``"imagefolder"``:
            ``<data_dir>/<split>/<class>/*``; for ``"ade20k"``: the folder holding ``images/`` and
            ``annotations/``; for ``"coco"``: the folder holding ``annotations/`` and the split folders).
        data_files: Data files: a path or glob, a list of them, or a dict split -> files.
        revision: Hub dataset revision (branch, tag or commit).
        cache_dir: Cache folder for ``datasets``, for embedded datasets and for image folder indexes.
        train_split: Split to train on (an ADE20K-layout folder's ``training`` folder is ``"train"``).
        val_split: Split to validate on; when the dataset has no such split, a seeded
            ``val_fraction`` of ``train_split`` is held out instead.
        test_split: Split for ``trainer.test`` (labels required). The ``val_split`` name of data without
            that split (``val_fraction`` held out of ``train_split``) tests on the held-out part.
        predict_split: Split for ``trainer.predict`` (labels optional); the ``val_split`` name as for ``test_split``.
        predict_images: Images for ``trainer.predict`` instead of ``predict_split``, read without labels: a
            folder (every image file under it, sub-folders included), a glob, or a list of files. The
            source above is then not opened to predict (the task's classes come from its checkpoint).
        val_fraction: Fraction of ``train_split`` held out for validation when ``val_split`` is
            missing (0 disables the hold-out).
        seed: Seed of the validation hold-out, of the training order and augmentations (a function
            of seed, epoch and example, so that a resumed run continues exactly; on several
            processes Lightning's ``DistributedSampler`` orders by ``seed_everything`` instead) and
            of the streaming shuffle.
        image_column: Column holding the images.
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

    #: ``path`` when None: the embedded quick-start dataset of this task (None: ``path`` is required).
    default_path: str | None = None
    #: The task's name in messages ("classification"), and the embedded datasets it can read.
    task: str = "this task's"
    builtin_datasets: frozenset[str] = frozenset()
    #: Constructor arguments left out of the saved hyper-parameters.
    hparams_ignore: tuple[str, ...] = ()

    def __init__(
        self,
        path: str | None = None,
        name: str | None = None,
        data_dir: str | None = None,
        data_files: str | list[str] | dict[str, str | list[str]] | None = None,
        revision: str | None = None,
        cache_dir: str | None = None,
        train_split: str = "train",
        val_split: str | None = "validation",
        test_split: str | None = None,
        predict_split: str | None = None,
        predict_images: str | list[str] | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        image_column: str = "image",
        batch_size: int = 32,
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
        self.save_hyperparameters(ignore=list(self.hparams_ignore))
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} must be in [0, 1).")
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError(f"batch_size={batch_size} and eval_batch_size={eval_batch_size} must be >= 1.")
        self._splits: Any = None  # all splits as opened, loaded on first use
        self._source: tuple[str, str | None] | None = None  # (path, data_dir) with builtin data resolved
        self._label_names: list[str] | None = None
        # torch datasets built by setup, by role: "train", "val", "test", "predict"
        self.datasets: dict[str, torch.utils.data.Dataset] = {}
        self._skipped = multiprocessing.Value("q", 0)  # shared with dataloader workers
        self._train_loader_resume_state: dict[str, int] | None = None  # from a checkpoint, for the next train loader

    # -- what a task's data module supplies ---------------------------------------------------

    def read_label_names(self) -> list[str]:
        """Class names in label order, from the arguments or the data."""
        raise NotImplementedError

    def check_split(self, dataset: AnyDataset, split: str, role: str) -> AnyDataset:
        """``dataset`` checked for ``role`` (its columns, labels), with other columns cast as needed."""
        return dataset

    def decoder(self, dataset: AnyDataset, split: str, role: str) -> Decoder:
        """How one example of ``dataset`` becomes a sample for ``role`` (decode, check, transform)."""
        raise NotImplementedError

    def collate(self, role: str) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        """How samples of ``role`` become a batch (see ``batches.py``)."""
        raise NotImplementedError

    # -- what the data is ---------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        """Number of classes (see ``label_names``)."""
        return len(self.label_names)

    @property
    def label_names(self) -> list[str]:
        """Class names in label order (read once)."""
        if self._label_names is None:
            self._label_names = self.read_label_names()
        return list(self._label_names)

    @property
    def num_skipped(self) -> int:
        """Corrupt images skipped so far in this process and its workers (``skip_corrupt=True``)."""
        return int(self._skipped.value)

    @property
    def source(self) -> tuple[str, str | None]:
        """``(path, data_dir)`` as opened: an embedded dataset is named by its builder and folder."""
        if self._source is None:
            hp = self.hparams
            path = self.default_path if hp.path is None else hp.path
            if path is None:
                raise DataError("No data: set `path` (a Hub id, a builder such as 'imagefolder', or a folder).")
            if path.startswith(embedded.BUILTIN_PREFIX):
                self._check_builtin(path)
            resolved_path, data_dir = resolve_builtin(path, hp.data_dir, hp.data_files, hp.cache_dir)
            self._source = (resolved_path, None if data_dir is None else str(data_dir))
        return self._source

    def describe_source(self) -> str:
        """The source as the user named it, for messages."""
        hp = self.hparams
        return hp.data_dir if hp.data_dir is not None else str(hp.path or self.default_path)

    def _check_builtin(self, path: str) -> None:
        try:
            name = embedded.builtin_name(path)
        except ValueError as error:
            raise DataError(f"{error} Set `path` to one of them.") from error
        if name not in self.builtin_datasets:
            known = ", ".join(f"'{embedded.BUILTIN_PREFIX}{known}'" for known in sorted(self.builtin_datasets))
            raise DataError(f"path={path!r} is not a {self.task} dataset; embedded {self.task} datasets: {known}.")

    def open(self) -> Any:
        """All splits, opened once (``datasets`` caches prepared data on disk)."""
        if self._splits is None:
            hp = self.hparams
            path, data_dir = self.source
            self._splits = open_dataset(
                path,
                name=hp.name,
                data_dir=data_dir,
                data_files=hp.data_files,
                revision=hp.revision,
                streaming=hp.streaming,
                cache_dir=hp.cache_dir,
            )
        return self._splits

    def split(self, split: str, argument: str) -> AnyDataset:
        """Split ``split`` as opened, or an error naming ``argument`` and the available splits."""
        return get_split(self.open(), split, argument=argument, path=self.describe_source())

    # -- setup --------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Write the embedded data or download the Hub data once per node, before ``setup`` runs on every rank
        (only ``predict_images`` when predicting them)."""
        if self.hparams.predict_images is not None and getattr(self.trainer, "predicting", False):
            self.open_predict_images()
        else:
            self.open()

    def open_predict_images(self) -> Dataset:
        """``predict_images`` as one split without labels, its images in ``image_column`` (see
        :func:`~mambaout_pl.data.sources.open_images`)."""
        hp = self.hparams
        images = open_images(hp.predict_images, cache_dir=hp.cache_dir)
        return images if hp.image_column == "image" else images.rename_column("image", hp.image_column)

    def setup(self, stage: str | None = None) -> None:
        """Open, check and wrap the splits ``stage`` needs (all configured splits when None)."""
        hp = self.hparams
        if stage in (None, "fit", "validate"):
            self._setup_train_and_val()
        if stage in (None, "predict") and hp.predict_images is not None:
            images = self._checked_dataset(self.open_predict_images(), "predict_images", "predict_images", "predict")
            self.datasets["predict"] = self._wrap(images, "predict_images", "predict")
        for role, example in (("test", "'test' or 'validation'"), ("predict", "'test'")):
            split = hp[f"{role}_split"]
            if role == "predict" and hp.predict_images is not None:
                continue
            if stage in (None, role) and split is not None:
                self.datasets[role] = self._wrap(self._evaluation_split(split, role), split, role)
            if stage == role and split is None:
                what = "a test split" if role == "test" else "a split"
                images = " or `predict_images` to a folder of images" if role == "predict" else ""
                raise DataError(f"trainer.{role} needs {what}: set `{role}_split` (e.g. {example}){images}.")

    def _setup_train_and_val(self) -> None:
        hp = self.hparams
        train = self._checked(hp.train_split, "train_split", "train")
        if hp.val_split is not None and hp.val_split in self.open():
            val, val_name = self._checked(hp.val_split, "val_split", "val"), hp.val_split
        elif hp.val_fraction > 0 and not hp.streaming:
            train, val = self._hold_out(train)
            val_name = f"{hp.train_split} (held-out validation part)"
            missing = "No `val_split` set" if hp.val_split is None else f"No split {hp.val_split!r}"
            rank_zero_info(
                f"{missing}: validating on {len(val)} examples held out of "
                f"{hp.train_split!r} (val_fraction={hp.val_fraction}, seed={hp.seed})."
            )
        else:
            available = sorted(self.open())
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

    def _evaluation_split(self, split: str, role: str) -> AnyDataset:
        """Split ``split`` checked for ``role`` (test, predict); when it is the ``val_split`` the data lacks,
        the validation part held out of ``train_split``, as ``fit`` validates on."""
        hp = self.hparams
        if split == hp.val_split and split not in self.open() and hp.val_fraction > 0 and not hp.streaming:
            _, held_out = self._hold_out(self._checked(hp.train_split, "train_split", "train"))
            rank_zero_info(
                f"{role}_split {split!r}: the {len(held_out)} examples held out of {hp.train_split!r} for validation "
                f"(val_fraction={hp.val_fraction}, seed={hp.seed})."
            )
            return held_out
        return self._checked(split, f"{role}_split", role)

    def _checked(self, split: str, argument: str, role: str) -> AnyDataset:
        """Split ``split`` checked for ``role``, its images left undecoded."""
        return self._checked_dataset(self.split(split, argument), split, argument, role)

    def _checked_dataset(self, dataset: AnyDataset, split: str, argument: str, role: str) -> AnyDataset:
        """``dataset`` (split ``split``, set by ``argument``) checked for ``role``, its images left undecoded."""
        hp = self.hparams
        check_not_empty(dataset, split, argument, path=self.describe_source())
        check_columns(dataset, {"image_column": hp.image_column}, split=split)
        dataset = self.check_split(dataset, split, role)
        if dataset.features is not None:  # streaming data may not know its features before reading
            dataset = dataset.cast_column(hp.image_column, ImageFeature(decode=False))
        return dataset

    def _hold_out(self, train: Dataset) -> tuple[Dataset, Dataset]:
        """Split ``train`` into (train, val) with a permutation seeded by ``seed``."""
        order = np.random.default_rng(self.hparams.seed).permutation(len(train))
        num_val = max(1, round(self.hparams.val_fraction * len(train)))
        if num_val >= len(train):
            raise DataError(f"val_fraction={self.hparams.val_fraction} leaves no training examples of {len(train)}.")
        val_rows, train_rows = np.sort(order[:num_val]), np.sort(order[num_val:])
        return train.select(train_rows, keep_in_memory=True), train.select(val_rows, keep_in_memory=True)

    def _wrap(self, dataset: AnyDataset, split: str, role: str) -> torch.utils.data.Dataset:
        """A torch dataset of ready samples; streaming data is also shuffled and split by rank."""
        hp = self.hparams
        make_sample = SampleMaker(self.decoder(dataset, split, role), split, hp.skip_corrupt, self._skipped)
        if isinstance(dataset, Dataset):
            return Samples(dataset, make_sample)
        if role == "train":
            dataset = dataset.shuffle(seed=hp.seed, buffer_size=hp.shuffle_buffer_size)
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            dataset = split_dataset_by_node(dataset, rank=int(trainer.global_rank), world_size=int(trainer.world_size))
        return StreamedSamples(dataset, make_sample)

    # -- dataloaders --------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; the last incomplete batch is dropped when ``drop_last``."""
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        """Validation batches in dataset order."""
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        """Test batches in dataset order."""
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        """Predict batches in dataset order."""
        return self._loader("predict")

    @property
    def eval_batch_size(self) -> int:
        """Validation/test/predict batch size: ``eval_batch_size``, else ``batch_size``."""
        return self.hparams.eval_batch_size or self.hparams.batch_size

    def _loader(self, role: str) -> DataLoader:
        hp = self.hparams
        if role not in self.datasets:
            self.setup(_STAGE_OF_ROLE[role])
        dataset = self.datasets[role]
        train = role == "train"
        batch_size = hp.batch_size if train else self.eval_batch_size
        streamed = isinstance(dataset, StreamedSamples)
        if train and not streamed:
            self._check_one_batch(len(dataset), batch_size)
            return self._resumable_train_loader(dataset, batch_size, self.collate(role))
        loader_class = EpochReshufflingDataLoader if streamed and train else DataLoader
        loader = loader_class(
            dataset,
            batch_size=batch_size,
            sampler=None if streamed else evaluation_sampler(dataset, self.trainer),
            drop_last=train and hp.drop_last,
            num_workers=hp.num_workers,
            pin_memory=hp.pin_memory and torch.cuda.is_available(),
            persistent_workers=hp.persistent_workers and hp.num_workers > 0,
            worker_init_fn=init_worker,
            collate_fn=self.collate(role),
        )
        if loader_class is EpochReshufflingDataLoader:
            loader.current_epoch = lambda: self.trainer.current_epoch if self.trainer is not None else 0
        return loader

    def _check_one_batch(self, num_examples: int, batch_size: int) -> None:
        """Raise if ``drop_last`` would leave no training batch (Lightning would skip training and exit 0)."""
        hp = self.hparams
        world_size = int(getattr(self.trainer, "world_size", 1) or 1) if self.trainer is not None else 1
        per_device = -(-num_examples // world_size)
        if hp.drop_last and per_device < batch_size:
            devices = f" per device ({num_examples} over {world_size} devices)" if world_size > 1 else ""
            raise DataError(
                f"No training batches: the training split ({hp.train_split!r}) has {per_device} examples{devices}, "
                f"fewer than batch_size={batch_size}, and drop_last=true drops that incomplete batch. Lower "
                "`batch_size` to at most the split size, set `drop_last` to false, or add training data."
            )

    # -- resuming mid-epoch -------------------------------------------------------------------
    # Lightning (2.6) also saves a stateful loader's state in its loop state, but never gives it
    # back when ``configure_optimizers`` reads ``trainer.estimated_stepping_batches`` (ours does):
    # that builds the loader and its iterator before the loop state is restored. So the module
    # keeps the training loader's state itself and builds the next loader with it. Strategies that
    # restore a checkpoint after their setup (``ModelParallelStrategy``) have built that loader
    # already: it takes the state itself.

    def state_dict(self) -> dict[str, Any]:
        """The training loader's position (epoch, batches consumed), saved in checkpoints."""
        state = train_loader_state(self.trainer)
        return {"train_loader": state} if state is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Make the training loader continue where the checkpoint's stopped: the Trainer's, if it has
        built it already, else the next one built."""
        state = state_dict.get("train_loader")
        loader = getattr(self.trainer, "train_dataloader", None) if self.trainer is not None else None
        if state is not None and isinstance(loader, ResumableDataLoader):
            loader.load_state_dict(state)
        else:
            self._train_loader_resume_state = state

    def _resumable_train_loader(self, dataset: Sized, batch_size: int, collate_fn: Any) -> ResumableDataLoader:
        """Training batches of ``dataset`` in the seeded order, resuming from a loaded state once."""
        hp = self.hparams
        resume_state, self._train_loader_resume_state = self._train_loader_resume_state, None
        return ResumableDataLoader(
            SeededSamples(dataset),
            batch_size=batch_size,
            sampler=EpochShuffleSampler(dataset, seed=hp.seed),
            drop_last=hp.drop_last,
            num_workers=hp.num_workers,
            pin_memory=hp.pin_memory and torch.cuda.is_available(),
            persistent_workers=hp.persistent_workers and hp.num_workers > 0,
            worker_init_fn=init_worker,
            collate_fn=collate_fn,
            resume_state=resume_state,
        )


def evaluation_sampler(dataset: Sized, trainer: Any) -> Sampler | None:
    """In order; with several processes, each example on exactly one rank.

    Lightning's default ``DistributedSampler`` repeats examples to give every rank as many, so
    metrics over several processes would count some twice. (Uneven ranks are fine here: nothing
    synchronises during an evaluation step, only at its end.)
    """
    world_size = int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
    if world_size <= 1:
        return None
    return UnrepeatedDistributedSampler(dataset, num_replicas=world_size, rank=int(trainer.global_rank), shuffle=False)


# ---------------------------------------------------------------------------------------------
# examples -> samples


class SampleMaker:
    """A task's decoder with the handling of unreadable images: raise naming the example, or skip and count."""

    def __init__(self, decode: Decoder, split: str, skip_corrupt: bool, skipped: Any) -> None:
        self.decode = decode
        self.split = split
        self.skip_corrupt = skip_corrupt
        self.skipped = skipped  # a multiprocessing.Value counting skipped images
        self.last_error: str | None = None  # the message of the last image skipped

    def __call__(self, example: dict[str, Any], index: int) -> dict[str, Any] | None:
        try:
            return self.decode(example, index)
        except CorruptImageError as error:
            message = f"Corrupt image at index {index} of split {self.split!r}: {error}"
            if not self.skip_corrupt:
                raise CorruptImageError(message + " Fix or remove the file, or set `skip_corrupt=True`.") from error
            with self.skipped.get_lock():
                self.skipped.value += 1
            self.last_error = message
            warnings.warn(f"{message} Skipped (skip_corrupt=True).", stacklevel=2)
            return None


class Samples(torch.utils.data.Dataset):
    """A map-style ``datasets.Dataset`` seen as samples.

    With ``skip_corrupt``, an unreadable example is replaced by the next readable one, so that
    batches keep their size (even sizes for Mixup, never an empty batch).
    """

    def __init__(self, dataset: Dataset, make_sample: SampleMaker) -> None:
        self.dataset = dataset
        self.make_sample = make_sample

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        tried = min(_MAX_CONSECUTIVE_CORRUPT, len(self.dataset))
        for offset in range(tried):
            row = (int(index) + offset) % len(self.dataset)
            sample = self.make_sample(self.dataset[row], row)
            if sample is not None:
                return sample
        first = self.make_sample.last_error or "no decoder message"
        which = (
            f"none of the {tried} images of split {self.make_sample.split!r} can be decoded"
            if tried == len(self.dataset)
            else f"{tried} consecutive images from index {index} of split {self.make_sample.split!r} cannot be decoded"
        )
        raise CorruptImageError(
            f"With skip_corrupt=True, {which} (the last: {first}); check that these are image files."
        )


class StreamedSamples(torch.utils.data.IterableDataset):
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
