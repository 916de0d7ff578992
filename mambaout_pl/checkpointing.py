"""Checkpoint files that are never half-written, read without unpickling arbitrary objects.

- :class:`AtomicCheckpointIO` writes a checkpoint to a temporary file beside its target, flushes
  it to disk and renames it over the target, so a crash or a kill while saving leaves the previous
  file intact. Lightning's own ``TorchCheckpointIO`` stages local files in the system temporary
  folder and moves them with ``shutil.move``, which is a copy (not atomic) when that folder is on
  another file system, and never calls ``fsync``.
- :class:`ModelCheckpoint` is Lightning's, with ``last.ckpt`` links replaced atomically too.
- :func:`find_last_checkpoint` resolves ``--ckpt_path last`` across a logger's run versions.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _load as pl_load
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer import Trainer


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the run that reads it."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes local files atomically and loads with ``weights_only=True``.

    Saving: ``torch.save`` into ``.<name>.<random>.tmp`` in the target's folder, ``fsync``, then
    ``os.replace`` onto the target (and ``fsync`` of the folder). Remote paths (``s3://`` ...) are
    left to Lightning. Loading refuses pickled objects other than tensors and plain containers
    unless the caller passes ``weights_only=False`` explicitly.
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
        if "://" not in str(path) and not get_filesystem(path).exists(path):
            raise FileNotFoundError(f"Checkpoint file '{path}' does not exist; give the path of a .ckpt file written by `fit`.")
        weights_only = True if weights_only is None else weights_only
        try:
            checkpoint = pl_load(path, map_location=map_location, weights_only=weights_only)
        except pickle.UnpicklingError as error:
            raise CheckpointError(
                f"Refusing to load '{path}': it holds Python objects other than tensors and plain containers, "
                f"which could run code when unpickled ({error}). Load only checkpoints written by `mambaout fit`; "
                "for a file you produced yourself and trust, re-save its state dicts with torch.save."
            ) from error
        except (RuntimeError, EOFError, OSError) as error:
            raise CheckpointError(
                f"Cannot read checkpoint '{path}' (truncated, or not written by torch.save): {error}. "
                "Resume from another checkpoint, e.g. the previous epoch's."
            ) from error
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            keys = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
            raise CheckpointError(
                f"'{path}' is not a training checkpoint: it has no 'state_dict' (it holds {keys}). `--ckpt_path` "
                "takes checkpoints written by `fit`; plain weight files go in `model.pretrained`."
            )
        return checkpoint


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save(obj, path)`` through a temporary file in the same folder and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def atomic_symlink(target: Path, link: Path) -> None:
    """Point ``link`` at ``target`` (relative), replacing whatever ``link`` was in one rename."""
    temporary = link.with_name(f".{link.name}.{os.getpid()}.link")
    temporary.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target, link.parent), temporary)
    os.replace(temporary, link)
    _fsync_folder(link.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open folders
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint``; with ``save_last="link"``, ``last.ckpt`` is re-pointed in one rename.

    Lightning removes the old link before creating the new one, so a kill in between leaves no
    ``last.ckpt`` at all and ``--ckpt_path last`` silently starts over.
    """

    @staticmethod
    def _link_checkpoint(trainer: Trainer, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            link = Path(linkpath)
            if link.is_dir() and not link.is_symlink():
                raise CheckpointError(f"'{linkpath}' is a folder; remove it so that the latest checkpoint can be linked there.")
            try:
                atomic_symlink(Path(filepath), link)
            except OSError:  # no symbolic links (e.g. Windows without the privilege): an atomic copy
                atomic_torch_save(torch.load(filepath, map_location="cpu", weights_only=True), link)
        trainer.strategy.barrier()


def last_checkpoint_candidates(trainer: Trainer) -> list[Path]:
    """Every complete ``last*.ckpt`` this trainer's checkpoint callbacks could have written, in any run version.

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
            root = Path(logger.save_dir or trainer.default_root_dir) / str(logger.name or "")
            folders.update(root.glob("*/checkpoints"))
        else:
            folders.add(Path(trainer.default_root_dir) / "checkpoints")
    return [path for path in _last_files(folders) if path.exists()]


def find_last_checkpoint(trainer: Trainer) -> Path | None:
    """The most recently written ``last*.ckpt`` among :func:`last_checkpoint_candidates`, or None."""
    candidates = last_checkpoint_candidates(trainer)
    return max(candidates, key=lambda path: path.stat().st_mtime_ns) if candidates else None


def _last_files(folders: Iterable[Path]) -> Iterable[Path]:
    for folder in folders:
        if folder.is_dir():
            yield from folder.glob("last*.ckpt")
