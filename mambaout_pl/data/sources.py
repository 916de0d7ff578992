"""Open a dataset the way a user names it, and read the images inside it.

A user names a dataset by ``path`` (and optionally ``name``, ``data_dir``, ``data_files``,
``revision``), exactly as in ``datasets.load_dataset``:

- a Hub id such as ``"ILSVRC/imagenet-1k"`` (downloaded and cached by ``datasets``);
- a packaged builder such as ``"imagefolder"`` or ``"parquet"`` with ``data_dir`` / ``data_files``;
- a local folder of data files, or a folder written by ``Dataset.save_to_disk``;
- ``"builtin:<name>"``, an embedded quick-start dataset that needs no network (``embedded.py``).

Everything a user can get wrong (a missing folder, split, column; an unreadable image) raises a
:class:`DataError` subclass whose message names the value and says which argument to change.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import datasets
import numpy as np
import pyarrow as pa
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict
from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES
from PIL import Image, ImageOps

from mambaout_pl.data import embedded

AnyDataset = Union[Dataset, IterableDataset]
AnyDatasetDict = Union[DatasetDict, IterableDatasetDict]
DataFiles = Union[str, Sequence[str], Mapping[str, Union[str, Sequence[str]]]]

# Number of shards a saved-to-disk dataset is cut into when streamed, so that ranks and
# dataloader workers each get whole shards.
_SAVED_DATASET_STREAMING_SHARDS = 64


class DataError(Exception):
    """A problem with the data a user pointed at; the message says what to change."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A dataset, folder or file that does not exist or cannot be reached."""


class SplitNotFoundError(DataError, ValueError):
    """A split the configuration asks for that the dataset does not have."""


class ColumnNotFoundError(DataError, ValueError):
    """A column the configuration asks for that the dataset does not have."""


class InvalidLabelError(DataError, ValueError):
    """A label that is missing, not an integer, or outside [0, num_classes)."""


class CorruptImageError(DataError, OSError):
    """An image that cannot be decoded."""


def open_dataset(
    path: str,
    name: str | None = None,
    data_dir: str | os.PathLike | None = None,
    data_files: DataFiles | None = None,
    revision: str | None = None,
    split: str | None = None,
    streaming: bool = False,
    cache_dir: str | os.PathLike | None = None,
    token: bool | str | None = None,
) -> AnyDatasetDict | AnyDataset:
    """Open a dataset by Hub id, packaged builder, local folder or ``builtin:<name>``.

    Returns all splits (a ``DatasetDict``, or an ``IterableDatasetDict`` when ``streaming``), or
    the one split named by ``split``. A folder saved with ``save_to_disk`` holding a single
    ``Dataset`` is returned as the split ``"train"``.
    """
    if path.startswith(embedded.BUILTIN_PREFIX):
        if data_dir is not None or data_files is not None:
            raise DataError(
                f"path={path!r} is an embedded dataset and takes no data_dir or data_files; "
                "remove them, or set path to a builder such as 'imagefolder' to read your own files."
            )
        try:
            name_of_builtin = embedded.builtin_name(path)
        except ValueError as error:
            raise DataError(f"{error} Set `path` to one of them.") from error
        if name_of_builtin in embedded.SEGMENTATION_DATASETS:
            raise DataError(
                f"path={path!r} is a segmentation dataset (images with label maps); open it with "
                "mambaout_pl.data.SegmentationDataModule, or set `path` to a classification dataset "
                "such as 'builtin:digits'."
            )
        data_dir = embedded.materialize(path, cache_dir=cache_dir)
        path = "imagefolder"

    local = Path(path).expanduser()
    if _is_saved_to_disk(local):
        splits = _load_saved(local, streaming=streaming)
    else:
        _check_local_paths(path, local, data_dir, data_files)
        splits = _load_with_datasets(
            path,
            name=name,
            data_dir=None if data_dir is None else str(data_dir),
            data_files=data_files,
            revision=revision,
            streaming=streaming,
            cache_dir=None if cache_dir is None else str(cache_dir),
            token=token,
        )
    if split is None:
        return splits
    return get_split(splits, split, argument="split", path=path)


