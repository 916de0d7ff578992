"""BaseDataModule: shared arguments, the seeded hold-out, streaming across ranks and epochs, corrupt images.

Every dataset here is generated on disk and read through the same calls a user's configuration makes.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
from data_helpers import gray_id_rows, ids_in, make_classification_module, make_segmentation_module, write_parquet

from mambaout_pl.data import (
    BaseDataModule,
    CorruptImageError,
    DataError,
    ImageClassificationDataModule,
    SegmentationDataModule,
    SplitNotFoundError,
)


def test_hold_out_is_seeded_deterministic_and_disjoint(image_folder, tmp_path):
    def held_out_paths(seed):
        dm = make_classification_module(
            tmp_path, path="imagefolder", data_dir=str(image_folder), val_split=None, val_fraction=0.25, seed=seed
        )
        dm.setup("fit")
        paths = {role: [row["image"]["path"] for row in dm.datasets[role].dataset] for role in ("train", "val")}
        return paths["train"], paths["val"]

    train, val = held_out_paths(seed=0)
    assert len(val) == 6 and len(train) == 18
    assert not set(train) & set(val)
    assert len(set(train) | set(val)) == 24
    assert all("/train/" in path for path in val)  # held out of train, not taken from the validation folder
    assert held_out_paths(seed=0) == (train, val)
    assert set(held_out_paths(seed=1)[1]) != set(val)


def test_no_validation_split_and_no_hold_out_is_an_error(image_folder, tmp_path):
    dm = make_classification_module(
        tmp_path, path="imagefolder", data_dir=str(image_folder), val_split="valid", val_fraction=0.0
    )
    with pytest.raises(SplitNotFoundError, match=r"'valid'.*\['train', 'validation'\].*val_split"):
        dm.setup("fit")


@pytest.fixture
def no_arrow_shutdown_sleep(monkeypatch):
    """datasets sleeps 5 s after each shuffled pass over parquet shards (an Arrow thread-shutdown
    workaround); these tiny single-process streams do not need it."""
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


def test_streaming_parquet_is_split_across_ranks(tmp_path, no_arrow_shutdown_sleep):
    files = {
        "train": [
            str(write_parquet(tmp_path / "train-0.parquet", gray_id_rows(range(0, 10)))),
            str(write_parquet(tmp_path / "train-1.parquet", gray_id_rows(range(10, 20)))),
        ],
        "validation": str(write_parquet(tmp_path / "val.parquet", gray_id_rows(range(20, 27)))),
    }
    seen = {}
    for rank in (0, 1):
        dm = make_classification_module(
            tmp_path,
            path="parquet",
            data_files=files,
            streaming=True,
            image_size=16,
            crop_pct=1.0,
            color_jitter=None,
            drop_last=False,
            batch_size=3,
        )
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, current_epoch=0)
        with pytest.warns(UserWarning, match="reading the whole streamed split 'train'"):
            assert dm.num_classes == 3  # no ClassLabel: counted by reading the stream
        dm.setup("fit")
        assert isinstance(dm.datasets["train"], torch.utils.data.IterableDataset)
        train_loader = dm.train_dataloader()
        epoch_0 = [batch for batch in train_loader]
        assert all(torch.equal(torch.tensor(ids_in([b])) % 3, b["label"]) for b in epoch_0)
        assert ids_in(list(train_loader)) == ids_in(epoch_0)  # same epoch: same order
        dm.trainer.current_epoch = 1
        seen[rank] = (set(ids_in(epoch_0)), set(ids_in(list(train_loader))), set(ids_in(list(dm.val_dataloader()))))
        assert len(seen[rank][0]) == 10  # two shards over two ranks: one shard each

    for part, everything in ((0, range(20)), (1, range(20)), (2, range(20, 27))):
        assert not seen[0][part] & seen[1][part]
        assert seen[0][part] | seen[1][part] == set(everything)


@pytest.mark.filterwarnings("ignore:Label column .* is not a ClassLabel")
def test_streaming_reshuffles_each_epoch(tmp_path, no_arrow_shutdown_sleep):
    train = str(write_parquet(tmp_path / "train.parquet", gray_id_rows(range(20))))
    dm = make_classification_module(
        tmp_path,
        path="parquet",
        data_files={"train": train, "validation": train},
        streaming=True,
        image_size=16,
        crop_pct=1.0,
        color_jitter=None,
        drop_last=False,
    )
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1, current_epoch=0)
    loader = dm.train_dataloader()
    epoch_0 = ids_in(list(loader))
    dm.trainer.current_epoch = 1
    epoch_1 = ids_in(list(loader))
    assert sorted(epoch_0) == sorted(epoch_1) == list(range(20))
    assert epoch_0 != epoch_1


@pytest.mark.filterwarnings("ignore:Label column .* is not a ClassLabel")
def test_streaming_corrupt_image_raises_or_is_left_out(tmp_path, no_arrow_shutdown_sleep):
    rows = gray_id_rows(range(6))
    rows[3] = ({"bytes": b"not an image", "path": None}, 0)
    train = str(write_parquet(tmp_path / "train.parquet", rows))
    files = {"train": train, "validation": train}
    options = dict(path="parquet", data_files=files, streaming=True, image_size=16, crop_pct=1.0, drop_last=False)
    with pytest.raises(CorruptImageError, match="index 3 of split 'validation'"):
        list(make_classification_module(tmp_path, **options).val_dataloader())
    dm = make_classification_module(tmp_path, skip_corrupt=True, **options)
    with pytest.warns(UserWarning, match="Corrupt image at index 3"):
        assert sorted(ids_in(list(dm.val_dataloader()))) == [0, 1, 2, 4, 5]
    assert dm.num_skipped == 1


def _add_truncated_png(image_folder: Path) -> Path:
    good = next((image_folder / "train" / "dog").iterdir()).read_bytes()
    broken = image_folder / "train" / "dog" / "broken.png"
    broken.write_bytes(good[: len(good) // 2])
    return broken


def test_corrupt_image_raises_naming_the_file(image_folder, tmp_path):
    _add_truncated_png(image_folder)
    dm = make_classification_module(tmp_path, path="imagefolder", data_dir=str(image_folder), batch_size=25)
    dm.setup("fit")
    with pytest.raises(CorruptImageError, match=r"broken\.png.*split 'train'|split 'train'.*broken\.png") as error:
        list(dm.train_dataloader())
    assert "skip_corrupt" in str(error.value)


def test_skip_corrupt_skips_and_counts_across_workers(image_folder, tmp_path):
    _add_truncated_png(image_folder)
    dm = make_classification_module(
        tmp_path,
        path="imagefolder",
        data_dir=str(image_folder),
        batch_size=5,
        num_workers=2,
        skip_corrupt=True,
        drop_last=False,
    )
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 25
    batches = list(dm.train_dataloader())
    # The broken image's slot is filled by the next readable example: batch sizes do not change.
    assert [len(batch["label"]) for batch in batches] == [5] * 5
    assert dm.num_skipped == 1  # counted in a worker process, seen here


def test_shared_arguments_are_declared_once_and_mean_the_same_in_every_module(ade20k_folder, tmp_path):
    shared = set(inspect.signature(BaseDataModule.__init__).parameters) - {"self"}
    for module in (ImageClassificationDataModule, SegmentationDataModule):
        own = set(inspect.signature(module.__init__).parameters) - {"self", "kwargs"}
        assert not own & shared, f"{module.__name__} re-declares {own & shared}"
    classification = make_classification_module(tmp_path, batch_size=6)
    segmentation = make_segmentation_module(tmp_path, path="ade20k", data_dir=str(ade20k_folder), batch_size=6)
    segmentation_default = SegmentationDataModule(path="ade20k", data_dir=str(ade20k_folder), batch_size=6)
    assert classification.eval_batch_size == segmentation_default.eval_batch_size == 6  # None: batch_size
    assert segmentation.eval_batch_size == 2
    assert segmentation.num_classes == 151 and segmentation.source == ("ade20k", str(ade20k_folder))


def test_renamed_and_moved_arguments_say_what_to_set(ade20k_folder, tmp_path):
    with pytest.raises(TypeError, match="`scale` is now `resize_scale`"):
        SegmentationDataModule(scale=(64, 32))
    # data_dir is load_dataset's data_dir: an ADE20K-layout folder is read with path "ade20k".
    with pytest.raises(DataError, match="takes no data_dir.*'ade20k'"):
        SegmentationDataModule(data_dir=str(ade20k_folder)).num_classes
    with pytest.raises(DataError, match="set `data_dir` to the folder holding images/ and annotations/"):
        SegmentationDataModule(path="ade20k").num_classes
