"""Local image folders read as ``imagefolder`` reads them, walked once and kept as an index.

``datasets.load_dataset("imagefolder", data_dir=...)`` resolves its data files on every call, even
with its Arrow cache warm: one fsspec glob per split pattern, each a walk that stats every file
(about half a millisecond per file, minutes for ImageNet). Here the folder is walked once with
``os.scandir``, its splits are resolved with ``datasets``' own split patterns, and the examples
``imagefolder`` gives (split names, image paths, labels, class names, in its order) are written as
one Arrow file per split, the format of ``datasets``' cache, under
``<cache_dir or HF_DATASETS_CACHE>/imagefolder_index/``. A later open stats each sub-folder of the
tree (adding, removing or renaming a file changes its folder's mtime) and memory-maps the files;
a changed folder is walked again. Indexes can be deleted at any time: they are written again.

A file lock beside the index makes concurrent processes (DDP ranks, other jobs) wait for the one
that walks the folder, so it is walked once per cache folder. Folders that need more of
``imagefolder`` than split and class sub-folders (metadata files, zip archives, splits named by
file names, sharded ``data/`` files) raise :class:`UnsupportedLayout` naming what was found, and
are left to ``datasets``' own loader.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow as pa
from datasets import ClassLabel, Dataset, DatasetDict, Features, NamedSplit
from datasets import Image as ImageFeature
from datasets.arrow_writer import ArrowWriter
from datasets.data_files import (
    ALL_DEFAULT_PATTERNS,
    ALL_SPLIT_PATTERNS,
    DEFAULT_PATTERNS_ALL,
    DEFAULT_PATTERNS_SPLIT_IN_DIR_NAME,
    FILES_TO_IGNORE,
)
from datasets.packaged_modules.folder_based_builder.folder_based_builder import FolderBasedBuilder
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from datasets.table import InMemoryTable, MemoryMappedTable
from filelock import FileLock
from fsspec.utils import glob_translate

from mambaout_pl.data.errors import DataError
from mambaout_pl.training.atomic import atomic_write, staged_folder

logger = logging.getLogger(__name__)

#: Bumped whenever what an index holds changes; older indexes are rescanned.
INDEX_FORMAT = 1
#: Sub-folder of the cache folder holding the indexes.
INDEX_FOLDER = "imagefolder_index"
# A folder modified this close to its scan may have changed within one mtime tick of the file
# system after it was listed (FAT's tick is 2 s): its index is not trusted and the folder rescanned.
RACY_NANOSECONDS = 2_000_000_000

_IMAGE_EXTENSIONS = frozenset(ImageFolder.EXTENSIONS)
_METADATA_FILENAMES = frozenset(FolderBasedBuilder.METADATA_FILENAMES)
_IGNORED_FILES = frozenset(FILES_TO_IGNORE)
# Splits named by folders (train/, val/, ...), or no split folders at all (everything is "train").
_LAYOUTS_WE_READ = (DEFAULT_PATTERNS_SPLIT_IN_DIR_NAME, DEFAULT_PATTERNS_ALL)


class UnsupportedLayout(Exception):
    """A folder that only ``datasets``' own ``imagefolder`` loader reads as it should."""


