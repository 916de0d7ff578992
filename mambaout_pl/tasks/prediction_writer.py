"""The base of the tasks' prediction writers: where they write, their folder reserved while they run, one call per batch."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from mambaout_pl.errors import OutputExistsError, OutputWriteError
from mambaout_pl.training.reservation import Reservation, reserve_outputs
from mambaout_pl.training.run_folders import prediction_folder

#: The lock file in a predictions folder while a command writes there (see :mod:`mambaout_pl.training.reservation`).
RESERVATION_NAME = ".predict.lock"


class PredictionWriter(BasePredictionWriter):
    """Write what ``trainer.predict`` returns, batch by batch, under ``output_dir`` (``None``:
    ``<trainer.log_dir>/predict``, the run's version folder, see
    :func:`~mambaout_pl.training.run_folders.prediction_folder`).

    A task's writer implements :meth:`write_batch`, and Lightning's ``on_predict_start`` /
    ``on_predict_end`` (or the epoch hooks) to open and close what it writes. When ``predict`` starts,
    the folder is reserved for this command (``.predict.lock`` in it, removed at the end): a second
    command predicting into the same folder meanwhile refuses, naming :meth:`reserved_output` and the
    command holding it, instead of mixing its outputs with this one's.
    """

    def __init__(self, output_dir: str | Path | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = None if output_dir is None else Path(output_dir)
        self._reservation: Reservation | None = None

    def reserved_output(self, folder: Path) -> Path:
        """What the message of a refused second command names: the writer's main output in ``folder``."""
        return folder

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        folder = self.output_folder(trainer)
        refusal = None
        if trainer.is_global_zero:
            fix = "set `model.predict_dir` to another folder"
            try:
                self._reservation = reserve_outputs(folder / RESERVATION_NAME, self.reserved_output(folder), fix)
            except (OutputExistsError, OutputWriteError) as error:
                refusal = error
        refusal = trainer.strategy.broadcast(refusal, src=0)  # every process stops, not only the first
        if refusal is not None:
            raise refusal

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.release()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.release()

    def release(self) -> None:
        """Give the folder's reservation back (at the end of ``predict``, or when it fails)."""
        if self._reservation is not None:
            self._reservation.release()
            self._reservation = None

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
