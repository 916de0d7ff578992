"""The base of the tasks' prediction writers: where they write, and one call per predicted batch."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from mambaout_pl.training.run_folders import prediction_folder


class PredictionWriter(BasePredictionWriter):
    """Write what ``trainer.predict`` returns, batch by batch, under ``output_dir`` (``None``:
    ``<trainer.log_dir>/predict``, the run's version folder, see
    :func:`~mambaout_pl.training.run_folders.prediction_folder`).

    A task's writer implements :meth:`write_batch`, and Lightning's ``on_predict_start`` /
    ``on_predict_end`` (or the epoch hooks) to open and close what it writes.
    """

    def __init__(self, output_dir: str | Path | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = None if output_dir is None else Path(output_dir)

    def output_folder(self, trainer: Trainer) -> Path:
        """The folder this run writes to (every process must call it: it asks for the run's folder)."""
        return prediction_folder(trainer, self.output_dir)

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.write_batch(trainer, prediction, batch, batch_indices)

    def write_batch(self, trainer: Trainer, prediction: Any, batch: Any, batch_indices: Sequence[int] | None) -> None:
        """Write one batch's ``prediction`` (what the task's ``predict_step`` returned for ``batch``, the rows
        ``batch_indices`` of the predict data when Lightning tracks them)."""
        raise NotImplementedError
