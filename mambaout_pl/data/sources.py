"""Open a dataset the way a user names it: a Hub id, a builder, a folder, or ``builtin:<name>``.

A user names a dataset by ``path`` (and optionally ``name``, ``data_dir``, ``data_files``,
``revision``), exactly as in ``datasets.load_dataset``:

- a Hub id such as ``"ILSVRC/imagenet-1k"`` (downloaded and cached by ``datasets``);
- a packaged builder such as ``"imagefolder"`` or ``"parquet"`` with ``data_dir`` / ``data_files``
  (a local ``imagefolder`` folder is read from an index written on its first open: ``folder_index.py``);
- ``"ade20k"`` with ``data_dir``: a folder in the ADEChallengeData2016 layout (``ade20k.py``);
- ``"coco"`` with ``data_dir``: a COCO folder, ``annotations/instances_<split>.json`` and ``<split>/``
  images (``coco.py``);
- a local folder of data files, or a folder written by ``Dataset.save_to_disk``;
- ``"builtin:<name>"``, an embedded quick-start dataset that needs no network (``embedded.py``).

Everything a user can get wrong raises a :class:`~mambaout_pl.data.errors.DataError` subclass
whose message names the value and says which argument to change.
"""

from __future__ import annotations

import logging
import os
import pkgutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import datasets.packaged_modules
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict

from mambaout_pl.data import embedded
from mambaout_pl.data.ade20k import load_ade20k_folder
from mambaout_pl.data.coco import load_coco_folder
from mambaout_pl.data.errors import DataError, DataNotFoundError, SplitNotFoundError
from mambaout_pl.data.folder_index import UnsupportedLayout, open_image_folder

logger = logging.getLogger(__name__)

AnyDataset = Dataset | IterableDataset
AnyDatasetDict = DatasetDict | IterableDatasetDict
DataFiles = str | Sequence[str] | Mapping[str, str | Sequence[str]]

#: ``path`` of a folder in the ADEChallengeData2016 layout, given as ``data_dir``.
ADE20K_LAYOUT = "ade20k"
#: ``path`` of a COCO folder (``annotations/instances_<split>.json`` and ``<split>/``), given as ``data_dir``.
COCO_LAYOUT = "coco"
#: Each folder layout's reader, and what ``data_dir`` must then hold.
LAYOUT_FOLDERS = {
    ADE20K_LAYOUT: (
        load_ade20k_folder,
        "an ADEChallengeData2016-layout folder: set `data_dir` to the folder holding images/ and annotations/",
    ),
    COCO_LAYOUT: (
        load_coco_folder,
        "a COCO folder: set `data_dir` to the folder holding annotations/ (instances_<split>.json) and the "
        "<split>/ image folders",
    ),
}

# Number of shards a saved-to-disk dataset is cut into when streamed, so that ranks and
# dataloader workers each get whole shards.
_SAVED_DATASET_STREAMING_SHARDS = 64

# The builders that ship with ``datasets`` (``"imagefolder"``, ``"parquet"``, ...): their
# ``data_dir`` is a folder of its own, not one inside a dataset repository.
PACKAGED_BUILDERS = frozenset(module.name for module in pkgutil.iter_modules(datasets.packaged_modules.__path__))


def resolve_builtin(
    path: str, data_dir: str | os.PathLike | None, data_files: DataFiles | None, cache_dir: str | os.PathLike | None
) -> tuple[str, str | os.PathLike | None]:
    """``(path, data_dir)`` with an embedded ``builtin:<name>`` written to disk and named by its builder.

    Classification data becomes ``("imagefolder", folder)``, segmentation data ``("ade20k", folder)``,
    detection data ``("coco", folder)``; any other ``path`` is returned as is.
    """
    if not path.startswith(embedded.BUILTIN_PREFIX):
        return path, data_dir
    if data_dir is not None or data_files is not None:
        raise DataError(
            f"path={path!r} is an embedded dataset and takes no data_dir or data_files; remove them, or set "
            "`path` to the builder that reads your files: 'imagefolder' (classification), 'ade20k' (an "
            "ADEChallengeData2016-layout folder) or 'coco' (a COCO folder), with `data_dir` the folder."
        )
    try:
        name = embedded.builtin_name(path)
    except ValueError as error:
        raise DataError(f"{error} Set `path` to one of them.") from error
    folder = embedded.materialize(path, cache_dir=cache_dir)
    if name in embedded.SEGMENTATION_DATASETS:
        return ADE20K_LAYOUT, folder
    if name in embedded.DETECTION_DATASETS:
        return COCO_LAYOUT, folder
    return "imagefolder", folder


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
    """Open a dataset by Hub id, packaged builder, ADE20K-layout or COCO folder, local folder or ``builtin:<name>``.

    Returns all splits (a ``DatasetDict``, or an ``IterableDatasetDict`` when ``streaming``), or
    the one split named by ``split``. A folder saved with ``save_to_disk`` holding a single
    ``Dataset`` is returned as the split ``"train"``.
    """
    path, data_dir = resolve_builtin(path, data_dir, data_files, cache_dir)
    local = Path(path).expanduser()
    if path in LAYOUT_FOLDERS:
        load_folder, layout = LAYOUT_FOLDERS[path]
        if data_dir is None:
            raise DataError(f"path={path!r} reads {layout}.")
        splits = _maybe_stream(load_folder(data_dir), streaming)
    elif _is_saved_to_disk(local):
        splits = _load_saved(local, streaming=streaming)
    else:
        _check_local_paths(path, local, data_dir, data_files)
        indexed = path == "imagefolder" and name is None and data_files is None and revision is None
        splits = _open_indexed_image_folder(data_dir, cache_dir) if indexed and not streaming else None
        if splits is None:
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


