"""PreemptionCheckpoint: save a resumable checkpoint when a cluster pre-empts ``fit`` (SIGTERM) or on Ctrl+C (SIGINT)."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mambaout_pl.training.atomic import atomic_symlink
from mambaout_pl.training.sharded_checkpoint import writes_checkpoint_folders

log = logging.getLogger(__name__)


class PreemptionCheckpoint(Checkpoint):
    """On one of ``signals`` during ``fit``: finish the batch, save ``last.ckpt``, exit with status 128 + signal.

    The signal is acted on at the next batch boundary or at the end of a validation pass, where
    the saved state (weights, optimizer, scheduler, EMA, loop progress, data order) continues
    exactly with ``fit --ckpt_path last``. A signal during the sanity check saves before the first
    step. Lightning's own SIGTERM handling is replaced from the sanity check to the end of
    training, because it stops in the middle of validation, and without a checkpoint. With several
    processes, every rank stops at the same batch (one all-reduce of a flag per batch), whichever
    ranks received the signal. A second SIGINT interrupts at once.

    The checkpoint goes to the folder of the first ``ModelCheckpoint`` that keeps a last
    checkpoint (else the first one, else ``<default_root_dir>/checkpoints``) as ``last.ckpt``. A
    strategy that writes checkpoint folders (``ModelParallelStrategy``) writes
    ``last-epochE-stepS.ckpt`` and links ``last.ckpt`` to it, so that nothing is written through
    the link to an earlier checkpoint.

    Args:
        signals: names of the signals that request a checkpoint and a stop.
    """

    def __init__(self, signals: Sequence[str] = ("SIGTERM", "SIGINT")) -> None:
        super().__init__()
        unknown = [name for name in signals if name not in signal.Signals.__members__]
        if unknown:
            raise ValueError(f"Unknown signal name(s) {unknown}; use names such as 'SIGTERM', 'SIGINT', 'SIGUSR1'.")
        self.signals = [signal.Signals[name] for name in signals]
        self.received: signal.Signals | None = None
        self.saved_path: str | None = None
        self._previous_handlers: dict[signal.Signals, Any] = {}

    # -- signal handling ----------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == TrainerFn.FITTING:
            self.received = None

    def on_sanity_check_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning registers its SIGTERM handler just before the sanity check: replace it now.
        self._install_handlers()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._install_handlers()
        if trainer.received_sigterm:  # caught by Lightning's handler, before ours was installed
            self.received = signal.SIGTERM
            trainer._signal_connector.received_sigterm = False  # else Lightning stops later, without a checkpoint
        if self.received is not None or trainer.world_size > 1:  # all ranks take part in the decision
            self._stop_if_requested(trainer)

    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread() or self._previous_handlers:
            return
        for signum in self.signals:
            self._previous_handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum)
        log.warning(f"Received {self.received.name}: saving a checkpoint after the current batch, then stopping.")

    def _restore_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers = {}

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    # -- stopping -----------------------------------------------------------------------------

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._stop_if_requested(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._stop_if_requested(trainer)

    def _stop_if_requested(self, trainer: Trainer) -> None:
        requested = self.received is not None
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if not requested:
            return
        received = self.received or signal.SIGTERM  # ranks that were not signalled themselves
        self.saved_path = self.save(trainer)
        rank_zero_info(
            f"Stopped by {received.name} at epoch {trainer.current_epoch}, global step {trainer.global_step}; "
            f"saved {self.saved_path}. Continue with `fit --ckpt_path last` (same recipe and root folder)."
        )
        raise SIGTERMException(128 + int(received))

    def save(self, trainer: Trainer) -> str:
        """Save the whole training state as the ``last`` checkpoint; returns its path.

        ``weights_only=False`` (Lightning's default, said out loud): the optimizer, schedulers, loops and
        callbacks are saved too, and Lightning does not log that it defaulted to it.
        """
        path = self.last_checkpoint_path(trainer)
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, LightningModelCheckpoint) and callback.save_last and callback.dirpath is not None:
                if Path(callback.dirpath) == Path(path).parent:
                    callback.last_model_path = path  # so that it keeps this name instead of writing last-v1.ckpt
        target = Path(path)
        if writes_checkpoint_folders(trainer.strategy) and (target.is_symlink() or not target.exists()):
            # A folder is written in place: through the `last.ckpt` link it would overwrite the checkpoint linked to.
            folder = target.with_name(
                f"{target.stem}-epoch{trainer.current_epoch:03d}-step{trainer.global_step}{target.suffix}"
            )
            trainer.save_checkpoint(folder, weights_only=False)
            if trainer.is_global_zero:
                atomic_symlink(folder, target)
            trainer.strategy.barrier()
        else:
            trainer.save_checkpoint(path, weights_only=False)
        return path

    @staticmethod
    def last_checkpoint_path(trainer: Trainer) -> str:
        """Where the ``last`` checkpoint of this run goes (see the class docstring)."""
        callbacks = [
            cb for cb in trainer.checkpoint_callbacks if isinstance(cb, LightningModelCheckpoint) and cb.dirpath
        ]
        keeping_last = [cb for cb in callbacks if cb.save_last]
        chosen = (keeping_last or callbacks or [None])[0]
        folder = Path(chosen.dirpath) if chosen is not None else Path(trainer.default_root_dir) / "checkpoints"
        return str(folder / f"{LightningModelCheckpoint.CHECKPOINT_NAME_LAST}{LightningModelCheckpoint.FILE_EXTENSION}")