def get_split(splits: Mapping[str, AnyDataset], split: str, argument: str, path: str = "") -> AnyDataset:
    """Return ``splits[split]``, or raise naming the available splits and the ``argument`` to set."""
    if split in splits:
        return splits[split]
    of = f" of {path!r}" if path else ""
    raise SplitNotFoundError(
        f"Split {split!r}{of} does not exist; available splits: {sorted(splits)}. "
        f"Set `{argument}` to one of them."
    )


def check_columns(dataset: AnyDataset, columns: Mapping[str, str], split: str = "") -> None:
    """Raise if a column named by the argument -> column mapping ``columns`` is missing.

    A streaming dataset whose columns are unknown until it is read is not checked.
    """
    available = dataset.column_names
    if available is None:
        return
    for argument, column in columns.items():
        if column not in available:
            where = f" in split {split!r}" if split else ""
            raise ColumnNotFoundError(
                f"Column {column!r} does not exist{where}; available columns: {available}. "
                f"Set `{argument}` to one of them."
            )


def check_not_empty(dataset: AnyDataset, split: str, argument: str, path: str = "") -> None:
    """Raise if a map-style split has no rows (a streamed split's length is unknown until read)."""
    if isinstance(dataset, Dataset) and len(dataset) == 0:
        of = f" of {path!r}" if path else ""
        raise DataError(
            f"Split {split!r}{of} is empty: it has no examples. Add data to it, or set `{argument}` to a "
            "split that has some."
        )


def integer_labels(dataset: Dataset, column: str, split: str) -> np.ndarray:
    """The label column of a map-style dataset as integers, read without decoding any image.

    Raises if the column is not integer-typed or has a missing value.
    """
    table = dataset.select_columns([column]).with_format("arrow")[:]
    array = table.column(column).combine_chunks()
    if not pa.types.is_integer(array.type):
        raise InvalidLabelError(
            f"Column {column!r} of split {split!r} holds {array.type} values, not integer class "
            "indices. Set `label_column` to an integer or ClassLabel column, or encode the labels "
            "first (e.g. `dataset.class_encode_column`)."
        )
    if array.null_count:
        row = int(np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[0])
        raise InvalidLabelError(f"Column {column!r} of split {split!r} has a missing label at row {row}.")
    return array.to_numpy(zero_copy_only=False)


def check_labels(dataset: Dataset, column: str, num_classes: int, split: str) -> None:
    """Raise if any label is missing or outside ``[0, num_classes)``; vectorised over the column."""
    values = integer_labels(dataset, column, split)
    bad = np.flatnonzero((values < 0) | (values >= num_classes))
    if bad.size:
        row = int(bad[0])
        hint = " (-1 usually marks an unlabelled split: use it as `predict_split`)" if values[row] == -1 else ""
        raise InvalidLabelError(
            f"Label {int(values[row])} at row {row} of column {column!r} in split {split!r} is outside "
            f"[0, {num_classes}){hint}; {bad.size} row(s) are out of range. Fix the labels, or check "
            "`label_column` and that every split uses the train split's classes."
        )


