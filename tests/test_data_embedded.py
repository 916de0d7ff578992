"""The embedded builtin:digits dataset: contents, one atomic write, unknown names.

Every dataset here is generated on disk and read through the same calls a user's configuration makes.
"""

from __future__ import annotations

import threading
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from data_helpers import make_classification_module, to_pixels
from PIL import Image

from mambaout_pl.data import (
    DataError,
    ImageClassificationDataModule,
    embedded,
    open_dataset,
)


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("digits_cache")


def test_builtin_digits_match_sklearn(digits_cache):
    from sklearn.datasets import load_digits

    digits = load_digits()
    dm = ImageClassificationDataModule(
        path="builtin:digits",
        cache_dir=str(digits_cache),
        image_size=32,
        num_workers=0,
        pin_memory=False,
        batch_size=16,
    )
    assert dm.num_classes == 10 and dm.label_names == [str(d) for d in range(10)]
    dm.setup("fit")
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) == 1797
    assert len(dm.datasets["val"]) == 180  # val_fraction 0.1 held out: digits have no validation split

    train = open_dataset("builtin:digits", cache_dir=str(digits_cache), split="train")
    assert len(train) == 1797
    paths = [value["path"] for value in train.cast_column("image", datasets.Image(decode=False))["image"]]
    indices = np.array([int(Path(path).stem) for path in paths])
    assert sorted(indices.tolist()) == list(range(1797))
    assert np.array_equal(np.array(train["label"]), digits.target[indices])  # label names are the digits
    for row in (0, 1000, 1796):
        image = np.asarray(train[row]["image"])
        assert image.shape == (32, 32)
        assert np.array_equal(image[::4, ::4], np.rint(digits.images[indices[row]] * 255 / 16).astype(np.uint8))

    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (16, 3, 32, 32)
    pixels = to_pixels(batch["image"])
    assert torch.allclose(pixels[:, 0], pixels[:, 2], atol=1e-3)  # grayscale: equal channels


def test_builtin_is_written_once_and_atomically(tmp_path, monkeypatch):
    calls = []

    def write_tiny(folder: Path) -> None:
        calls.append(folder)
        for index in range(3):
            (folder / "train" / "a").mkdir(parents=True, exist_ok=True)
            Image.new("L", (4, 4), 10 * index).save(folder / "train" / "a" / f"{index}.png")
            threading.Event().wait(0.05)  # let a racing writer overlap

    monkeypatch.setitem(embedded.BUILTIN_DATASETS, "tiny", write_tiny)
    results = []

    def materialize():
        results.append(embedded.materialize("builtin:tiny", cache_dir=tmp_path))

    threads = [threading.Thread(target=materialize) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [tmp_path / "tiny-v1"] * 2
    assert sorted(p.name for p in (tmp_path / "tiny-v1" / "train" / "a").iterdir()) == ["0.png", "1.png", "2.png"]
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-v1"]  # no staging folder left behind
    embedded.materialize("builtin:tiny", cache_dir=tmp_path)
    assert len(calls) <= 2  # the third call reuses the folder

    monkeypatch.setenv(embedded.CACHE_ENV_VARIABLE, str(tmp_path / "env"))
    assert embedded.materialize("builtin:tiny") == tmp_path / "env" / "tiny-v1"


def test_unknown_builtin_lists_known_names(tmp_path):
    with pytest.raises(DataError, match=r"builtin:nope.*'builtin:digits'"):
        make_classification_module(tmp_path, path="builtin:nope").num_classes
