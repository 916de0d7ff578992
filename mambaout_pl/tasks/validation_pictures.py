"""Pictures of a few validation images, sent to the loggers once per epoch (dense tasks)."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule


def log_pictures(module: LightningModule, tag: str, panels: list[torch.Tensor]) -> int:
    """Send ``panels`` to every logger that takes images (TensorBoard ``add_image``, W&B ``log_image``); return how many did."""
    logged = 0
    for logger in module.loggers:
        experiment = getattr(logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_image"):
            for index, panel in enumerate(panels):
                experiment.add_image(f"{tag}/{index}", panel, global_step=module.global_step, dataformats="CHW")
            logged += 1
        elif hasattr(logger, "log_image"):
            images = [panel.permute(1, 2, 0).numpy() for panel in panels]
            logger.log_image(key=tag, images=images, step=module.global_step)
            logged += 1
    return logged


class ValidationPictures:
    """Collects up to ``hparams.num_val_images`` pictures per validation epoch on rank 0 (never in the
    sanity check) and logs them as ``val/examples``; scores go through the task's ``_log_scores``."""

    _pictures: list[torch.Tensor]

    def _wants_pictures(self) -> bool:
        trainer = self._trainer
        if trainer is None or trainer.sanity_checking or not trainer.is_global_zero:
            return False
        return len(self._pictures) < self.hparams.num_val_images

    def on_validation_epoch_start(self) -> None:
        self._pictures = []

    def on_validation_epoch_end(self) -> None:
        self._log_scores("val", self.val_metrics)
        if self._pictures:
            log_pictures(self, "val/examples", self._pictures)
        self._pictures = []

    def on_test_epoch_end(self) -> None:
        self._log_scores("test", self.test_metrics)
