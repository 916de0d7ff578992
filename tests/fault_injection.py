"""Callbacks that put a training run where a test wants to inject a fault (imported by subprocess runs)."""

from __future__ import annotations

import time
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

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.stage == "train":
            self._wait(trainer, batch_idx)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self.stage == ("sanity" if trainer.sanity_checking else "validation"):
            self._wait(trainer, batch_idx)

    def _wait(self, trainer: Trainer, batch_idx: int) -> None:
        if trainer.current_epoch != self.epoch or batch_idx != self.batch or self.marker.exists():
            return
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
