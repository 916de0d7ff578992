"""Callbacks that put a training run where a test wants to inject a fault (imported by subprocess runs), and the
test doubles that stand where a fault cannot be made for real on a test machine (a full disk)."""

from __future__ import annotations

import errno
import io
import os
import time
from collections.abc import Callable
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer

from mambaout_pl.training import PreemptionCheckpoint


class WaitForSignal(Callback):
    """After batch ``batch`` of ``stage`` ("train", "validation" or "sanity") in epoch ``epoch``, write ``marker``
    and wait (up to ``timeout`` s) until ``PreemptionCheckpoint`` has received a signal."""

    def __init__(self, marker: str, epoch: int, batch: int, stage: str = "train", timeout: float = 120.0) -> None:
        self.marker = Path(marker)
        self.epoch = epoch
        self.batch = batch
        self.stage = stage
        self.timeout = timeout

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Armed once per run, on every rank alike: a run resumed after the signal finds the marker and never waits.
        self.armed = not self.marker.exists()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.stage == "train":
            self._wait(trainer, batch_idx)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self.stage == ("sanity" if trainer.sanity_checking else "validation"):
            self._wait(trainer, batch_idx)

    def _wait(self, trainer: Trainer, batch_idx: int) -> None:
        if trainer.current_epoch != self.epoch or batch_idx != self.batch or not self.armed:
            return
        self.armed = False
        (preemption,) = [cb for cb in trainer.callbacks if isinstance(cb, PreemptionCheckpoint)]
        self.marker.write_text(f"{trainer.global_step}\n")
        deadline = time.monotonic() + self.timeout
        while preemption.received is None and time.monotonic() < deadline:
            time.sleep(0.05)


class HoldPrediction(Callback):
    """Before the first predicted batch, write ``marker`` and wait (up to ``timeout`` s) until ``release`` exists:
    the command then holds its outputs' reservation while a test starts another one."""

    def __init__(self, marker: str, release: str, timeout: float = 120.0) -> None:
        self.marker = Path(marker)
        self.release = Path(release)
        self.timeout = timeout

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx != 0 or self.marker.exists():
            return
        self.marker.write_text("predicting\n")
        deadline = time.monotonic() + self.timeout
        while not self.release.exists() and time.monotonic() < deadline:
            time.sleep(0.05)


class FullDisk:
    """A disk that fills up, at the write boundary: files opened for binary writing with ``os.fdopen`` (how
    ``atomic_write`` writes every checkpoint) share :attr:`free` bytes (None: no limit). A write past them
    writes what still fits, and the next one fails with ENOSPC, as ``write(2)`` does on a full disk.

    A test double: a small tmpfs would fill for real, but mounting one needs privileges a test machine
    does not give. Install it with ``monkeypatch.setattr(os, "fdopen", DISK.fdopen(os.fdopen))``.
    """

    def __init__(self) -> None:
        self.free: int | None = None

    def fdopen(self, real: Callable[..., io.IOBase]) -> Callable[..., io.IOBase]:
        def fdopen(descriptor: int, mode: str = "r", *args, **kwargs) -> io.IOBase:
            if "b" in mode and ("w" in mode or "a" in mode):
                return io.BufferedWriter(_DiskFile(descriptor, mode, self))
            return real(descriptor, mode, *args, **kwargs)

        return fdopen


class _DiskFile(io.FileIO):
    def __init__(self, descriptor: int, mode: str, disk: FullDisk) -> None:
        super().__init__(descriptor, mode.replace("b", ""), closefd=True)
        self.disk = disk

    def write(self, data) -> int:
        if self.disk.free is None:
            return super().write(data)
        data = memoryview(data).cast("B")
        if self.disk.free == 0 and len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = super().write(data[: self.disk.free])
        self.disk.free -= written
        return written


#: The disk of the in-process tests that fill it (see :class:`FillDisk`).
DISK = FullDisk()


class FillDisk(Callback):
    """At the start of training epoch ``epoch``, leave ``free`` bytes on :data:`DISK`."""

    def __init__(self, epoch: int, free: int) -> None:
        self.epoch = epoch
        self.free = free

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            DISK.free = self.free


def pause_after_rename(fragment: str, marker: str, timeout: float = 120.0) -> None:
    """In this process, right after the first rename to a name containing ``fragment``, write ``marker`` and wait
    (up to ``timeout`` s): where a test kills the process (e.g. between the two renames of an export)."""
    rename = Path.rename

    def rename_then_pause(self: Path, target: str | os.PathLike) -> Path:
        moved = rename(self, target)
        if fragment in Path(target).name and not Path(marker).exists():
            Path(marker).write_text("renamed\n")
            time.sleep(timeout)
        return moved

    Path.rename = rename_then_pause