def open_image(value: Any) -> Image.Image:
    """Open an image stored as ``datasets.Image(decode=False)`` gives it: ``{"bytes", "path"}``.

    Also accepts a path string or a PIL image. The pixels are read now, so a truncated or
    corrupt file fails here. Raises :class:`CorruptImageError` naming the file.
    """
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (str, os.PathLike)):
        value = {"bytes": None, "path": os.fspath(value)}
    data, path = value.get("bytes"), value.get("path")
    where = path or "<in-memory bytes>"
    try:
        if data is not None:
            image = Image.open(io.BytesIO(data))
        elif path is None:
            raise ValueError("the row has neither image bytes nor a path")
        elif "://" in path or "::" in path:
            from datasets.utils.file_utils import xopen

            with xopen(path, "rb") as file:
                image = Image.open(io.BytesIO(file.read()))
        else:
            image = Image.open(path)
        image.load()
    except Exception as error:
        raise CorruptImageError(f"Cannot decode image {where}: {error}") from error
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation and convert any PIL mode to 8-bit RGB.

    Transparency is composited over white; 16- and 32-bit integer images are scaled from their
    16-bit range to 8 bits (PIL's own ``convert`` would clip them); CMYK uses PIL's conversion.
    """
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        pixels = np.asarray(image, dtype=np.float64)
        pixels = np.clip(np.rint(pixels / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(pixels, mode="L").convert("RGB")
    if mode == "F":
        pixels = np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(pixels, mode="L").convert("RGB")
    if (mode == "P" and "transparency" in image.info) or mode == "PA":
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def read_rgb_image(value: Any) -> Image.Image:
    """Open a stored image (see :func:`open_image`) as an upright 8-bit RGB PIL image."""
    image = open_image(value)
    try:
        return to_rgb(image)
    except Exception as error:
        where = value.get("path") if isinstance(value, dict) else value
        raise CorruptImageError(f"Cannot convert image {where} (mode {image.mode}) to RGB: {error}") from error


# ---------------------------------------------------------------------------------------------
# helpers


def _is_saved_to_disk(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _load_saved(folder: Path, streaming: bool) -> AnyDatasetDict:
    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as error:
        raise DataError(f"Cannot load the dataset saved with save_to_disk at {folder}: {error}") from error
    if isinstance(loaded, Dataset):
        loaded = DatasetDict({"train": loaded})
    if not streaming:
        return loaded
    return IterableDatasetDict(
        {
            split: dataset.to_iterable_dataset(num_shards=max(1, min(len(dataset), _SAVED_DATASET_STREAMING_SHARDS)))
            for split, dataset in loaded.items()
        }
    )


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~", ".\\", "..\\")) or (len(path) > 1 and path[1] == ":")


def _is_remote(path: str) -> bool:
    return "://" in path


def _check_local_paths(path: str, local: Path, data_dir: Any, data_files: DataFiles | None) -> None:
    """Fail early, with the path in the message, on local paths that do not exist."""
    if _looks_local(path) and not local.exists():
        raise DataNotFoundError(
            f"Dataset path {path!r} does not exist ({local.resolve()}). Set `path` to an existing "
            "folder, a Hub dataset id, or a builder such as 'imagefolder' with `data_dir`."
        )
    builder = path in _PACKAGED_DATASETS_MODULES
    if data_dir is not None and not _is_remote(str(data_dir)):
        folder = Path(data_dir).expanduser()
        # Inside a Hub or local dataset repository, data_dir is relative to the repository.
        if not folder.is_absolute() and not builder:
            folder = local / folder if local.is_dir() else None
        if folder is not None and not folder.is_dir():
            raise DataNotFoundError(
                f"data_dir {str(data_dir)!r} does not exist or is not a folder ({folder.resolve()}). "
                "Set `data_dir` to the folder holding the data (for 'imagefolder': "
                "<data_dir>/<split>/<class>/<image>)."
            )
    if data_files is not None and builder:
        for file in _iter_data_files(data_files):
            if _is_remote(file) or any(char in file for char in "*?["):
                continue  # globs and URLs are resolved by datasets
            if not Path(file).expanduser().exists():
                raise DataNotFoundError(
                    f"Data file {file!r} does not exist ({Path(file).expanduser().resolve()}). "
                    "Fix `data_files`."
                )


def _iter_data_files(data_files: DataFiles) -> Iterable[str]:
    if isinstance(data_files, (str, os.PathLike)):
        yield os.fspath(data_files)
    elif isinstance(data_files, Mapping):
        for files in data_files.values():
            yield from _iter_data_files(files)
    else:
        for file in data_files:
            yield from _iter_data_files(file)


def _load_with_datasets(path: str, **kwargs: Any) -> AnyDatasetDict:
    try:
        loaded = datasets.load_dataset(path, **kwargs)
    except Exception as error:
        described = ", ".join(f"{key}={value!r}" for key, value in kwargs.items() if value not in (None, False))
        error_type = DataNotFoundError if isinstance(error, FileNotFoundError) else DataError
        raise error_type(
            f"Cannot open dataset path={path!r}" + (f" ({described})" if described else "") + f": {error}\n"
            "Check `path` (a Hub id, a local folder, or a builder such as 'imagefolder'/'parquet'), "
            "`name`, `data_dir` and `data_files`; Hub datasets also need network access (or a "
            "filled cache with HF_HUB_OFFLINE=1) and, if gated, a token (`hf auth login`)."
        ) from error
    if isinstance(loaded, Dataset):
        loaded = DatasetDict({"train": loaded})
    elif isinstance(loaded, IterableDataset):
        loaded = IterableDatasetDict({"train": loaded})
    return loaded
