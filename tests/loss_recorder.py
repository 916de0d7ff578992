"""A callback that writes what each rank trained on and what the run ended with (imported by subprocess runs)."""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer


class RecordLosses(Callback):
    """At the end of ``fit`` or ``validate``, write ``{folder}/rank{R}.json``: ``{"losses": {global step: training
    loss}, "metrics": the final callback metrics, "world_size": ...}``."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
        record = {"losses": self.losses, "metrics": metrics, "world_size": trainer.world_size}
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
