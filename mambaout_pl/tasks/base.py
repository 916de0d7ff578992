"""BaseTask: the LightningModule every mambaout-pl task builds on."""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn
from torchmetrics import MeanMetric

from mambaout_pl.errors import CheckpointMismatchError, NonFiniteLossError
from mambaout_pl.tasks.arguments import check_optimizer, check_positive, check_scheduler
from mambaout_pl.tasks.export_spec import ExportSpec
from mambaout_pl.training.ema import EMAWeightAveraging
from mambaout_pl.training.nonfinite import NONFINITE_LOSS_MODES, NonFiniteLossMixin, check_nonfinite_loss_mode
from mambaout_pl.training.resume import (
    CHECKPOINT_KEY,
    RESUME_MAY_CHANGE,
    RNG_STATES_KEY,
    check_checkpoint_fits,
    differing_hyperparameters,
    mark_checkpoint,
    restore_checkpoint,
    rng_states,
    set_rng_states,
    task_name,
)
from mambaout_pl.training.sharding import (
    data_parallel_mesh,
    gather_for_evaluation,
    is_sharded,
    release_after_evaluation,
    shard_network,
)

__all__ = [
    "CHECKPOINT_KEY",
    "NONFINITE_LOSS_MODES",
    "RESUME_MAY_CHANGE",
    "RNG_STATES_KEY",
    "BaseTask",
    "CheckpointMismatchError",
    "NonFiniteLossError",
    "check_checkpoint_fits",
    "differing_hyperparameters",
    "rng_states",
    "set_rng_states",
    "task_name",
]


