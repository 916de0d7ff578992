"""BaseTask: the LightningModule every mambaout-pl task builds on."""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from timm.optim import create_optimizer_v2
from torchmetrics import MeanMetric
from timm.scheduler import create_scheduler_v2
from torch import nn

from mambaout_pl import __version__

#: Key under which a task checkpoint records that mambaout-pl wrote it.
CHECKPOINT_KEY = "mambaout_pl"
#: Key under which a checkpoint keeps the random generators' states, for an exact resume.
RNG_STATES_KEY = "rng_states"
#: Hyper-parameters a resumed ``fit`` may change: where the first weights came from, and compilation.
RESUME_MAY_CHANGE = ("pretrained", "compile")
#: What a task does with a training loss that is NaN or infinite.
NONFINITE_LOSS_MODES = ("raise", "skip")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class CheckpointMismatchError(ValueError):
    """A checkpoint written by another task, or for another network, than the one loading it."""


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
    ``poly_power`` (the power of the ``poly`` schedule). ``nonfinite_loss`` (``"raise"`` or
    ``"skip"``) says what :meth:`loss_is_usable` does with a NaN or infinite training loss.

    Checkpoints record the task class, the last metrics and the random generators' states;
    loading one written by another task or for another network raises
    :class:`CheckpointMismatchError` naming the file and the differences.
    """

    #: The logged value that decides which checkpoint is best, and in which direction.
    monitor: str = "val/loss"
    mode: str = "min"

    model: nn.Module

    def __init__(self, ignore: Sequence[str] | str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=ignore)
        mode = self.hparams.get("nonfinite_loss", "raise")
        if mode not in NONFINITE_LOSS_MODES:
            raise ValueError(f"nonfinite_loss={mode!r} is not one of {list(NONFINITE_LOSS_MODES)}.")
        self._skipping_batch = False
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

    def log_eval_loss(self, stage: str, loss: torch.Tensor, batch_size: int) -> None:
        """Log ``<stage>/loss``, the mean over every evaluated image of all ranks (weighted by ``batch_size``)."""
        metric = self.eval_losses[stage]
        metric.update(loss.detach().float(), weight=batch_size)
        self.log(f"{stage}/loss", metric, batch_size=batch_size)

    # -- non-finite losses ---------------------------------------------------------------------

    def loss_is_usable(self, loss: torch.Tensor, batch_idx: int) -> bool:
        """True when ``loss`` is finite; else raise :class:`NonFiniteLossError` naming the step and
        the batch, or (``nonfinite_loss="skip"``) return False: the caller then returns
        :meth:`skipped_batch_loss` and the optimizer leaves the weights untouched.

        With several processes the ranks agree (one all-reduce), so that they all skip or all stop.
        """
        nonfinite = not bool(torch.isfinite(loss.detach()).all())
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            nonfinite = trainer.strategy.reduce_boolean_decision(nonfinite, all=False)
        if not nonfinite:
            return True
        epoch, step = (trainer.current_epoch, trainer.global_step) if trainer is not None else (0, 0)
        where = f"epoch {epoch}, global step {step}, batch {batch_idx} of the epoch"
        value = loss.detach().float().cpu().flatten()[:1].item()
        if self.hparams.get("nonfinite_loss", "raise") == "raise":
            raise NonFiniteLossError(
                f"The training loss is {value} at {where} (on this or another rank). Training on it would "
                "fill the weights with NaN. Lower `model.lr` or lengthen the warm-up, check the data of that "
                "batch, prefer `trainer.precision: 32-true` or `bf16-mixed` to `16-mixed`, or set "
                "`model.nonfinite_loss: skip` to skip such batches."
            )
        rank_zero_warn(f"Skipping the batch at {where}: the training loss is {value} (nonfinite_loss='skip').")
        self.skipped_batches += 1
        self.log("train/skipped_batches", float(self.skipped_batches), reduce_fx="max")
        return False

    @property
    def skipped_batches(self) -> int:
        """Training batches skipped for a non-finite loss since this task was built."""
        return getattr(self, "_skipped_batches", 0)

    @skipped_batches.setter
    def skipped_batches(self, value: int) -> None:
        self._skipped_batches = value

    def skipped_batch_loss(self) -> torch.Tensor:
        """A zero loss over every trainable weight: backward (and DDP's gradient all-reduce) runs as
        usual, then :meth:`on_after_backward` drops the gradients so that no weight changes."""
        self._skipping_batch = True
        parameters = [parameter for parameter in self.parameters() if parameter.requires_grad]
        return sum((parameter.sum() * 0.0 for parameter in parameters), torch.zeros((), device=self.device))

    def on_after_backward(self) -> None:
        if self._skipping_batch:
            for parameter in self.parameters():
                parameter.grad = None  # optimizers leave weights without gradients untouched
            self._skipping_batch = False

    # -- checkpoints --------------------------------------------------------------------------

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
        checkpoint[RNG_STATES_KEY] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another task or network (naming the file), then restore the generators."""
        trainer = self._trainer
        where = f"Checkpoint '{trainer.ckpt_path}'" if trainer is not None and trainer.ckpt_path else "The checkpoint"
        check_checkpoint_fits(self, checkpoint, where)
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            differing = differing_hyperparameters(checkpoint.get("hyper_parameters", {}), dict(self.hparams))
            for name in RESUME_MAY_CHANGE:
                differing.pop(name, None)
            if differing:
                raise CheckpointMismatchError(
                    f"{where} was written with other model settings than this run's ({{name: (checkpoint, now)}}): "
                    f"{differing}. Resume with the recipe that wrote it (its config.yaml is in that run's folder), "
                    "or start a new run from its weights: `mambaout export` it and set `model.pretrained`."
                )
            if RNG_STATES_KEY in checkpoint:
                set_rng_states(checkpoint[RNG_STATES_KEY])

    @staticmethod
    def unpack_batch(batch: Any, input_key: str, target_key: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Inputs and targets from a dict batch (``{"image": ..., "label": ...}``) or a tuple batch."""
        if isinstance(batch, Mapping):
            return batch[input_key], batch.get(target_key)
        if isinstance(batch, (list, tuple)):
            return batch[0], batch[1] if len(batch) > 1 else None
        return batch, None


# ---------------------------------------------------------------------------------------------
# checkpoint helpers


def task_name(task_class: type) -> str:
    return f"{task_class.__module__}.{task_class.__qualname__}"


def check_checkpoint_fits(task: BaseTask, checkpoint: Any, where: str) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``checkpoint`` holds ``task``'s weights."""
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        keys = sorted(checkpoint)[:10] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise CheckpointMismatchError(
            f"{where} has no 'state_dict' (it holds {keys}): it is not a checkpoint written by `fit`. "
            "Plain weight files go in `model.pretrained` instead of `--ckpt_path`."
        )
    recorded = (checkpoint.get(CHECKPOINT_KEY) or {}).get("task")
    mine = task_name(type(task))
    if recorded is not None and recorded != mine:
        raise CheckpointMismatchError(
            f"{where} was written by {recorded}, but this run's task is {mine}. Use a checkpoint of the same "
            "task, or set `model.class_path` to the task that wrote it."
        )
    theirs: Mapping[str, Any] = checkpoint["state_dict"]
    own = task.state_dict()
    missing = sorted(set(own) - set(theirs))
    unexpected = sorted(set(theirs) - set(own))
    shapes = [
        f"{key}: {tuple(theirs[key].shape)} in the checkpoint, {tuple(own[key].shape)} here"
        for key in sorted(set(own) & set(theirs))
        if hasattr(theirs[key], "shape") and tuple(theirs[key].shape) != tuple(own[key].shape)
    ]
    if not (missing or unexpected or shapes):
        return
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("different shapes", shapes)):
        if items:
            problems.append(f"{len(items)} {label} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})")
    differing = differing_hyperparameters(checkpoint.get("hyper_parameters", {}), dict(task.hparams))
    raise CheckpointMismatchError(
        f"{where} does not fit this run's network: {'; '.join(problems)}. "
        + (f"Model settings that differ from the checkpoint's: {differing}. " if differing else "")
        + "Resume with the recipe that wrote the checkpoint, or start a new run from its weights with "
        "`model.pretrained`."
    )


def differing_hyperparameters(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{name: (saved, current)}`` for the hyper-parameters whose values differ."""
    def normal(value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value

    names = (set(saved) | set(current)) - {"_instantiator", "_class_path"}
    return {
        name: (saved.get(name), current.get(name))
        for name in sorted(names)
        if not name.startswith("_") and normal(saved.get(name)) != normal(current.get(name))
    }


def rng_states() -> dict[str, Any]:
    """The states of ``random``, NumPy's and torch's (CPU and CUDA) global generators, as plain types and tensors."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian), "kind": str(kind)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_states` returned."""
    random.setstate(tuple(states["python"][:1]) + (tuple(states["python"][1]),) + tuple(states["python"][2:]))
    numpy_state = states["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
