"""RunSummary: what a finished ``fit`` prints: its scores, where its files are, and the commands that come next.

::

    Run finished: runs/quickstart/lightning_logs/version_0
      val/top1 (max is best): best 0.9861 after epoch 10 (step 253), last 0.9833 after epoch 11 (step 276)
      best checkpoint:  runs/quickstart/lightning_logs/version_0/checkpoints/best-epoch010-step253.ckpt
      scalars per epoch: runs/quickstart/lightning_logs/version_0/metrics.csv
    Next:
      mambaout validate --config .../config.yaml --ckpt_path .../best-epoch010-step253.ckpt
      ...

Epochs are Lightning's, counted from 0 as in the checkpoint names. Paths under the working folder
are printed relative to it, so the commands run as printed from where ``fit`` ran.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint

from mambaout_pl.training.metrics_file import METRICS_FILE, best_row, last_row, read_metrics_file
from mambaout_pl.training.run_folders import local_run_folder

__all__ = ["RunSummary", "next_commands", "summary_text"]

CONFIG_FILE = "config.yaml"


class RunSummary(Callback):
    """At the end of ``fit``, print :func:`summary_text` on rank 0."""

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            print(summary_text(trainer), flush=True)


def summary_text(trainer: Trainer) -> str:
    """The summary of the run ``trainer`` just finished (see the module docstring)."""
    run_dir = local_run_folder(trainer)
    checkpoint = monitored_checkpoint(trainer)
    metrics_path = run_dir / METRICS_FILE
    rows = read_metrics_file(metrics_path) if metrics_path.is_file() else []
    lines = [f"Run finished: {shown(run_dir)}"]
    if checkpoint is not None and checkpoint.monitor:
        lines.append(f"  {score_line(rows, checkpoint)}")
    best_path = checkpoint.best_model_path if checkpoint is not None else ""
    last_path = latest_checkpoint_path(trainer)
    if best_path:
        lines.append(f"  best checkpoint:   {shown(best_path)}")
    if last_path and last_path != best_path:
        lines.append(f"  last checkpoint:   {shown(last_path)}")
    if rows:
        lines.append(f"  scalars per epoch: {shown(metrics_path)}")
    commands = next_commands(run_dir, best_path or last_path, getattr(trainer, "datamodule", None))
    if commands:
        lines += ["Next:", *(f"  {command}" for command in commands)]
    return "\n".join(lines)


def score_line(rows: list[Mapping[str, Any]], checkpoint: LightningModelCheckpoint) -> str:
    """``<monitor> (<mode> is best): best V after epoch E (step S), last V after epoch E (step S)``."""
    monitor, mode = checkpoint.monitor, checkpoint.mode
    best, last = best_row(rows, monitor, mode), last_row(rows, monitor)
    head = f"{monitor} ({mode} is best):"
    if best is None or last is None:
        score = checkpoint.best_model_score
        return f"{head} best {float(score):.4f}" if score is not None else f"{head} never logged"
    return f"{head} best {at_epoch(best, monitor)}, last {at_epoch(last, monitor)}"


def at_epoch(row: Mapping[str, Any], monitor: str) -> str:
    return f"{row[monitor]:.4f} after epoch {row['epoch']} (step {row['step']})"


def monitored_checkpoint(trainer: Trainer) -> LightningModelCheckpoint | None:
    """The first ``ModelCheckpoint`` that follows a metric (the CLI's ``checkpoint``), else the first one."""
    checkpoints = [callback for callback in trainer.callbacks if isinstance(callback, LightningModelCheckpoint)]
    return next((callback for callback in checkpoints if callback.monitor), checkpoints[0] if checkpoints else None)


def latest_checkpoint_path(trainer: Trainer) -> str:
    """The newest checkpoint any ``ModelCheckpoint`` kept (its ``last.ckpt`` where it keeps one)."""
    for callback in trainer.callbacks:
        if isinstance(callback, LightningModelCheckpoint) and callback.last_model_path:
            return callback.last_model_path
    return ""


def next_commands(run_dir: Path, checkpoint_path: str, datamodule: Any = None) -> list[str]:
    """``mambaout validate``, ``predict``, ``export``, ``demo`` and ``report`` lines for the run in ``run_dir``.

    ``validate`` and ``predict`` read the run's own ``config.yaml``; ``predict`` is given a split the
    data has (the validation split, else the training split) unless the config names what to predict.
    """
    commands = []
    config = run_dir / CONFIG_FILE
    if checkpoint_path and config.is_file():
        base = ["--config", shown(config), "--ckpt_path", shown(checkpoint_path)]
        commands.append(command_line("validate", *base))
        commands.append(command_line("predict", *base, *predict_arguments(datamodule)))
    if checkpoint_path:
        export_dir = run_dir / "export"
        commands.append(command_line("export", shown(checkpoint_path), shown(export_dir)))
        commands.append(command_line("demo", shown(export_dir)))
    commands.append(command_line("report", shown(run_dir)))
    return commands


def predict_arguments(datamodule: Any) -> list[str]:
    """``--data.predict_split S`` naming a split the data module has, unless its config says what to predict."""
    hparams = getattr(datamodule, "hparams", None)
    if hparams is None or hparams.get("predict_split") or hparams.get("predict_images"):
        return []
    try:
        splits = set(datamodule.open())  # opened (and cached) by `fit` already
    except Exception:  # a data module of another kind: no split to name
        return []
    for key in ("val_split", "test_split", "train_split"):
        split = hparams.get(key)
        if split and split in splits:
            return ["--data.predict_split", str(split)]
    return []


def command_line(subcommand: str, *arguments: str) -> str:
    return shlex.join(["mambaout", subcommand, *arguments])


def shown(path: str | os.PathLike) -> str:
    """``path`` relative to the working folder when it lies under it, else absolute."""
    resolved = Path(path).absolute()
    try:
        return str(resolved.relative_to(Path.cwd()))
    except ValueError:
        return str(resolved)