@dataclass
class FolderScan:
    """What a walk of an image folder found: the examples ``imagefolder`` gives and the folders' stats."""

    folder: str  # absolute, symlinks resolved, as ``datasets`` names it
    splits: dict[str, list[str]]  # split -> image paths relative to ``folder``, in ``datasets``' order
    labels: dict[str, list[int]] | None  # split -> class index of each image; None: no labels
    label_names: list[str] | None
    directories: list[tuple[str, int, int]]  # (relative path, mtime_ns, inode) of every folder walked
    scanned_at_ns: int  # time.time_ns() when the walk began

    @property
    def num_files(self) -> int:
        return sum(len(paths) for paths in self.splits.values())

    def content_hash(self) -> str:
        """A hash of the examples (not of the folders' stats): equal scans share one saved index."""
        digest = hashlib.sha256(json.dumps([INDEX_FORMAT, self.folder, self.label_names]).encode())
        for split, paths in self.splits.items():
            digest.update(f"\0{split}\0{len(paths)}\0".encode())
            digest.update("\0".join(paths).encode("utf-8", "surrogateescape"))
            if self.labels is not None:
                digest.update(pa.array(self.labels[split], pa.int64()).buffers()[1])
        return digest.hexdigest()[:32]

    def features(self) -> Features:
        """``image`` (stored as a path) and, with classes, ``label``: the features ``imagefolder`` gives."""
        columns = {"image": ImageFeature()}
        if self.label_names is not None:
            columns["label"] = ClassLabel(names=self.label_names)
        return Features(columns)

    def table(self, split: str) -> pa.Table:
        """The rows of ``split``: ``{"bytes": None, "path": <absolute path>}`` images and their labels."""
        paths = self.splits[split]
        images = pa.StructArray.from_arrays(
            [pa.nulls(len(paths), pa.binary()), pa.array([f"{self.folder}/{path}" for path in paths], pa.string())],
            names=["bytes", "path"],
        )
        arrays = [images] if self.labels is None else [images, pa.array(self.labels[split], pa.int64())]
        return pa.Table.from_arrays(arrays, schema=self.features().arrow_schema)

    def to_datasets(self) -> DatasetDict:
        """The splits in memory."""
        return DatasetDict(
            {split: Dataset(InMemoryTable(self.table(split)), split=NamedSplit(split)) for split in self.splits}
        )


def open_image_folder(data_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> DatasetDict:
    """The splits ``load_dataset("imagefolder", data_dir=data_dir)`` gives, from an index saved under ``cache_dir``.

    The folder is scanned when it has no index or when one of its sub-folders changed since;
    ``cache_dir`` None is ``datasets``' cache (``HF_DATASETS_CACHE``). Raises
    :class:`UnsupportedLayout` for folders only ``datasets``' loader reads as it should.
    """
    folder = Path(data_dir).expanduser().resolve().as_posix()
    if any(char in folder for char in "*?["):
        raise UnsupportedLayout(f"its path {folder!r} holds glob characters, which datasets reads as a pattern")
    root = index_root(folder, cache_dir)
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(root) + ".lock")
        lock.acquire(timeout=0)
    except TimeoutError:  # filelock's Timeout; before OSError, of which TimeoutError is a subclass
        logger.info("Waiting for another process to index image folder %s (lock %s.lock).", folder, root)
        lock.acquire()
    except OSError as error:
        logger.warning("Cannot write an index of %s under %s (%s): scanning it for this run only.", folder, root, error)
        return scan_image_folder(folder).to_datasets()
    try:
        splits = load_index(root, folder)
        if splits is not None:
            return splits
        start = time.perf_counter()
        scan = scan_image_folder(folder)
        logger.info("Scanned %d images in %s in %.1f s.", scan.num_files, folder, time.perf_counter() - start)
        try:
            return write_index(root, scan)
        except OSError as error:
            logger.warning(
                "Cannot write the index of %s under %s (%s): using the scan for this run only.", folder, root, error
            )
            return scan.to_datasets()
    finally:
        lock.release()


