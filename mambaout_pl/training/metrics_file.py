"""MetricsFile: a run's scalars as a plain CSV file in its folder, one row per validation (and per epoch).

``<trainer.log_dir>/metrics.csv`` (the run's version folder, beside ``config.yaml``) gets a row
after every validation of ``fit`` (the sanity check excluded) and at the end of every training
epoch that ran no validation. Its columns:

- ``epoch`` (Lightning's, counted from 0 as in checkpoint names) and ``step`` (optimizer updates so far);
- ``train/loss``: the mean training loss of the batches since the previous row (rank 0's);
- ``lr``: the largest learning rate of the first optimizer's parameter groups;
- in rows written after a validation, every scalar the task logged other than its training values:
  ``val/loss``, ``val/top1``, ``val/IoU/<class>``, ... (``train/`` values and ``LearningRateMonitor``'s
  per-step rates go to the loggers only).

A value missing from a row is an empty cell. The file is rewritten whole and atomically after each
row; its rows are kept in checkpoints, so a resumed run's file holds the earlier epochs too.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from mambaout_pl.training.atomic import atomic_write
from mambaout_pl.training.run_folders import local_run_folder

__all__ = ["METRICS_FILE", "MetricsFile", "best_row", "last_row", "read_metrics_file"]

METRICS_FILE = "metrics.csv"
#: The columns every row starts with.
LEADING_COLUMNS = ("epoch", "step", "train/loss", "lr")


class MetricsFile(Callback):
    """Write ``<trainer.log_dir>/<filename>`` with one row of scalars per validation (see the module docstring).

    Args:
        filename: the file's name in the run folder.
    """

    def __init__(self, filename: str = METRICS_FILE) -> None:
        self.filename = filename
        self.rows: list[dict[str, float | int]] = []
        self._loss_sum = 0.0
        self._loss_count = 0
        self._path: Path | None = None

    @property
    def state_key(self) -> str:
        return f"{type(self).__name__}{{filename={self.filename!r}}}"

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == TrainerFn.FITTING:
            self._path = local_run_folder(trainer) / self.filename

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            return
        value = float(loss.detach().float().item())
        if pl_module.automatic_optimization:
            value *= trainer.accumulate_grad_batches  # Lightning hands on the loss divided by it
        if math.isfinite(value):
            self._loss_sum += value
            self._loss_count += 1

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._add_row(trainer, validated=True)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._loss_count:  # an epoch that ended without a validation after its last batches
            self._add_row(trainer, validated=False)

    def _add_row(self, trainer: Trainer, validated: bool) -> None:
        row: dict[str, float | int] = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        if self._loss_count:
            row["train/loss"] = self._loss_sum / self._loss_count
        learning_rate = largest_learning_rate(trainer)
        if learning_rate is not None:
            row["lr"] = learning_rate
        if validated:
            row.update(evaluation_scalars(trainer.callback_metrics))
        self._loss_sum, self._loss_count = 0.0, 0
        self.rows.append(row)
        if trainer.is_global_zero and self._path is not None:
            text = metrics_csv(self.rows)
            atomic_write(self._path, lambda file: file.write(text.encode()))

    def state_dict(self) -> dict[str, Any]:
        return {"rows": [dict(row) for row in self.rows], "loss_sum": self._loss_sum, "loss_count": self._loss_count}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = [dict(row) for row in state_dict.get("rows", [])]
        self._loss_sum = float(state_dict.get("loss_sum", 0.0))
        self._loss_count = int(state_dict.get("loss_count", 0))


def largest_learning_rate(trainer: Trainer) -> float | None:
    """The largest ``lr`` of the first optimizer's parameter groups (layer decay scales the others down)."""
    optimizers = trainer.optimizers
    if not optimizers:
        return None
    rates = [group["lr"] for group in optimizers[0].param_groups if "lr" in group]
    return float(max(rates)) if rates else None


def evaluation_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The one-number values of ``metrics`` (``trainer.callback_metrics``) other than the training ones and the
    per-step learning rates of Lightning's ``LearningRateMonitor`` (``lr-<optimizer>...``)."""
    scalars = {}
    for name, value in metrics.items():
        if name.startswith(("train/", "lr-")):
            continue
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            scalars[name] = float(value.detach().float().item())
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            scalars[name] = float(value)
    return scalars


def metrics_csv(rows: list[Mapping[str, float | int]]) -> str:
    """``rows`` as CSV text: the leading columns, then every other column in the order it first appears."""
    columns = [column for column in LEADING_COLUMNS if any(column in row for row in rows)]
    for row in rows:
        columns += [column for column in row if column not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({name: _cell(value) for name, value in row.items()})
    return buffer.getvalue()


def _cell(value: float | int) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))


def read_metrics_file(path: str | Path) -> list[dict[str, float]]:
    """The rows of a metrics file, each ``{column: value}`` without its empty cells (``epoch`` and ``step`` as ints)."""
    rows = []
    with open(path, newline="") as file:
        for row in csv.DictReader(file):
            values: dict[str, Any] = {}
            for name, cell in row.items():
                if name is None or cell in (None, ""):
                    continue
                values[name] = int(cell) if name in ("epoch", "step") else float(cell)
            rows.append(values)
    return rows


def best_row(rows: list[Mapping[str, Any]], monitor: str, mode: str) -> Mapping[str, Any] | None:
    """The first row with the best ``monitor`` value (``mode`` ``"max"`` or ``"min"``), or None without one."""
    scored = [row for row in rows if monitor in row and math.isfinite(row[monitor])]
    if not scored:
        return None
    choose = max if mode == "max" else min
    return choose(scored, key=lambda row: row[monitor])


def last_row(rows: list[Mapping[str, Any]], monitor: str) -> Mapping[str, Any] | None:
    """The last row holding ``monitor``, or None."""
    scored = [row for row in rows if monitor in row]
    return scored[-1] if scored else None
