"""An exponential moving average of the weights: Lightning's ``EMAWeightAveraging``, for tasks.

Tasks define ``configure_model`` (to shard under ``ModelParallelStrategy``, where they refuse EMA),
so Lightning's callback would warn on every run that it cannot average sharded layers; this one
does not. Its checkpoint entry is Lightning's (same class name, same state).
"""

from __future__ import annotations

import warnings

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import EMAWeightAveraging as LightningEMAWeightAveraging

__all__ = ["EMAWeightAveraging"]


class EMAWeightAveraging(LightningEMAWeightAveraging):
    """Lightning's ``EMAWeightAveraging``, without its warning about ``configure_model``."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="You're using the WeightAveraging callback with a model that")
            super().setup(trainer, pl_module, stage)
