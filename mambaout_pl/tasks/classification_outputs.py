"""What a classification task writes: one row per predicted image, its top-k classes, as CSV or JSON Lines."""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from mambaout_pl.tasks.prediction_writer import PredictionWriter
from mambaout_pl.training.atomic import naming_target, place_new_file, umask
from mambaout_pl.training.run_folders import check_new_output

#: Formats of the predictions file.
PREDICTION_FORMATS = ("csv", "jsonl")
#: Columns of the top-1 class; ranks 2..k follow as ``class_index_2, label_name_2, probability_2, ...``.
PREDICTION_COLUMNS = ("index", "file", "class_index", "label_name", "probability")


def prediction_columns(top_k: int) -> list[str]:
    """The CSV header for ``top_k`` classes per row."""
    columns = list(PREDICTION_COLUMNS)
    for rank in range(2, top_k + 1):
        columns += [f"class_index_{rank}", f"label_name_{rank}", f"probability_{rank}"]
    return columns


class ClassificationPredictionWriter(PredictionWriter):
    """Write ``trainer.predict``'s classes to ``predictions.csv`` or ``predictions.jsonl`` (``predictions-rank<r>.*``
    per process under DDP).

    One row per image, in prediction order: its row in the predict data (``index``), its file (empty
    when the data holds no path), then its ``top_k`` most probable classes, most probable first: class
    index, class name and probability. CSV puts the top class in ``class_index``, ``label_name`` and
    ``probability`` and the next ones in columns suffixed ``_2`` .. ``_k``; JSON Lines gives each of
    these keys a list of ``top_k`` values.

    ``output_dir`` ``None``: ``<trainer.log_dir>/predict``, the run's version folder. An existing
    predictions file is never overwritten (:class:`~mambaout_pl.errors.OutputExistsError`). Rows go to a
    hidden ``.predictions.csv.*.partial`` file beside it, which becomes the predictions file when predict
    ends and is removed when it fails.
    """

    def __init__(
        self,
        output_dir: str | Path | None = None,
        top_k: int = 5,
        file_format: str = "csv",
        label_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(output_dir)
        if file_format not in PREDICTION_FORMATS:
            raise ValueError(f"file_format={file_format!r} must be one of {PREDICTION_FORMATS}.")
        if top_k < 1:
            raise ValueError(f"top_k={top_k} must be at least 1.")
        self.top_k = top_k
        self.file_format = file_format
        self.label_names = None if label_names is None else list(label_names)
        self.file: Path | None = None  # the file this process writes, once predicting
        self._partial: Path | None = None  # the rows written so far, beside it until predict ends
        self._columns_top_k = top_k  # top_k, at most the network's class count
        self._written = 0

    def path(self, trainer: Trainer) -> Path:
        """The file this process writes (every process must call it: it asks for the run's folder)."""
        stem = "predictions" if trainer.world_size == 1 else f"predictions-rank{trainer.global_rank}"
        return self.output_folder(trainer) / f"{stem}.{self.file_format}"

    def reserved_output(self, folder: Path) -> Path:
        return folder / f"predictions.{self.file_format}"

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        num_classes = getattr(pl_module, "hparams", {}).get("num_classes")
        self._columns_top_k = min(self.top_k, num_classes) if num_classes else self.top_k
        self.file = self.path(trainer)
        check_new_output(self.file)
        with naming_target(self.file):
            self.file.parent.mkdir(parents=True, exist_ok=True)
            descriptor, partial = tempfile.mkstemp(
                prefix=f".{self.file.name}.", suffix=".partial", dir=self.file.parent
            )
            self._partial = Path(partial)
            with os.fdopen(descriptor, "w", newline="") as file:
                if self.file_format == "csv":
                    csv.writer(file).writerow(prediction_columns(self._columns_top_k))
        self._written = 0

    def write_batch(self, trainer: Trainer, prediction: Any, batch: Any, batch_indices: Sequence[int] | None) -> None:
        probabilities = prediction["probabilities"].float()
        top_k = min(self._columns_top_k, probabilities.shape[-1])
        scores, classes = torch.topk(probabilities, top_k, dim=-1)
        count = len(classes)
        indices = list(batch_indices) if batch_indices else range(self._written, self._written + count)
        files = (batch.get("file") if isinstance(batch, dict) else None) or [""] * count
        names = self.label_names
        with naming_target(self.file), self._partial.open("a", newline="") as file:
            writer = csv.writer(file) if self.file_format == "csv" else None
            for index, path, row_classes, row_scores in zip(
                indices, files, classes.tolist(), scores.tolist(), strict=True
            ):
                row_names = [names[label] if names else str(label) for label in row_classes]
                row_scores = [round(score, 6) for score in row_scores]
                if writer is None:
                    record = {
                        "index": int(index),
                        "file": path,
                        "class_index": row_classes,
                        "label_name": row_names,
                        "probability": row_scores,
                    }
                    file.write(json.dumps(record) + "\n")
                    continue
                row: list[Any] = [int(index), path]
                for label, name, score in zip(row_classes, row_names, row_scores, strict=True):
                    row += [label, name, f"{score:.6f}"]
                writer.writerow(row)
        self._written += count

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        with naming_target(self.file):
            os.chmod(self._partial, 0o666 & ~umask())
            place_new_file(self._partial, self.file)
        self._partial = None
        if trainer.world_size == 1:
            rank_zero_info(f"Predictions of {self._written} images written to {self.file}")
        else:
            rank_zero_info(
                f"Predictions written to {self.file.parent}/predictions-rank*.{self.file_format}, one per process"
            )

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self._partial is not None:  # no predictions file at all rather than a part of one
            self._partial.unlink(missing_ok=True)
            self._partial = None
        super().on_exception(trainer, pl_module, exception)