def index_root(folder: str, cache_dir: str | os.PathLike | None) -> Path:
    """Where the index of the absolute ``folder`` lives: ``<cache>/imagefolder_index/<name>-<hash of the path>``."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else Path(datasets.config.HF_DATASETS_CACHE)
    key = hashlib.sha256(folder.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return cache / INDEX_FOLDER / f"{Path(folder).name or 'root'}-{key}"


def load_index(root: Path, folder: str) -> DatasetDict | None:
    """The saved splits of ``folder``, or None when there is no index or the folder changed since its scan."""
    try:
        record = json.loads((root / "index.json").read_text())
    except (OSError, ValueError):
        return None
    expected = (INDEX_FORMAT, datasets.__version__, folder)
    if (record.get("format"), record.get("datasets"), record.get("folder")) != expected:
        return None
    try:
        trusted_before = record["scanned_at_ns"] - RACY_NANOSECONDS
        for relative, mtime_ns, inode in record["directories"]:
            stat = os.stat(f"{folder}/{relative}" if relative else folder)
            if stat.st_mtime_ns != mtime_ns or stat.st_ino != inode or mtime_ns >= trusted_before:
                return None
        saved = root / record["dataset"]
    except (OSError, KeyError, TypeError, ValueError):
        return None
    try:
        return _read_splits(saved, record["splits"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("Rescanning %s: its index %s cannot be read (%s).", folder, root, error)
        return None


def write_index(root: Path, scan: FolderScan) -> DatasetDict:
    """Write each split as an Arrow file under ``root`` (shared by equal scans) and record the folders' stats."""
    name = scan.content_hash()
    saved = root / name
    try:
        splits = _read_splits(saved, list(scan.splits)) if saved.is_dir() else None
    except (OSError, ValueError):  # damaged: written again below
        splits = None
    if splits is None:
        with staged_folder(saved, replace=True) as staging:
            for split in scan.splits:
                writer = ArrowWriter(features=scan.features(), path=str(staging / f"{split}.arrow"))
                try:
                    writer.write_table(scan.table(split))
                    writer.finalize()
                finally:
                    writer.close()
        splits = _read_splits(saved, list(scan.splits))
    record = {
        "format": INDEX_FORMAT,
        "datasets": datasets.__version__,
        "folder": scan.folder,
        "scanned_at_ns": scan.scanned_at_ns,
        "dataset": name,
        "splits": list(scan.splits),
        "directories": scan.directories,
    }
    atomic_write(root / "index.json", lambda file: file.write(json.dumps(record).encode()))
    return splits


def _read_splits(saved: Path, splits: list[str]) -> DatasetDict:
    """The splits written by :func:`write_index`, memory-mapped; their fingerprints name their content."""
    return DatasetDict(
        {
            split: Dataset(
                MemoryMappedTable.from_file(str(saved / f"{split}.arrow")),
                split=NamedSplit(split),
                fingerprint=f"{saved.name}-{split}",  # not hashed again from the table: 0.1 s at ImageNet's size
            )
            for split in splits
        }
    )


# ---------------------------------------------------------------------------------------------
# the scan


def scan_image_folder(folder: str) -> FolderScan:
    """Walk ``folder`` (absolute, resolved) and resolve its splits and labels as ``imagefolder`` does.

    Raises :class:`UnsupportedLayout` for a folder that needs more of ``imagefolder`` than
    split and class sub-folders, and :class:`DataError` for a sub-folder that cannot be listed.
    """
    scanned_at_ns = time.time_ns()
    files, directories = _walk(folder)
    splits = _resolve_splits(files)
    return _label(folder, splits, directories, scanned_at_ns)


def _walk(folder: str) -> tuple[dict[str, list[str]], list[tuple[str, int, int]]]:
    """Data files by folder (relative paths) and every folder's stats, as ``datasets``' globs see them.

    Hidden files and folders (a name starting with a dot), folders starting with ``__`` and symlinks
    to folders are left out; a symlink to a file is a file; ``README.md`` and the like are ignored.
    """
    files: dict[str, list[str]] = {}
    directories: list[tuple[str, int, int]] = []
    pending = [""]
    while pending:
        relative = pending.pop()
        path = f"{folder}/{relative}" if relative else folder
        names = []
        try:
            stat = os.stat(path)  # before listing: a file added meanwhile changes the mtime seen next time
            with os.scandir(path) as entries:
                for entry in entries:
                    name = entry.name
                    if name.startswith(".") and set(name) != {"."}:
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        if not name.startswith("__"):
                            pending.append(f"{relative}/{name}" if relative else name)
                    elif entry.is_file() and name not in _IGNORED_FILES:
                        names.append(name)
        except OSError as error:
            raise DataError(
                f"Cannot list image folder '{path}': {error.strerror or error}. Make it readable, or remove it."
            ) from error
        directories.append((relative, stat.st_mtime_ns, stat.st_ino))
        if names:
            files[relative] = names
    return files, directories


