"""Resumable training order: seeded epochs, per-sample seeds, loaders and data modules that resume mid-epoch."""

from __future__ import annotations

import random

import torch
from data_helpers import make_classification_module

from mambaout_pl.data.resumable import EpochShuffleSampler, ResumableDataLoader, SeededSamples


class IndexAndDraw(torch.utils.data.Dataset):
    """Item ``i`` is ``(i, a random draw)``: shows the order and the generator state each sample saw."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> tuple[int, float]:
        return index, random.random() + torch.rand(()).item()


def loader(resume_state=None, seed=3) -> ResumableDataLoader:
    dataset = IndexAndDraw()
    return ResumableDataLoader(
        SeededSamples(dataset),
        batch_size=3,
        sampler=EpochShuffleSampler(dataset, seed=seed),
        drop_last=True,
        resume_state=resume_state,
    )


def batches(data_loader) -> list[list[tuple[int, float]]]:
    return [list(zip(indices.tolist(), draws.tolist(), strict=True)) for indices, draws in data_loader]


def test_resuming_mid_epoch_continues_the_uninterrupted_epoch():
    uninterrupted = loader()
    epoch_0 = batches(uninterrupted)
    assert len(epoch_0) == 3 and len({i for batch in epoch_0 for i, _ in batch}) == 9  # drop_last
    interrupted = loader()
    iterator = iter(interrupted)
    seen = [next(iterator), next(iterator)]
    assert interrupted.state_dict() == {"epoch": 0, "consumed": 2}
    resumed = loader(resume_state=interrupted.state_dict())
    assert batches(resumed) == epoch_0[2:]  # same samples, same random draws
    assert [list(zip(i.tolist(), d.tolist(), strict=True)) for i, d in seen] == epoch_0[:2]


def test_a_state_saved_at_the_end_of_an_epoch_resumes_at_the_next():
    reference = loader()
    batches(reference)
    reference.sampler.set_epoch(1)
    epoch_1 = batches(reference)
    resumed = loader(resume_state={"epoch": 0, "consumed": 3})
    assert resumed.state_dict()["epoch"] == 1
    assert batches(resumed) == epoch_1
    assert epoch_1 != batches(loader())  # epochs differ in order and draws


def test_data_module_builds_its_next_train_loader_from_a_loaded_state(image_folder, tmp_path):
    options = dict(path="imagefolder", data_dir=str(image_folder), batch_size=4, image_size=16, seed=5)
    reference = make_classification_module(tmp_path, **options).train_dataloader()
    reference.load_state_dict({"epoch": 1, "consumed": 0})
    epoch_1 = list(reference)
    dm = make_classification_module(tmp_path, **options)
    dm.load_state_dict({"train_loader": {"epoch": 1, "consumed": 2}})
    resumed = list(dm.train_dataloader())
    assert len(resumed) == len(epoch_1) - 2
    for got, expected in zip(resumed, epoch_1[2:], strict=True):
        assert torch.equal(got["label"], expected["label"]) and torch.equal(got["image"], expected["image"])
    assert dm.train_dataloader().state_dict() == {"epoch": 0, "consumed": 0}  # the state is used once
    assert dm.state_dict() == {}  # no trainer: nothing to save
