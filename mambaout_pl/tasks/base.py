"""BaseTask: the LightningModule every mambaout-pl task builds on."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn

from mambaout_pl import __version__

#: Key under which a task checkpoint records that mambaout-pl wrote it.
CHECKPOINT_KEY = "mambaout_pl"


class BaseTask(LightningModule, ABC):
    """A task: a network, its losses and metrics, and the optimizer and schedule that train it.

    ``__init__`` saves every constructor argument as a hyper-parameter, then calls
    :meth:`configure_models`, :meth:`configure_losses` and :meth:`configure_metrics` in that
    order. Subclasses override only the part they change. The network to optimize lives in
    ``self.model``.

    Optimizer and schedule read these hyper-parameters: ``optimizer``, ``lr``, ``weight_decay``,
    ``betas``, ``eps``, ``layer_decay``, ``scheduler``, ``warmup_epochs``, ``warmup_lr``,
    ``min_lr``, ``cooldown_epochs``, ``ema_decay``, and where a task has them ``warmup_steps``
    (warm-up length in optimizer updates, used instead of ``warmup_epochs`` when set) and
    ``poly_power`` (the power of the ``poly`` schedule).
    """

    #: The logged value that decides which checkpoint is best, and in which direction.
    monitor: str = "val/loss"
    mode: str = "min"

    model: nn.Module

    def __init__(self, ignore: Sequence[str] | str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=ignore)
        self.configure_models()
        self.configure_losses()
        self.configure_metrics()

    @abstractmethod
    def configure_models(self) -> None:
        """Build ``self.model`` (and anything else with weights)."""

    def configure_losses(self) -> None:
        """Build the loss functions."""

    def configure_metrics(self) -> None:
        """Build the torchmetrics collections."""

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (or any timm optimizer) with per-update warm-up and decay from ``timm.scheduler``."""
        hparams = self.hparams
        optimizer = create_optimizer_v2(
            self.model,
            opt=hparams.optimizer,
            lr=hparams.lr,
            weight_decay=hparams.weight_decay,
            layer_decay=hparams.layer_decay,
            betas=tuple(hparams.betas),
            eps=hparams.eps,
        )
        updates_per_epoch, epochs = self._schedule_length()
        warmup_epochs = hparams.warmup_epochs
        if hparams.get("warmup_steps") is not None:
            warmup_epochs = hparams.warmup_steps / updates_per_epoch
        poly = {"decay_rate": hparams.poly_power} if hparams.get("poly_power") is not None else {}
        scheduler, _ = create_scheduler_v2(
            optimizer,
            sched=hparams.scheduler,
            num_epochs=epochs,
            warmup_epochs=warmup_epochs,
            warmup_lr=hparams.warmup_lr,
            min_lr=hparams.min_lr,
            cooldown_epochs=hparams.cooldown_epochs,
            step_on_epochs=False,
            updates_per_epoch=updates_per_epoch,
            **poly,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _schedule_length(self) -> tuple[int, int]:
        """Optimizer updates per epoch and schedule length in epochs, from the Trainer's settings.

        The schedule spans ``max_epochs`` minus the cool-down; with a step budget
        (``max_epochs=-1``), the whole run counts as one epoch of ``max_steps`` updates.
        """
        total_updates = max(1, int(self.trainer.estimated_stepping_batches))
        max_epochs = self.trainer.max_epochs
        if max_epochs is None or max_epochs <= 0:
            return total_updates, 1
        updates_per_epoch = max(1, math.ceil(total_updates / max_epochs))
        epochs = max(1, max_epochs - self.hparams.cooldown_epochs)
        return updates_per_epoch, epochs

    def lr_scheduler_step(self, scheduler: Any, metric: Any = None) -> None:
        """Step timm schedulers once per optimizer update."""
        scheduler.step_update(num_updates=self.global_step)

    def configure_callbacks(self) -> list[Callback]:
        """EMA of the weights, held by a callback so the averaged copy stays out of the module tree."""
        if self.hparams.get("ema_decay") is None:
            return []
        return [EMAWeightAveraging(decay=self.hparams.ema_decay)]

    def network_config(self) -> dict[str, Any]:
        """``{"model_name", "model_args"}`` such that ``create_model(model_name, **model_args)``
        rebuilds ``self.model`` (without weights); used to export and publish it."""
        raise NotImplementedError(f"{type(self).__name__} does not say how to rebuild its network for export.")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Mark the checkpoint as a mambaout-pl task's, with the task class and the last metrics."""
        task_class = type(self)
        metrics = {
            name: float(value)
            for name, value in self.trainer.callback_metrics.items()
            if name.startswith(("val/", "test/")) and value.numel() == 1
        } if self._trainer is not None else {}
        checkpoint[CHECKPOINT_KEY] = {
            "version": __version__,
            "task": f"{task_class.__module__}.{task_class.__qualname__}",
            "metrics": metrics,
        }

    @staticmethod
    def unpack_batch(batch: Any, input_key: str, target_key: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Inputs and targets from a dict batch (``{"image": ..., "label": ...}``) or a tuple batch."""
        if isinstance(batch, Mapping):
            return batch[input_key], batch.get(target_key)
        if isinstance(batch, (list, tuple)):
            return batch[0], batch[1] if len(batch) > 1 else None
        return batch, None