class BaseTask(NonFiniteLossMixin, LightningModule, ABC):
    """A task: a network, its losses and metrics, and the optimizer and schedule that train it.

    ``__init__`` saves every constructor argument (a subclass's and these) as a hyper-parameter,
    then calls :meth:`configure_models`, :meth:`configure_losses` and :meth:`configure_metrics` in
    that order. Subclasses take their own arguments, pass the ones below on with ``**kwargs``
    (re-declaring only those whose default they change) and override only the part they change.
    The network to optimize lives in ``self.model``.

    Under Lightning's ``ModelParallelStrategy`` (``--trainer.strategy ModelParallelStrategy``),
    :meth:`configure_model` shards ``self.model`` with PyTorch's FSDP2, block by block
    (:mod:`mambaout_pl.training.sharding`); under any other strategy the network is left whole.

    A task declares the logged value that picks its best checkpoint (``monitor``, ``mode``; the
    CLI's ``checkpoint`` callback follows them) and how it is exported (:meth:`export_spec`).
    Checkpoints record the task class, the last metrics and the random generators' states;
    loading one written by another task or for another network raises
    :class:`CheckpointMismatchError` naming the file and the differences.

    Args:
        optimizer: any ``timm.optim`` optimizer name.
        lr: peak learning rate.
        weight_decay: weight decay (none on norms and biases).
        betas: Adam betas.
        eps: Adam epsilon.
        layer_decay: layer-wise learning-rate decay (``None``: off).
        scheduler: any ``timm.scheduler`` schedule name, stepped per optimizer update.
        decay_milestones: epochs at whose end the ``multistep`` schedule multiplies the learning
            rate by 0.1 (``None``: timm's default).
        warmup_epochs: linear warm-up length in epochs (fractions allowed).
        warmup_steps: linear warm-up length in optimizer updates (``None``: use ``warmup_epochs``).
        warmup_lr: learning rate at the start of warm-up.
        min_lr: learning rate at the end of the decay.
        cooldown_epochs: epochs held at ``min_lr`` at the end of training.
        poly_power: power of the ``poly`` schedule (``None``: timm's default).
        ema_decay: decay of an exponential moving average of the weights used for validation and
            the final model (``None``: off).
        nonfinite_loss: on a NaN or infinite training loss, ``"raise"`` an error naming the step and
            the batch, or ``"skip"`` the batch (no weight changes; counted in ``train/skipped_batches``).
    """

    #: The logged value that decides which checkpoint is best, and in which direction.
    monitor: str = "val/loss"
    mode: str = "min"
    #: Constructor arguments that say where and how a run writes its predictions, not what the network
    #: is: a checkpoint's values never replace the run's own (``predict --ckpt_path``, a resumed ``fit``).
    output_settings: tuple[str, ...] = ()

    #: Methods other than ``forward`` by which the task runs ``self.model`` (a sharded network
    #: gathers its weights for them too).
    network_forward_methods: tuple[str, ...] = ()

    model: nn.Module

    def __init__(
        self,
        optimizer: str = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        layer_decay: float | None = None,
        scheduler: str = "cosine",
        decay_milestones: tuple[float, ...] | None = None,
        warmup_epochs: float = 0.0,
        warmup_steps: int | None = None,
        warmup_lr: float = 1e-6,
        min_lr: float = 1e-5,
        cooldown_epochs: int = 0,
        poly_power: float | None = None,
        ema_decay: float | None = None,
        nonfinite_loss: str = "raise",
    ) -> None:
        super().__init__()
        check_nonfinite_loss_mode(nonfinite_loss)
        check_optimizer(optimizer)
        check_scheduler(scheduler)
        check_positive("lr", lr)
        self.save_hyperparameters()
        # Lightning's `self.log(..., sync_dist=True)` averages an integer sample count over ranks
        # (2.6: rounded down), which is wrong when ranks evaluate different numbers of images.
        self.eval_losses = nn.ModuleDict({"val": MeanMetric(), "test": MeanMetric()})
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

    def setup(self, stage: str) -> None:
        """Refuse a ``fit`` that would train nothing; give the model summary an input of the training data's size."""
        if stage == "fit":
            check_trains(self.trainer)
            if self._example_input_array is None:
                data_hparams = getattr(getattr(self.trainer, "datamodule", None), "hparams", None)
                self.example_input_array = self.example_input(data_hparams or {})

    def example_input(self, data_hparams: Mapping[str, Any]) -> Any:
        """One input for ``forward`` of the size the data module's saved hyper-parameters give, on which
        Lightning's model summary counts the FLOPs; None when they do not say."""
        return None

    @property
    def example_input_array(self) -> Any:
        """:meth:`example_input` (or an input set here) in the weights' dtype: true half precision converts
        the weights before the model summary runs, not this input."""
        dtype = self.dtype
        return apply_to_collection(
            self._example_input_array,
            torch.Tensor,
            lambda tensor: tensor.to(dtype) if tensor.is_floating_point() else tensor,
        )

    @example_input_array.setter
    def example_input_array(self, example: Any) -> None:
        self._example_input_array = example

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (a device mesh is set), shard ``self.model`` with FSDP2 per block
        and head, at the Trainer's precision (batch norms made synchronised first with
        ``trainer.sync_batchnorm``); otherwise do nothing."""
        mesh = self.device_mesh
        if mesh is None or is_sharded(self.model):
            return
        check_shardable(self)
        trainer = self.trainer
        layer_sync = getattr(trainer.strategy, "_layer_sync", None)
        if layer_sync is not None and trainer.state.fn == TrainerFn.FITTING:
            # `trainer.sync_batchnorm`: ModelParallelStrategy (Lightning 2.6) does not apply it; DDPStrategy.setup does this.
            self.model = layer_sync.apply(self.model)
        shard_network(self.model, data_parallel_mesh(mesh), trainer.precision, self.network_forward_methods)

    def gather_sharded_weights(self) -> None:
        """A sharded network gathers its weights for a whole evaluation loop (processes may run different
        batch counts, so gathering per forward would hang)."""
        if is_sharded(self.model):
            gather_for_evaluation(self.model)

    def release_sharded_weights(self) -> None:
        """A sharded network frees the weights gathered for an evaluation loop."""
        if is_sharded(self.model):
            release_after_evaluation(self.model)

    def on_validation_start(self) -> None:
        self.gather_sharded_weights()

    def on_validation_end(self) -> None:
        self.release_sharded_weights()

    def on_test_start(self) -> None:
        self.gather_sharded_weights()

    def on_test_end(self) -> None:
        self.release_sharded_weights()

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
        if hparams.warmup_steps is not None:
            warmup_epochs = hparams.warmup_steps / updates_per_epoch
        schedule_args: dict[str, Any] = {}
        if hparams.poly_power is not None:
            schedule_args["decay_rate"] = hparams.poly_power
        if hparams.get("decay_milestones") is not None:
            schedule_args["decay_milestones"] = list(hparams.decay_milestones)
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
            **schedule_args,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _schedule_length(self) -> tuple[int, int]:
        """Optimizer updates per epoch and schedule length in epochs, from the Trainer's settings.

        The schedule spans ``max_epochs`` minus the cool-down; with a step budget
        (``max_epochs=-1``), the whole run counts as one epoch of ``max_steps`` updates.
        """
        trainer = self.trainer
        estimated = trainer.estimated_stepping_batches
        # Lightning's estimate for a loader without a length and no max_steps: max_steps (-1), or inf with max_epochs=-1.
        if trainer.max_steps == -1 and (math.isinf(estimated) or estimated < 0):
            raise ValueError(
                "The training data has no length (streamed data) and neither trainer.limit_train_batches nor "
                "trainer.max_steps is set, so the learning-rate schedule cannot know how long training lasts. "
                "Set trainer.limit_train_batches to the batches per epoch (examples / batch_size / devices) or "
                "trainer.max_steps to the total number of optimizer updates."
            )
        total_updates = max(1, int(estimated))
        max_epochs = trainer.max_epochs
        if max_epochs is None or max_epochs <= 0:
            return total_updates, 1
        updates_per_epoch = max(1, math.ceil(total_updates / max_epochs))
        epochs = max(1, max_epochs - self.hparams.cooldown_epochs)
        return updates_per_epoch, epochs

    def lr_scheduler_step(self, scheduler: Any, metric: Any = None) -> None:
        """Step timm schedulers once per optimizer update."""
        scheduler.step_update(num_updates=self.global_step)

    def on_predict_start(self) -> None:
        """Warn when nothing will write the predictions (``trainer.predict`` only returns them); a sharded
        network gathers its weights for the whole loop."""
        self.gather_sharded_weights()
        if not any(isinstance(callback, BasePredictionWriter) for callback in self.trainer.callbacks):
            rank_zero_warn(
                f"{type(self).__name__}: no prediction writer is set, so trainer.predict only returns the "
                "predictions (the `mambaout predict` command discards them). Return a "
                "lightning.pytorch.callbacks.BasePredictionWriter from the task's configure_callbacks, or add one "
                "to trainer.callbacks, to write them."
            )

    def on_predict_end(self) -> None:
        self.release_sharded_weights()

    def configure_callbacks(self) -> list[Callback]:
        """EMA of the weights, held by a callback so the averaged copy stays out of the module tree."""
        if self.hparams.ema_decay is None:
            return []
        return [EMAWeightAveraging(decay=self.hparams.ema_decay)]

    def export_spec(self, data_hparams: Mapping[str, Any] | None = None) -> ExportSpec:
        """How ``mambaout export`` writes this task's network (see :class:`~mambaout_pl.tasks.export_spec.ExportSpec`),
        given the saved hyper-parameters of the data module it was trained with."""
        raise NotImplementedError(f"{type(self).__name__} does not say how to export its network (export_spec).")

    def network_config(self) -> dict[str, Any]:
        """Deprecated: ``export_spec()``'s ``model_name`` and ``model_args``."""
        warnings.warn(
            f"{type(self).__name__}.network_config() is deprecated; use task.export_spec().model_name and .model_args.",
            FutureWarning,
            stacklevel=2,
        )
        spec = self.export_spec()
        return {"model_name": spec.model_name, "model_args": spec.model_args}

    def log_eval_loss(self, stage: str, loss: torch.Tensor, batch_size: int) -> None:
        """Log ``<stage>/loss``, the mean over every evaluated image of all ranks (weighted by ``batch_size``)."""
        metric = self.eval_losses[stage]
        metric.update(loss.detach().float(), weight=batch_size)
        self.log(f"{stage}/loss", metric, batch_size=batch_size)

    # -- checkpoints --------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Mark the checkpoint as a mambaout-pl task's, with the task class, the last metrics and the generators' states."""
        mark_checkpoint(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another task, network or (resuming ``fit``) settings, naming the file."""
        trainer = self._trainer
        where = f"Checkpoint '{trainer.ckpt_path}'" if trainer is not None and trainer.ckpt_path else "The checkpoint"
        resuming = trainer is not None and trainer.state.fn == TrainerFn.FITTING
        # ModelParallelStrategy loads the weights itself (strictly) and hands on the rest of the checkpoint.
        weights_loaded = is_sharded(self.model) and "state_dict" not in checkpoint
        restore_checkpoint(self, checkpoint, where, resuming, check_weights=not weights_loaded)

    @staticmethod
    def unpack_batch(batch: Any, input_key: str, target_key: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Inputs and targets from a dict batch (``{"image": ..., "label": ...}``) or a tuple batch."""
        if isinstance(batch, Mapping):
            return batch[input_key], batch.get(target_key)
        if isinstance(batch, (list, tuple)):
            return batch[0], batch[1] if len(batch) > 1 else None
        return batch, None


def image_batch(size: int | Sequence[int], channels: int = 3) -> torch.Tensor:
    """One zero image ``[1, channels, H, W]`` of side ``size`` (an int) or ``(H, W)``."""
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return torch.zeros(1, channels, int(height), int(width))


def check_shardable(task: BaseTask) -> None:
    """Raise if ``task`` cannot be sharded: EMA is on, or it has weights outside ``task.model``."""
    if task.hparams.get("ema_decay") is not None:
        raise ValueError(
            f"model.ema_decay={task.hparams.ema_decay} cannot be used with ModelParallelStrategy: Lightning's "
            "EMAWeightAveraging keeps a whole copy of the network beside the sharded one and cannot save or restore "
            "it in a sharded checkpoint. Unset model.ema_decay, or train with --trainer.strategy ddp."
        )
    outside = [name for name, param in task.named_parameters() if not name.startswith("model.")]
    if outside:
        raise ValueError(
            f"{type(task).__name__} has weights outside self.model ({', '.join(outside[:3])}"
            f"{', ...' if len(outside) > 3 else ''}), which ModelParallelStrategy would neither shard nor "
            "synchronise. Build them inside self.model in configure_models, or train with --trainer.strategy ddp."
        )


def check_trains(trainer: Any) -> None:
    """Raise if the Trainer's limits leave no optimizer update (Lightning would finish at once, exit status 0)."""
    if trainer.max_epochs == 0:
        raise ValueError(
            "trainer.max_epochs=0 trains nothing: set it to the number of epochs to train (or -1 with "
            "trainer.max_steps for a step budget); use `validate` to only evaluate."
        )
    if trainer.max_steps == 0:
        raise ValueError(
            "trainer.max_steps=0 trains nothing: set it to the number of optimizer updates, or -1 for no limit."
        )
