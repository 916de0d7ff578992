"""Image folders opened from their index: the same examples as datasets' imagefolder, one scan per change.

Every folder here is generated on disk; the reference is ``datasets.load_dataset("imagefolder", ...)``
itself. Folders are dated an hour back (``age``) where a test needs its index trusted: a folder
modified in the last 2 seconds is rescanned on each open.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import datasets
import pytest
from data_helpers import IMAGE_FOLDER_CLASSES, make_classification_module

from mambaout_pl.data import DataError, folder_index, open_dataset
from mambaout_pl.data.folder_index import UnsupportedLayout, open_image_folder


def touch(root: Path, *paths: str) -> Path:
    for path in paths:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(b"")
    return root


def age(root: Path, seconds: float = 3600) -> Path:
    """Date every folder under ``root`` ``seconds`` back, as a folder not written a moment ago is."""
    past = time.time() - seconds
    for folder, _, _ in os.walk(root):
        os.utime(folder, (past, past))
    return root


def rows(splits) -> dict[str, dict[str, list]]:
    """Every split's rows with the images as stored: ``{"bytes", "path"}``."""
    return {name: split.cast_column("image", datasets.Image(decode=False))[:] for name, split in splits.items()}


def reference(root: Path, tmp_path: Path) -> datasets.DatasetDict:
    return datasets.load_dataset("imagefolder", data_dir=str(root), cache_dir=str(tmp_path / "datasets_cache"))


def assert_same_examples(ours, theirs) -> None:
    assert list(ours) == list(theirs)
    for name in theirs:
        assert ours[name].features == theirs[name].features, name
    assert rows(ours) == rows(theirs)


@pytest.fixture
def count_scans(monkeypatch):
    """The folders scanned so far (``scan_image_folder`` calls), in order."""
    scanned = []
    scan = folder_index.scan_image_folder

    def counting(folder):
        scanned.append(folder)
        return scan(folder)

    monkeypatch.setattr(folder_index, "scan_image_folder", counting)
    return scanned