def open_images(
    images: str | os.PathLike | Sequence[str | os.PathLike],
    cache_dir: str | os.PathLike | None = None,
    argument: str = "predict_images",
) -> Dataset:
    """Image files without labels as one split with an ``image`` column, in path order: every image under a
    folder (sub-folders included), the files a glob matches, or the files listed; ``file_name`` gives each
    image's path relative to the folder holding them all (:func:`relative_file_names`).

    ``datasets``' ``imagefolder`` builder reads them with ``drop_labels``, so neither sub-folder nor file
    names make classes or splits of them.
    """
    items = [images] if isinstance(images, (str, os.PathLike)) else list(images)
    patterns = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            patterns.append(str(path / "**"))
        elif path.is_file() or any(char in str(item) for char in "*?["):
            patterns.append(str(path))
        else:
            raise DataNotFoundError(
                f"{argument}: {str(item)!r} is neither a folder, an image file nor a glob ({path.resolve()} does not "
                f"exist). Set `{argument}` to the folder of images to predict."
            )
    try:
        dataset = datasets.load_dataset(
            "imagefolder",
            data_files={"predict": patterns},
            drop_labels=True,
            split="predict",
            cache_dir=None if cache_dir is None else str(cache_dir),
        )
    except (FileNotFoundError, ValueError) as error:  # ValueError: no file matched
        raise DataNotFoundError(
            f"{argument} = {images!r} holds no image files that `datasets` reads ({', '.join(patterns)}: {error}). "
            f"Set `{argument}` to a folder of images (.png, .jpg, ...), a glob, or a list of image files."
        ) from error
    paths = dataset.data.column("image").combine_chunks().field("path").to_pylist()
    return dataset.add_column("file_name", relative_file_names(paths))


def relative_file_names(paths: Sequence[str]) -> list[str]:
    """Each path relative to the deepest folder holding them all, with ``/``: images named alike in different
    sub-folders keep different names (``a/x.png``, ``b/x.png``), a flat folder's are its file names."""
    paths = [os.path.abspath(path) for path in paths]
    if not paths:
        return []
    root = os.path.commonpath([os.path.dirname(path) for path in paths])
    return [Path(os.path.relpath(path, root)).as_posix() for path in paths]


def get_split(splits: Mapping[str, AnyDataset], split: str, argument: str, path: str = "") -> AnyDataset:
    """Return ``splits[split]``, or raise naming the available splits and the ``argument`` to set."""
    if split in splits:
        return splits[split]
    of = f" of {path!r}" if path else ""
    raise SplitNotFoundError(
        f"Split {split!r}{of} does not exist; available splits: {sorted(splits)}. Set `{argument}` to one of them."
    )


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
    return _maybe_stream(loaded, streaming)


def _maybe_stream(splits: DatasetDict, streaming: bool) -> AnyDatasetDict:
    """``splits`` as they are, or as iterable datasets cut into shards for ranks and workers."""
    if not streaming:
        return splits
    return IterableDatasetDict(
        {
            split: dataset.to_iterable_dataset(num_shards=max(1, min(len(dataset), _SAVED_DATASET_STREAMING_SHARDS)))
            for split, dataset in splits.items()
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
    builder = path in PACKAGED_BUILDERS
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
                    f"Data file {file!r} does not exist ({Path(file).expanduser().resolve()}). Fix `data_files`."
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


def _open_indexed_image_folder(
    data_dir: str | os.PathLike | None, cache_dir: str | os.PathLike | None
) -> DatasetDict | None:
    """A local image folder from its index (``folder_index.py``), or None where ``datasets``' loader must read it."""
    if data_dir is None or _is_remote(str(data_dir)):
        return None
    try:
        return open_image_folder(data_dir, cache_dir=cache_dir)
    except UnsupportedLayout as reason:
        logger.info(
            "Image folder %s is read by datasets' imagefolder loader, which lists it again on every open: %s.",
            data_dir,
            reason,
        )
        return None


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
