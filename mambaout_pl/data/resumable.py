"""Training batches that a checkpoint can stop and resume exactly, mid-epoch included.

Three parts make the rest of an interrupted epoch equal to the uninterrupted one:

- :class:`EpochShuffleSampler`: the order of an epoch depends only on ``seed`` and the epoch, as
  with ``DistributedSampler`` (which Lightning puts in its place on several processes);
- :class:`SeededSamples`: each sample is made with the random generators (``random``, NumPy,
  torch) seeded from ``(seed, epoch, index)``, so augmentations depend neither on the number of
  workers nor on what was loaded before;
- :class:`ResumableDataLoader`: its state is the epoch and the batches consumed; built with
  ``resume_state``, its first epoch skips the consumed batches without loading them.

``BaseDataModule`` (``base.py``) trains from these, keeps the training loader's state in its own
``state_dict`` and builds the next loader with it after ``load_state_dict``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler


class EpochShuffleSampler(RandomSampler):
    """A random permutation of ``range(len(data_source))`` drawn from ``seed + epoch`` (``set_epoch``)."""

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed for sample ``index`` in ``epoch``, well mixed (``numpy.random.SeedSequence``)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def seed_generators(seed: int) -> None:
    """Seed ``random``, NumPy's and torch's global generators of this process."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class SeededSamples(torch.utils.data.Dataset):
    """``dataset`` whose items may be asked for as ``(index, seed)``: the generators are seeded first."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if isinstance(key, tuple):
            index, seed = key
            seed_generators(seed)
            return self.dataset[index]
        return self.dataset[key]


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over :class:`SeededSamples` with ``state_dict`` / ``load_state_dict``.

    Its sampler must have ``epoch`` and ``seed`` (``EpochShuffleSampler``, or the
    ``DistributedSampler`` Lightning swaps in). Each index goes to the dataset with its
    :func:`sample_seed`. The state is the epoch and the number of batches handed out so far in it;
    Lightning reads it when it saves a checkpoint and gives it back before resuming.
    """

    def __init__(
        self, dataset: SeededSamples, *args: Any, resume_state: dict[str, int] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(dataset, *args, **kwargs)
        self._epoch = 0
        self._consumed = 0
        self._skip = 0
        if resume_state is not None:
            self.load_state_dict(resume_state)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "consumed": self._consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        if consumed >= len(self):  # saved at the end of an epoch: resume at the next one
            epoch, consumed = epoch + 1, 0
        self._set_epoch(epoch)
        self._skip = consumed

    def _set_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    @property
    def _index_sampler(self) -> Any:
        return _ResumingIndexSampler(self) if self._auto_collation else self.sampler

    def __iter__(self) -> Iterator[Any]:
        self._epoch = int(getattr(self.sampler, "epoch", self._epoch))
        self._consumed = self._skip
        return _CountingIterator(super().__iter__(), self)


class _ResumingIndexSampler:
    """The loader's batch sampler for its current epoch, less the batches to skip, as ``(index, seed)`` pairs."""

    def __init__(self, loader: ResumableDataLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader.batch_sampler)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        loader = self.loader
        epoch, skip = loader._epoch, loader._skip
        loader._skip = 0
        loader._set_epoch(epoch)  # Lightning may have told the sampler another epoch since the iterator was made
        seed = int(getattr(loader.sampler, "seed", 0))
        batch_sampler: BatchSampler = loader.batch_sampler
        for position, indices in enumerate(batch_sampler):
            if position >= skip:
                yield [(int(index), sample_seed(seed, epoch, int(index))) for index in indices]


class _CountingIterator:
    """Counts the batches a loader hands out (its ``consumed`` state)."""

    def __init__(self, iterator: Iterator[Any], loader: ResumableDataLoader) -> None:
        self.iterator = iterator
        self.loader = loader

    def __iter__(self) -> _CountingIterator:
        return self

    def __next__(self) -> Any:
        batch = next(self.iterator)
        self.loader._consumed += 1
        return batch

    def __len__(self) -> int:
        return len(self.iterator)


def train_loader_state(trainer: Any) -> dict[str, int] | None:
    """The state of the ``ResumableDataLoader`` ``trainer`` trains from (as Lightning processed it), if any."""
    loader = getattr(trainer, "train_dataloader", None) if trainer is not None else None
    if not isinstance(loader, ResumableDataLoader):
        return None
    state = loader.state_dict()
    if state["consumed"] >= trainer.num_training_batches:  # the epoch is over (``limit_train_batches`` included)
        return {"epoch": state["epoch"] + 1, "consumed": 0}
    return state
