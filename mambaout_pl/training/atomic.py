"""Files and folders that are never half-written: write beside the target, flush to disk, rename.

A failure to write (no space left, a read-only folder, a file where a folder should be) raises
:class:`~mambaout_pl.errors.OutputWriteError` naming the target, never the temporary file beside it.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import SafetensorError

from mambaout_pl.errors import OutputExistsError, OutputWriteError


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any], exclusive: bool = False) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, ``fsync`` it and rename it onto ``path``.

    A crash or a kill in between leaves the previous ``path`` intact and at most a ``.<name>.*.tmp``
    file beside it; a failure removes the temporary file. The file gets the permissions of one made
    with the user's umask. ``exclusive``: never replace an existing ``path`` (see :func:`place_new_file`).
    """
    with naming_target(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(descriptor, "wb") as file:
                write(file)
                file.flush()
                os.fsync(file.fileno())
            os.chmod(temporary, 0o666 & ~umask())
            if exclusive:
                place_new_file(Path(temporary), path)
            else:
                os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    fsync_folder(path.parent)


def place_new_file(source: Path, path: Path) -> None:
    """Move the finished file ``source`` to ``path`` unless ``path`` exists, in one step (a hard link, then
    ``source`` removed); raise :class:`~mambaout_pl.errors.OutputExistsError` if it does."""
    try:
        os.link(source, path)
    except FileExistsError:
        raise OutputExistsError(
            f"'{path}' was written by another process while this one was writing it; it is kept as that process "
            "wrote it. Give each command its own output folder."
        ) from None
    except OSError:  # a file system without hard links: check, then rename
        if path.exists() or path.is_symlink():
            raise OutputExistsError(
                f"'{path}' was written by another process while this one was writing it; it is kept as that "
                "process wrote it. Give each command its own output folder."
            ) from None
        os.replace(source, path)
        return
    source.unlink()


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


def atomic_hard_link(source: Path, path: Path) -> None:
    """Make ``path`` a second name of the file ``source`` (one copy of its bytes), replacing ``path`` in one rename.

    Raises ``OSError`` where hard links cannot be made (another file system, no support); ``path`` is then untouched.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.hardlink")
    temporary.unlink(missing_ok=True)
    os.link(source, temporary)
    try:
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


@contextmanager
def staged_folder(target: Path, replace: bool = False) -> Iterator[Path]:
    """Yield an empty folder beside ``target`` that becomes ``target`` in one rename when the block succeeds.

    A failure removes the staged folder and leaves ``target`` as it was. With ``replace=False`` an
    existing ``target`` (e.g. written meanwhile by another process) is kept and the staged copy
    dropped; with ``replace=True`` it is swapped out and removed. The folder and the files in it get
    the permissions of ones made with the user's umask (see :func:`plain_permissions`), whatever
    wrote them through a temporary file of its own (``safetensors`` writes ``0600`` files).
    """
    with naming_target(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".staging", dir=target.parent))
    try:
        with naming_target(target):
            yield staging
            plain_permissions(staging)
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


def plain_permissions(folder: Path) -> None:
    """Give ``folder``, its sub-folders and its files without an execute bit the permissions that ``mkdir`` and
    ``open(path, "w")`` give under the current umask (``0755`` and ``0644`` for umask ``022``)."""
    mask = umask()
    folder.chmod(0o777 & ~mask)  # mkdtemp makes 0700
    for path in folder.rglob("*"):
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(0o777 & ~mask)
        elif path.is_file() and not path.stat().st_mode & 0o111:
            path.chmod(0o666 & ~mask)


@contextmanager
def naming_target(target: Path) -> Iterator[None]:
    """Turn a failure to write inside the block (an ``OSError``, or a library's error caused by one, see
    :func:`write_failure`) into :class:`OutputWriteError` naming ``target``, the cause and the fix."""
    try:
        yield
    except (OutputWriteError, OutputExistsError):
        raise
    except Exception as error:
        cause = write_failure(error)
        if cause is None:
            raise
        raise write_error(target, cause) from error


def write_failure(error: BaseException) -> OSError | None:
    """The ``OSError`` behind ``error``: itself; for torch's ``RuntimeError`` (``torch.save`` reports a failed
    write as "unexpected pos ...") the ``OSError`` it was raised from; for safetensors' errors the operating
    system's error they quote ("(os error 28)"). None for any other error."""
    if isinstance(error, OSError):
        return error
    if isinstance(error, RuntimeError):
        seen: set[int] = set()
        inner = error.__cause__ or error.__context__
        while inner is not None and id(inner) not in seen:
            if isinstance(inner, OSError):
                return inner
            seen.add(id(inner))
            inner = inner.__cause__ or inner.__context__
    if isinstance(error, (RuntimeError, SafetensorError)):
        quoted = re.search(r"\(os error (\d+)\)", str(error))
        if quoted:
            number = int(quoted.group(1))
            return OSError(number, os.strerror(number))
    return None


def write_error(target: Path, error: OSError) -> OutputWriteError:
    """An :class:`OutputWriteError` that says why ``target`` cannot be written and what to do."""
    blocking = file_above(target)
    detail = error.strerror or str(error)
    if blocking is not None:
        message = (
            f"Cannot write '{target}': '{blocking}' is a file, not a folder ({detail}). "
            "Move that file away or choose another output folder."
        )
    elif error.errno in (errno.ENOSPC, errno.EDQUOT):
        message = (
            f"Cannot write '{target}': no space left on its disk ({detail}). "
            "Free space there (e.g. delete old checkpoints) or choose an output folder on another disk."
        )
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        message = (
            f"Cannot write '{target}': its folder '{target.parent}' is read-only or not writable by this user "
            f"({detail}). Make it writable or choose another output folder."
        )
    else:
        message = f"Cannot write '{target}' ({detail}). Check that its folder exists and can be written."
    translated = OutputWriteError(message)
    translated.errno = error.errno
    return translated


def file_above(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` (or ``path``'s parent itself) when it is not a folder, else None."""
    for ancestor in path.parents:
        if ancestor.exists() or ancestor.is_symlink():
            return None if ancestor.is_dir() else ancestor
    return None


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