LAYOUTS = {
    "imagenet": [f"{split}/n0{c}/{split}_{i}.JPEG" for split in ("train", "val") for c in (2, 1) for i in (1, 0)],
    "no validation folder": ["train/cat/a.png", "train/dog/b.png", "train/dog/c.jpg", "train/cat/README.md"],
    "no split folders": ["cat/a.png", "dog/b.png", "dog/c.png", "dog/notes.txt"],
    "split folder names": [
        "training/cat/a.png",
        "training/dog/b.png",
        "dev/cat/c.png",
        "testing/dog/d.png",
        "my-valid/cat/e.png",
        "train-2017/dog/f.png",
    ],  # fmt: skip
    "nested class folders": ["train/g1/cat/a.png", "train/g2/dog/b.png", "test/g1/cat/c.png"],
    "mixed depths: no labels": ["train/cat/a.png", "train/dog/sub/b.png"],
    "one class: no labels": ["train/cat/a.png", "train/cat/b.png", "validation/cat/c.png"],
    # sorted as whole paths ("a b/" before "a/"), keyword class folders in two splits, hidden and special
    # folders and files left out, upper-case extensions, files that are not images, stray root images
    "tricky names": [
        "train/a/x.png",
        "train/a b/y.png",
        "train/test_tube/z.png",
        "train/B/w.PNG",
        "train/val/q.png",
        "train/a/train_1.png",
        "train/x_train/r.png",
        "validation/a/v.png",
        "train/.hidden/h.png",
        "train/a/.h.png",
        "train/__pycache__/p.png",
        "train/a/notes.txt",
        "stray.png",
    ],  # fmt: skip
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_same_examples_as_datasets_imagefolder(layout, tmp_path):
    root = touch(tmp_path / "images", *LAYOUTS[layout])
    ours = open_dataset("imagefolder", data_dir=str(root), cache_dir=str(tmp_path / "cache"))
    assert_same_examples(ours, reference(root, tmp_path))
    assert (tmp_path / "cache" / folder_index.INDEX_FOLDER).is_dir()  # read from the index, not by datasets


def test_symlinks_are_followed_as_datasets_follows_them(tmp_path):
    root = touch(tmp_path / "images", "train/cat/a.png", "train/dog/b.png", "elsewhere/fish/c.png")
    (root / "train" / "dog" / "link.png").symlink_to(root / "train" / "cat" / "a.png")  # a file: kept
    (root / "train" / "fish").symlink_to(root / "elsewhere" / "fish")  # a folder: datasets does not enter it
    (root / "train" / "cat" / "broken.png").symlink_to(root / "nowhere.png")
    ours = open_image_folder(root, cache_dir=tmp_path / "cache")
    assert_same_examples(ours, reference(root, tmp_path))
    assert ours["train"].features["label"].names == ["cat", "dog"]


def test_real_images_decode_and_hold_out_the_same_validation_part(image_folder, tmp_path, monkeypatch):
    (image_folder / "validation").rename(tmp_path / "elsewhere")  # no validation folder: a held-out part
    indexed = make_classification_module(tmp_path, path="imagefolder", data_dir=str(image_folder), val_fraction=0.25)
    indexed.setup("fit")

    def unsupported(*args, **kwargs):
        raise UnsupportedLayout("read by datasets for this test")

    monkeypatch.setattr("mambaout_pl.data.sources.open_image_folder", unsupported)
    loaded = make_classification_module(tmp_path, path="imagefolder", data_dir=str(image_folder), val_fraction=0.25)
    loaded.setup("fit")
    assert indexed.label_names == loaded.label_names == IMAGE_FOLDER_CLASSES
    for role in ("train", "val"):
        assert rows({role: indexed.datasets[role].dataset}) == rows({role: loaded.datasets[role].dataset})
    assert len(indexed.datasets["val"]) == 6
    first = indexed.datasets["val"][0]
    assert first["image"].shape == (3, 32, 32) and first["label"] == loaded.datasets["val"][0]["label"]


@pytest.mark.parametrize(
    ("files", "reason"),
    [
        (["train/metadata.csv", "train/a.png"], "metadata file"),
        (["cat/train_1.png", "dog/train_2.png", "cat/test_3.png"], "split patterns"),
        (["train/a/x.png", "train/b/y.png", "test/z.png"], "only some of its splits"),
        (["train/cat/a.png", "train/dog/b.png.gz"], "second extension"),
        (["data/train-00000-of-00001.png"], "sharded"),
    ],
)
def test_folders_needing_more_of_imagefolder_are_left_to_datasets(files, reason, tmp_path, caplog):
    root = touch(tmp_path / "images", *files)
    if files[0].endswith("metadata.csv"):
        (root / files[0]).write_text("file_name,caption\na.png,a cat\n")
    with pytest.raises(UnsupportedLayout, match=reason):
        open_image_folder(root, cache_dir=tmp_path / "cache")
    with caplog.at_level(logging.INFO, logger="mambaout_pl.data.sources"):
        ours = open_dataset("imagefolder", data_dir=str(root), cache_dir=str(tmp_path / "cache"))
    assert reason in caplog.text and "read by datasets' imagefolder loader" in caplog.text
    assert_same_examples(ours, reference(root, tmp_path))
    if reason == "metadata file":
        assert ours["train"].select_columns(["caption"])[0] == {"caption": "a cat"}


def test_index_is_reused_until_a_folder_changes(tmp_path, count_scans):
    root = age(touch(tmp_path / "images", "train/cat/a.png", "train/dog/b.png", "val/cat/c.png", "val/dog/d.png"))
    cache = tmp_path / "cache"
    first = open_image_folder(root, cache_dir=cache)
    second = open_image_folder(root, cache_dir=cache)
    assert len(count_scans) == 1
    assert rows(first) == rows(second) == rows(reference(root, tmp_path))

    touch(root, "train/dog/e.png")  # its folder's mtime is now
    added = open_image_folder(root, cache_dir=cache)
    assert len(count_scans) == 2 and len(added["train"]) == 3
    assert_same_examples(added, reference(root, tmp_path / "after_add"))

    age(root)
    (root / "val" / "cat" / "c.png").unlink()
    (root / "train" / "fish").mkdir()
    touch(root, "train/fish/f.png")
    changed = open_image_folder(root, cache_dir=cache)
    assert len(count_scans) == 3
    assert changed["train"].features["label"].names == ["cat", "dog", "fish"]
    assert_same_examples(changed, reference(root, tmp_path / "after_change"))


def test_a_folder_modified_moments_ago_is_rescanned_on_each_open(tmp_path, count_scans):
    root = touch(tmp_path / "images", "train/cat/a.png", "train/dog/b.png")  # mtimes: now
    open_image_folder(root, cache_dir=tmp_path / "cache")
    open_image_folder(root, cache_dir=tmp_path / "cache")
    assert len(count_scans) == 2  # a file added within the file system's mtime tick would go unseen
    age(root)
    open_image_folder(root, cache_dir=tmp_path / "cache")
    open_image_folder(root, cache_dir=tmp_path / "cache")
    assert len(count_scans) == 3


def test_prepare_data_scans_once_and_setup_on_other_ranks_reads_the_index(tmp_path, count_scans):
    root = age(touch(tmp_path / "images", *LAYOUTS["imagenet"]))
    options = dict(path="imagefolder", data_dir=str(root), val_split="validation", batch_size=1)
    rank0 = make_classification_module(tmp_path, **options)
    rank0.prepare_data()  # Lightning: local rank 0, before the barrier
    rank1 = make_classification_module(tmp_path, **options)
    for module in (rank0, rank1):
        module.setup("fit")
    assert len(count_scans) == 1
    assert rank1.label_names == ["n01", "n02"] and len(rank1.datasets["train"]) == len(rank1.datasets["val"]) == 4


def test_concurrent_opens_wait_for_the_one_scan(tmp_path, monkeypatch):
    root = age(touch(tmp_path / "images", *LAYOUTS["imagenet"]))
    scanned, scan = [], folder_index.scan_image_folder

    def slow_scan(folder):
        scanned.append(folder)
        time.sleep(0.5)  # the other opener arrives while this one scans
        return scan(folder)

    monkeypatch.setattr(folder_index, "scan_image_folder", slow_scan)
    barrier, results = threading.Barrier(2), []

    def opener():
        barrier.wait()
        results.append(rows(open_image_folder(root, cache_dir=tmp_path / "cache")))

    threads = [threading.Thread(target=opener) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(scanned) == 1
    assert results[0] == results[1] == rows(reference(root, tmp_path))


TWO_PROCESSES = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from mambaout_pl.data import folder_index, open_dataset

    data_dir, cache_dir, ready, rank = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]
    scanned, scan = [], folder_index.scan_image_folder

    def slow_scan(folder):
        scanned.append(folder)
        time.sleep(1.0)
        return scan(folder)

    folder_index.scan_image_folder = slow_scan
    (ready / rank).touch()
    while len(list(ready.iterdir())) < 2:  # both processes imported: open at the same moment
        time.sleep(0.01)
    splits = open_dataset("imagefolder", data_dir=data_dir, cache_dir=cache_dir)
    print(json.dumps({"scans": len(scanned), "rows": {name: len(split) for name, split in splits.items()}}))
    """
)


@pytest.mark.slow
def test_two_processes_opening_at_once_scan_once(tmp_path):
    root = age(touch(tmp_path / "images", *LAYOUTS["imagenet"]))
    script, ready = tmp_path / "open.py", tmp_path / "ready"
    script.write_text(TWO_PROCESSES)
    ready.mkdir()
    command = [sys.executable, str(script), str(root), str(tmp_path / "cache"), str(ready)]
    processes = [subprocess.Popen([*command, str(rank)], stdout=subprocess.PIPE, text=True) for rank in range(2)]
    outputs = [json.loads(process.communicate(timeout=300)[0].strip().splitlines()[-1]) for process in processes]
    assert all(process.returncode == 0 for process in processes)
    assert sorted(output["scans"] for output in outputs) == [0, 1]
    assert outputs[0]["rows"] == outputs[1]["rows"] == {"train": 4, "validation": 4}


def test_damaged_index_is_rebuilt(tmp_path, count_scans):
    root = age(touch(tmp_path / "images", "train/cat/a.png", "train/dog/b.png"))
    open_image_folder(root, cache_dir=tmp_path / "cache")
    index = folder_index.index_root(root.resolve().as_posix(), tmp_path / "cache")
    (arrow,) = index.glob("*/train.arrow")
    arrow.write_bytes(arrow.read_bytes()[:100])
    assert rows(open_image_folder(root, cache_dir=tmp_path / "cache")) == rows(reference(root, tmp_path))
    assert len(count_scans) == 2
    (index / "index.json").write_text("{not json")
    assert rows(open_image_folder(root, cache_dir=tmp_path / "cache")) == rows(reference(root, tmp_path))
    assert len(count_scans) == 3


def test_unwritable_cache_scans_for_this_run_only(tmp_path, caplog):
    root = touch(tmp_path / "images", "train/cat/a.png", "train/dog/b.png")
    blocked = tmp_path / "a_file"
    blocked.write_text("")  # the cache folder cannot be made under a file
    with caplog.at_level(logging.WARNING, logger="mambaout_pl.data.folder_index"):
        splits = open_image_folder(root, cache_dir=blocked)
    assert "scanning it for this run only" in caplog.text
    assert rows(splits) == rows(reference(root, tmp_path))


def test_unreadable_sub_folder_names_the_folder(tmp_path, monkeypatch):
    root = touch(tmp_path / "images", "train/cat/a.png", "train/dog/b.png")
    scandir = os.scandir

    def refusing(path):
        if str(path).endswith("/dog"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    with pytest.raises(DataError, match=r"Cannot list image folder '.*/train/dog': Permission denied"):
        open_image_folder(root, cache_dir=tmp_path / "cache")
