"""The progress bar ``mambaout`` commands show: Lightning's rich bar without the logger's version number."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar

__all__ = ["RunProgressBar"]


class RunProgressBar(RichProgressBar):
    """:class:`~lightning.pytorch.callbacks.RichProgressBar` showing the metrics logged with ``prog_bar=True``
    only: Lightning adds ``v_num``, the logger's version, which the run folder's name already gives."""

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