class _Glob:
    """One of ``datasets``' data-file patterns, matched folder by folder (file names only where it needs them)."""

    def __init__(self, pattern: str) -> None:
        head, _, last = pattern.rpartition("/")
        self.whole = re.compile(glob_translate(pattern))
        self.any_name = last == "**"  # the match depends on the folder only
        self.head = re.compile(glob_translate(head)) if head else None
        self.name = re.compile(glob_translate(last))

    def names(self, folder: str, names: list[str]) -> list[str]:
        """The ``names`` of files in ``folder`` (relative) that the pattern matches."""
        if self.any_name:
            return names if self.whole.match(f"{folder}/_" if folder else "_") else []
        if not folder:
            return [name for name in names if self.whole.match(name)]
        if self.head is None or not self.head.match(folder):
            return []
        return [name for name in names if self.name.match(name)]

    def matches_any(self, files: dict[str, list[str]]) -> bool:
        """Whether the pattern matches any file."""
        for folder, names in files.items():
            if self.any_name or not folder:
                if self.names(folder, names):
                    return True
            elif self.head is not None and self.head.match(folder) and any(map(self.name.match, names)):
                return True
        return False

    def paths(self, files: dict[str, list[str]]) -> list[str]:
        """Matching relative paths, sorted as fsspec's glob sorts them."""
        matched = [
            f"{folder}/{name}" if folder else name
            for folder, names in files.items()
            for name in self.names(folder, names)
        ]
        return sorted(matched)


def _resolve_splits(files: dict[str, list[str]]) -> dict[str, list[str]]:
    """Split -> data files (relative paths), picked by the first of ``datasets``' default pattern sets that matches."""
    if not files:
        raise UnsupportedLayout("it holds no files")
    for pattern in ALL_SPLIT_PATTERNS:
        if _Glob(pattern.replace("{split}", "*")).matches_any(files):
            raise UnsupportedLayout(f"its files are named by the sharded pattern {pattern!r}")
    for patterns_by_split in ALL_DEFAULT_PATTERNS:
        globs = {split: [_Glob(pattern) for pattern in patterns] for split, patterns in patterns_by_split.items()}
        found = [split for split, split_globs in globs.items() if any(glob.matches_any(files) for glob in split_globs)]
        if not found:
            continue
        if not any(patterns_by_split is layout for layout in _LAYOUTS_WE_READ):
            raise UnsupportedLayout(f"its files match datasets' split patterns {patterns_by_split[found[0]][:2]}")
        return {str(split): [path for glob in globs[split] for path in glob.paths(files)] for split in found}
    raise UnsupportedLayout("none of datasets' split patterns matches its files")


def _label(
    folder: str, data_files: dict[str, list[str]], directories: list[tuple[str, int, int]], scanned_at_ns: int
) -> FolderScan:
    """Keep the images and label them by their folder's name, as ``imagefolder``'s builder does."""
    names: set[str] = set()
    depths: set[int] = set()
    splits: dict[str, list[str]] = {}
    labelled: list[bool] = []
    for split, paths in data_files.items():
        images = []
        for path in paths:
            name = path.rpartition("/")[2]
            stem, extension = os.path.splitext(name)
            if extension.lower() in _IMAGE_EXTENSIONS:
                images.append(path)
                parent = path.rpartition("/")[0]
                names.add(parent.rpartition("/")[2] if parent else Path(folder).name)
                depths.add(path.count("/"))
            elif name in _METADATA_FILENAMES:
                raise UnsupportedLayout(f"it has a metadata file ({path})")
            elif extension.lower() == ".zip":
                raise UnsupportedLayout(f"it has a zip archive ({path})")
            elif os.path.splitext(stem)[1].lower() in _IMAGE_EXTENSIONS:
                raise UnsupportedLayout(f"it has an image with a second extension ({path})")
        if not images:
            raise UnsupportedLayout(f"its split {split!r} has files but no images")
        splits[split] = images
        labelled.append(len(names) > 1 and len(depths) == 1)  # datasets decides after each split
    if len(set(labelled)) > 1:
        raise UnsupportedLayout("only some of its splits have class folders at one depth")
    if not labelled[0]:
        return FolderScan(folder, splits, None, None, directories, scanned_at_ns)
    label_names = sorted(names)
    index = {name: label for label, name in enumerate(label_names)}
    labels = {
        split: [index[(path.rpartition("/")[0].rpartition("/")[2]) or Path(folder).name] for path in paths]
        for split, paths in splits.items()
    }
    return FolderScan(folder, splits, labels, label_names, directories, scanned_at_ns)
