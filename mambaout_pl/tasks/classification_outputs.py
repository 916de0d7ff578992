"""What a classification task writes: one CSV row per predicted image."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

#: Columns of the predictions file.
PREDICTION_COLUMNS = ("index", "file", "class_index", "label_name", "probability")


class ClassificationPredictionWriter(BasePredictionWriter):
    """Write ``trainer.predict``'s classes to ``output_dir/predictions.csv`` (``predictions-rank<r>.csv`` per process).

    One row per image, in prediction order: its row in the predict split, its file (empty when the
    data holds no path), the predicted class index and name, and that class's probability.
    """

    def __init__(self, output_dir: str | Path) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self._written = 0

    def path(self, trainer: Trainer) -> Path:
        """The CSV file this process writes."""
        name = "predictions.csv" if trainer.world_size == 1 else f"predictions-rank{trainer.global_rank}.csv"
        return self.output_dir / name

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with self.path(trainer).open("w", newline="") as file:
            csv.writer(file).writerow(PREDICTION_COLUMNS)
        self._written = 0

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        class_index = prediction["class_index"].tolist()
        probability = prediction["probabilities"].gather(1, prediction["class_index"][:, None])[:, 0].tolist()
        indices = list(batch_indices) if batch_indices else range(self._written, self._written + len(class_index))
        files = batch.get("file") if isinstance(batch, dict) else None
        with self.path(trainer).open("a", newline="") as file:
            writer = csv.writer(file)
            for position, (index, label, name, score) in enumerate(
                zip(indices, class_index, prediction["label_name"], probability, strict=True)
            ):
                writer.writerow([index, files[position] if files else "", label, name, f"{score:.6f}"])
        self._written += len(class_index)
