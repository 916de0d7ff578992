"""Files and folders that are never half-written: write beside the target, flush to disk, rename."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, ``fsync`` it and rename it onto ``path``.

    A crash or a kill in between leaves the previous ``path`` intact and at most a ``.<name>.*.tmp``
    file beside it; a failure removes the temporary file. The file gets the permissions of one made
    with the user's umask.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o666 & ~umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_write`."""
    atomic_write(path, lambda file: torch.save(obj, file))


def atomic_symlink(target: Path, link: Path) -> None:
    """Point ``link`` at ``target`` (relative), replacing whatever ``link`` was in one rename."""
    temporary = link.with_name(f".{link.name}.{os.getpid()}.link")
    temporary.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target, link.parent), temporary)
    os.replace(temporary, link)
    fsync_folder(link.parent)


@contextmanager
def staged_folder(target: Path, replace: bool = False) -> Iterator[Path]:
    """Yield an empty folder beside ``target`` that becomes ``target`` in one rename when the block succeeds.

    A failure removes the staged folder and leaves ``target`` as it was. With ``replace=False`` an
    existing ``target`` (e.g. written meanwhile by another process) is kept and the staged copy
    dropped; with ``replace=True`` it is swapped out and removed.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".staging", dir=target.parent))
    try:
        yield staging
        staging.chmod(0o777 & ~umask())  # mkdtemp makes 0700
        if replace and target.exists():
            retired = target.with_name(f".{target.name}.replaced-{uuid.uuid4().hex[:8]}")
            target.rename(retired)
            staging.rename(target)
            shutil.rmtree(retired)
        else:
            try:
                staging.rename(target)
            except OSError:
                if not target.is_dir():  # not another process winning the race: a real failure
                    raise
        fsync_folder(target.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def umask() -> int:
    """The process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (renames, new files) to disk where the platform allows it."""
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
