"""Pictures of a few validation images, sent to the loggers and saved in the run folder once per epoch."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torchvision.transforms.v2.functional import to_pil_image

from mambaout_pl.training.atomic import atomic_write
from mambaout_pl.training.run_folders import local_run_folder

#: Folder of the run's validation pictures: ``<log_dir>/val_pictures/epoch<E>-step<S>/<index>.png``.
PICTURES_FOLDER = "val_pictures"
#: Pictures lower than this are enlarged (nearest, by a whole factor) before they are saved.
SAVED_MIN_HEIGHT = 192


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


def save_pictures(trainer: Trainer, panels: list[torch.Tensor]) -> Path:
    """Save ``panels`` (float ``[3, H, W]`` in [0, 1]) as ``<log_dir>/val_pictures/epoch<E>-step<S>/<index>.png``,
    small ones enlarged to at least :data:`SAVED_MIN_HEIGHT` pixels high; returns the folder."""
    folder = local_run_folder(trainer) / PICTURES_FOLDER / f"epoch{trainer.current_epoch:03d}-step{trainer.global_step}"
    for index, panel in enumerate(panels):
        panel = panel.detach().float().cpu().clamp(0.0, 1.0)
        factor = math.ceil(SAVED_MIN_HEIGHT / panel.shape[-2])
        if factor > 1:
            panel = F.interpolate(panel[None], scale_factor=factor, mode="nearest")[0]
        picture = to_pil_image(panel)
        atomic_write(folder / f"{index}.png", lambda file, picture=picture: picture.save(file, format="PNG"))
    return folder


class ValidationPictures:
    """Collects up to ``hparams.num_val_images`` pictures per validation epoch on rank 0 (never in the
    sanity check), logs them as ``val/examples`` and saves them (:func:`save_pictures`); scores go
    through the task's ``_log_scores``."""

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
            save_pictures(self.trainer, self._pictures)
        self._pictures = []

    def on_test_epoch_end(self) -> None:
        self._log_scores("test", self.test_metrics)
