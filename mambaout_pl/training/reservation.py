"""Outputs reserved by one command while it runs: a lock file that names the command, removed at its end.

Two commands writing into the same predictions or export folder would each finish believing they
wrote their results, and the folder would hold a mix, or only the last one's. :func:`reserve_outputs`
creates a lock file and holds an exclusive ``flock`` on it while the command runs; the file records
the command line, the process id, the host and the start time. A second command finds the lock held
and refuses with :class:`~mambaout_pl.errors.OutputInUseError`, naming the output and the command
holding it. The kernel releases the lock of a process that dies, so a lock file left by a killed
command is taken over, with a warning naming it. Platforms without ``fcntl`` (Windows) reserve nothing.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from mambaout_pl.errors import OutputInUseError
from mambaout_pl.training.atomic import naming_target

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

__all__ = ["Reservation", "StaleReservationWarning", "reserve_outputs"]


class StaleReservationWarning(UserWarning):
    """A reservation left by a command that is no longer running was taken over."""


class Reservation:
    """A held lock file; :meth:`release` (or leaving the ``with`` block) removes it."""

    def __init__(self, lock: Path, descriptor: int | None) -> None:
        self.lock = lock
        self._descriptor = descriptor

    @property
    def held(self) -> bool:
        return self._descriptor is not None

    def release(self) -> None:
        """Remove the lock file and release it; a second call does nothing."""
        if self._descriptor is None:
            return
        try:
            if _is_same_file(self._descriptor, self.lock):
                self.lock.unlink()  # while still locked: the next command creates a fresh file
        finally:
            os.close(self._descriptor)  # releases the flock
            self._descriptor = None

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()


def reserve_outputs(lock: Path, output: Path, fix: str) -> Reservation:
    """Reserve ``output`` for this command through the lock file ``lock``.

    Raises :class:`~mambaout_pl.errors.OutputInUseError` naming ``output``, the command holding the
    lock and ``fix`` (what the user can do) when another running command holds it, and
    :class:`~mambaout_pl.errors.OutputWriteError` naming ``output`` when the lock cannot be written.
    """
    if fcntl is None:
        return Reservation(lock, None)
    with naming_target(output):
        lock.parent.mkdir(parents=True, exist_ok=True)
        while True:
            descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(descriptor)
                os.close(descriptor)
                raise OutputInUseError(
                    f"'{output}' is reserved by another command that is running now: {describe_holder(holder)} "
                    f"(its reservation: '{lock}'). Wait for it to finish, or {fix}."
                ) from None
            if _is_same_file(descriptor, lock):
                break
            os.close(descriptor)  # the holder removed that file as we opened it: lock the new one
        previous = _read_holder(descriptor)
        if previous:
            warnings.warn(
                f"Took over the reservation '{lock}' of {describe_holder(previous)}, which is no longer running "
                "(it was killed or crashed); its outputs there may be incomplete.",
                StaleReservationWarning,
                stacklevel=2,
            )
        record = json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                "command": " ".join(sys.argv),
            }
        ).encode()
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, record, 0)
        os.fsync(descriptor)
    return Reservation(lock, descriptor)


def describe_holder(holder: dict[str, Any]) -> str:
    """``PID 123 on host, started ...: `command` `` from a lock file's record."""
    if not holder:
        return "a command whose details are not written yet"
    return (
        f"PID {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}: "
        f"`{holder.get('command', '?')}`"
    )


def _read_holder(descriptor: int) -> dict[str, Any]:
    try:
        record = json.loads(os.pread(descriptor, 65536, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _is_same_file(descriptor: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(descriptor), os.stat(path))
    except FileNotFoundError:
        return False
