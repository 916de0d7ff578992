"""Checkpoint files that are never half-written, read without unpickling arbitrary objects.

- :func:`read_checkpoint` is the one place a training checkpoint is read from disk.
- :class:`AtomicCheckpointIO` writes a checkpoint to a temporary file beside its target, flushes
  it to disk and renames it over the target, so a crash or a kill while saving leaves the previous
  file intact. Lightning's own ``TorchCheckpointIO`` stages local files in the system temporary
  folder and moves them with ``shutil.move``, which is a copy (not atomic) when that folder is on
  another file system, and never calls ``fsync``.
- :class:`ModelCheckpoint` is Lightning's, with ``last.ckpt`` links replaced atomically too, and one
  copy of the bytes of checkpoints that two callbacks save of the same training state.
- :func:`find_last_checkpoint` resolves ``--ckpt_path last`` across a logger's run versions.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.cloud_io import _load as pl_load
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer import Trainer

from mambaout_pl.errors import CheckpointError, UnsafeCheckpointError, first_sentence
from mambaout_pl.training.atomic import atomic_hard_link, atomic_symlink, atomic_torch_save, atomic_write
from mambaout_pl.training.sharded_checkpoint import is_sharded_checkpoint


def read_checkpoint(
    path: _PATH,
    map_location: Callable | str | None = "cpu",
    weights_only: bool = True,
) -> dict[str, Any]:
    """A training checkpoint (a dict with a ``state_dict``) read with ``weights_only=True`` unless told otherwise.

    Raises ``FileNotFoundError`` for a missing local file, :class:`UnsafeCheckpointError` for a file
    that holds pickled Python objects, and :class:`CheckpointError` for a truncated file, one that
    is not a training checkpoint, or a sharded checkpoint folder (saying how to make it one file);
    every message names the file.
    """
    if "://" not in str(path) and not get_filesystem(path).exists(path):
        raise FileNotFoundError(
            f"Checkpoint file '{path}' does not exist; give the path of a .ckpt file written by `fit`."
        )
    if "://" not in str(path) and is_sharded_checkpoint(path):
        raise CheckpointError(
            f"'{path}' is a sharded checkpoint folder (written by ModelParallelStrategy with "
            "save_distributed_checkpoint=true): `fit --ckpt_path` resumes from it under that strategy, but this needs "
            f"one file. Write one with `mambaout consolidate {path} model.ckpt` and give model.ckpt, or train with "
            "--trainer.strategy.save_distributed_checkpoint false to write checkpoint files."
        )
    try:
        checkpoint = pl_load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"Refusing to load '{path}': it holds Python objects other than tensors and plain containers, "
            f"which could run code when unpickled ({error}). Load only checkpoints written by `mambaout fit`; "
            "for a file you produced yourself and trust, re-save its state dicts with torch.save."
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(
            f"Cannot read checkpoint '{path}' (truncated, or not written by torch.save): {first_sentence(error)}. "
            "Use another checkpoint, e.g. the previous epoch's."
        ) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        keys = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(
            f"'{path}' is not a training checkpoint: it has no 'state_dict' (it holds {keys}). `--ckpt_path` and "
            "`mambaout export` take checkpoints written by `fit`; plain weight files go in `model.pretrained`."
        )
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes local files atomically and loads with ``weights_only=True``.

    Saving: ``torch.save`` into ``.<name>.<random>.tmp`` in the target's folder, ``fsync``, then
    ``os.replace`` onto the target (and ``fsync`` of the folder). Remote paths (``s3://`` ...) are
    left to Lightning. Loading goes through :func:`read_checkpoint`, which refuses pickled objects
    other than tensors and plain containers unless the caller passes ``weights_only=False``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        atomic_torch_save(checkpoint, Path(path))
        return None

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        return read_checkpoint(
            path, map_location=map_location, weights_only=True if weights_only is None else weights_only
        )


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint``; with ``save_last="link"``, ``last.ckpt`` is re-pointed in one rename.

    Lightning removes the old link before creating the new one, so a kill in between leaves no
    ``last.ckpt`` at all and ``--ckpt_path last`` silently starts over.

    When another of these callbacks saved a checkpoint at the same point of training (the same hook,
    epoch and step, both with or both without the optimizer state), e.g. the best and the latest
    epoch, its file becomes a hard link to the one saved second, which holds every callback's
    updated state: the run keeps one copy of the bytes. Where hard links cannot be made, both stay.

    ``validate``, ``test`` and ``predict`` save no checkpoint, so they do not restore the fit's records
    of its checkpoints either (Lightning would warn that the folder it saves to has changed).
    """

    _moment: str | None = None
    _saved: tuple[tuple[Any, ...], str] | None = None
    _stage: str | None = None

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        self._stage = stage
        super().setup(trainer, pl_module, stage)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._stage in (None, "fit"):
            super().load_state_dict(state_dict)

    def on_train_batch_end(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        self._moment = "on_train_batch_end"
        super().on_train_batch_end(trainer, *args, **kwargs)

    def on_train_epoch_end(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        self._moment = "on_train_epoch_end"
        super().on_train_epoch_end(trainer, *args, **kwargs)

    def on_validation_end(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        self._moment = "on_validation_end"
        super().on_validation_end(trainer, *args, **kwargs)

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        point = (self._moment, trainer.current_epoch, trainer.global_step, self.save_weights_only)
        self._saved = (point, filepath)
        if not trainer.is_global_zero:
            return
        for callback in trainer.checkpoint_callbacks:
            saved = getattr(callback, "_saved", None) if callback is not self else None
            if saved is not None and saved[0] == point:
                share_checkpoint_bytes(Path(filepath), Path(saved[1]))

    @staticmethod
    def _link_checkpoint(trainer: Trainer, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            link = Path(linkpath)
            if link.is_dir() and not link.is_symlink():
                raise CheckpointError(
                    f"'{linkpath}' is a folder; remove it so that the latest checkpoint can be linked there."
                )
            try:
                atomic_symlink(Path(filepath), link)
            except OSError:  # no symbolic links (e.g. Windows without the privilege): an atomic copy
                content = Path(filepath).read_bytes()
                atomic_write(link, lambda file: file.write(content))
        trainer.strategy.barrier()


def share_checkpoint_bytes(source: Path, other: Path) -> bool:
    """Replace the checkpoint file ``other`` by a hard link to ``source`` (a checkpoint of the same training
    state); False, both left as they are, for folders, links, a missing file or no hard links."""
    if "://" in str(source) or "://" in str(other) or source.absolute() == other.absolute():
        return False
    if not (source.is_file() and other.is_file()) or source.is_symlink() or other.is_symlink():
        return False
    if os.path.samefile(source, other):
        return True
    try:
        atomic_hard_link(source, other)
    except OSError:
        return False
    return True


def last_checkpoint_folders(trainer: Trainer) -> list[Path]:
    """The folders (glob patterns allowed) where this trainer's checkpoint callbacks write, in any run version.

    Lightning only looks in the current run's folder, and a new run (``version_N+1``) starts empty.
    """
    folders: set[Path] = set()
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, LightningModelCheckpoint):
            continue
        if callback.dirpath is not None:
            folders.add(Path(callback.dirpath))
        elif trainer.loggers:
            logger = trainer.loggers[0]
            folders.add(
                Path(logger.save_dir or trainer.default_root_dir) / str(logger.name or "") / "*" / "checkpoints"
            )
        else:
            folders.add(Path(trainer.default_root_dir) / "checkpoints")
    return sorted(folders)


def last_checkpoint_candidates(trainer: Trainer, accept_run: Callable[[Path], bool] | None = None) -> list[Path]:
    """Every complete ``last*.ckpt`` this trainer's checkpoint callbacks could have written, in any run version
    (only in the run folders ``accept_run`` accepts, when given)."""
    folders = last_checkpoint_folders(trainer)
    return [path for path in _checkpoint_files(folders, "last*.ckpt", accept_run) if path.exists()]


def find_last_checkpoint(trainer: Trainer, accept_run: Callable[[Path], bool] | None = None) -> Path | None:
    """The most recently written ``last*.ckpt`` among :func:`last_checkpoint_candidates`, or None when there is none.

    ``accept_run(run_folder)`` chooses the run versions searched (a fixed ``dirpath`` is always searched).
    Raises :class:`CheckpointError` for a ``last*.ckpt`` link whose checkpoint is gone and that is
    newer than every complete one, and for checkpoint folders that hold checkpoints but no
    ``last*.ckpt``: resuming from an older file, or starting over, would silently lose training.
    """
    folders = last_checkpoint_folders(trainer)
    links = list(_checkpoint_files(folders, "last*.ckpt", accept_run))
    complete = [path for path in links if path.exists()]
    newest = max(complete, key=lambda path: path.stat().st_mtime_ns) if complete else None
    dangling = [
        path
        for path in links
        if not path.exists() and (newest is None or path.lstat().st_mtime_ns > newest.stat().st_mtime_ns)
    ]
    if dangling:
        link = max(dangling, key=lambda path: path.lstat().st_mtime_ns)
        raise CheckpointError(
            f"--ckpt_path last: '{link}' links to '{os.readlink(link)}', which no longer exists, so there is no "
            "latest checkpoint to resume. Give the checkpoint to resume with --ckpt_path PATH (the run's other "
            "checkpoints are in the same folder), or delete the link to start this run from scratch."
        )
    if newest is None:
        others = sorted(_checkpoint_files(folders, "*.ckpt", accept_run))
        if others:
            listed = ", ".join(f"'{path}'" for path in others[:5]) + (" ..." if len(others) > 5 else "")
            raise CheckpointError(
                f"--ckpt_path last: no last*.ckpt in {_describe(folders)}, but it holds checkpoints ({listed}). "
                "Give the one to resume with --ckpt_path PATH."
            )
    return newest


def describe_last_checkpoint_folders(trainer: Trainer) -> str:
    """The folders ``--ckpt_path last`` searches, for messages."""
    return _describe(last_checkpoint_folders(trainer))


def _describe(folders: Iterable[Path]) -> str:
    return " and ".join(f"'{folder}'" for folder in folders) or "no folder (no checkpoint callback)"


def _checkpoint_files(
    folders: Iterable[Path], pattern: str, accept_run: Callable[[Path], bool] | None = None
) -> Iterator[Path]:
    for folder in folders:
        expanded = "*" in folder.parts
        for match in _expand(folder):
            if match.is_dir() and (not expanded or accept_run is None or accept_run(match.parent)):
                yield from match.glob(pattern)


def _expand(folder: Path) -> Iterable[Path]:
    """The folders a path with a ``*`` part matches (only that part is a pattern), or the path itself."""
    parts = folder.parts
    if "*" not in parts:
        return [folder]
    index = parts.index("*")
    return Path(*parts[:index]).glob(str(Path(*parts[index:])))
