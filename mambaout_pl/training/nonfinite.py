"""What a task does with a training loss that is NaN or infinite: stop naming the batch, or skip it."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_warn

from mambaout_pl.errors import NonFiniteLossError

#: What a task does with a training loss that is NaN or infinite.
NONFINITE_LOSS_MODES = ("raise", "skip")


def check_nonfinite_loss_mode(mode: str) -> None:
    """Raise ``ValueError`` unless ``mode`` is one of :data:`NONFINITE_LOSS_MODES`."""
    if mode not in NONFINITE_LOSS_MODES:
        raise ValueError(f"nonfinite_loss={mode!r} is not one of {list(NONFINITE_LOSS_MODES)}.")


class NonFiniteLossMixin(LightningModule):
    """``loss_is_usable``, ``skipped_batch_loss`` and the gradient drop that skipping a batch needs.

    Reads the ``nonfinite_loss`` hyper-parameter (``"raise"`` or ``"skip"``). A training step does::

        if not self.loss_is_usable(loss, batch_idx):
            return self.skipped_batch_loss()
    """

    _skipping_batch: bool = False

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
