"""Reading a run folder (``<default_root_dir>/lightning_logs/version_N``): what ``mambaout report`` shows, from files only.

A run folder written by ``mambaout fit`` holds ``metrics.csv`` (the scalars per epoch, see
:mod:`mambaout_pl.training.metrics_file`), ``config.yaml`` (the resolved config, with the
``checkpoint.monitor`` and ``checkpoint.mode`` the run followed), ``checkpoints/`` and
``val_pictures/epoch<E>-step<S>/`` (pictures of a few validation images per validation).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mambaout_pl.tasks.validation_pictures import PICTURES_FOLDER
from mambaout_pl.training.metrics_file import METRICS_FILE, best_row, last_row, read_metrics_file
from mambaout_pl.training.run_summary import CONFIG_FILE

__all__ = ["RunFolder", "RunFolderError", "per_class_scores", "read_run_folder"]

#: Per-class columns of ``metrics.csv``: ``val/IoU/<class>`` (segmentation), ``val/AP/<class>`` and the like.
PER_CLASS_COLUMN = re.compile(r"^(?P<stage>val|test)/(?P<score>[^/]+)/(?P<name>.+)$")
_PICTURES = re.compile(r"^epoch(?P<epoch>\d+)-step(?P<step>\d+)$")


class RunFolderError(FileNotFoundError):
    """A folder that is not a run folder ``mambaout report`` can read."""


@dataclass
class RunFolder:
    """What a run folder holds. ``rows`` are the metrics file's rows; ``best`` and ``last`` the rows with the
    best and the last ``monitor`` value (None without one)."""

    path: Path
    rows: list[dict[str, float]]
    config_text: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    monitor: str = "val/loss"
    mode: str = "min"
    checkpoints: list[Path] = field(default_factory=list)
    pictures: dict[tuple[int, int], list[Path]] = field(default_factory=dict)

    @property
    def best(self) -> Mapping[str, float] | None:
        return best_row(self.rows, self.monitor, self.mode)

    @property
    def last(self) -> Mapping[str, float] | None:
        return last_row(self.rows, self.monitor)

    def best_checkpoint(self) -> Path | None:
        """The checkpoint named after the best epoch and step (the ``best-epoch<E>-step<S>`` file), if kept."""
        best = self.best
        if best is None:
            return None
        tag = f"epoch{int(best['epoch']):03d}-step{int(best['step'])}"
        return next((path for path in self.checkpoints if path.name.startswith("best") and tag in path.name), None)

    def pictures_at(self, row: Mapping[str, float] | None) -> list[Path]:
        """The validation pictures saved at ``row``'s epoch and step ([] when none were)."""
        if row is None:
            return []
        return self.pictures.get((int(row["epoch"]), int(row["step"])), [])


def read_run_folder(path: str | os.PathLike) -> RunFolder:
    """Read the run folder ``path``; raise :class:`RunFolderError` naming what is missing and what to give instead."""
    folder = Path(path)
    metrics_file = folder / METRICS_FILE
    if not metrics_file.is_file():
        raise RunFolderError(run_folder_hint(folder))
    run = RunFolder(path=folder, rows=read_metrics_file(metrics_file))
    config_file = folder / CONFIG_FILE
    if config_file.is_file():
        run.config_text = config_file.read_text()
        run.config = yaml.safe_load(run.config_text) or {}
        checkpoint = run.config.get("checkpoint") or {}
        run.monitor = str(checkpoint.get("monitor") or run.monitor)
        run.mode = str(checkpoint.get("mode") or run.mode)
    checkpoints = folder / "checkpoints"
    if checkpoints.is_dir():
        run.checkpoints = sorted(checkpoints.iterdir())
    pictures = folder / PICTURES_FOLDER
    if pictures.is_dir():
        for epoch_folder in sorted(pictures.iterdir()):
            match = _PICTURES.match(epoch_folder.name)
            if match and epoch_folder.is_dir():
                files = sorted(epoch_folder.glob("*.png"), key=lambda file: (len(file.stem), file.stem))
                run.pictures[(int(match["epoch"]), int(match["step"]))] = files
    return run


def run_folder_hint(folder: Path) -> str:
    """Why ``folder`` is not a run folder, and which folders are."""
    if not folder.is_dir():
        return f"'{folder}' does not exist: give a run folder, e.g. runs/quickstart/lightning_logs/version_0."
    versions = sorted(str(file.parent) for file in folder.glob(f"**/{METRICS_FILE}"))
    if versions:
        listed = ", ".join(f"'{version}'" for version in versions[:5]) + (", ..." if len(versions) > 5 else "")
        return f"'{folder}' holds no {METRICS_FILE} itself; its run folders are {listed}: give one of them."
    return (
        f"'{folder}' holds no {METRICS_FILE}: it is not the folder of a run of `mambaout fit` (each run writes "
        "its scalars there, e.g. runs/quickstart/lightning_logs/version_0/metrics.csv)."
    )


def per_class_scores(row: Mapping[str, float] | None) -> dict[str, dict[str, float]]:
    """``{score: {class: value}}`` of ``row``'s per-class columns (``val/IoU/wall`` -> ``{"IoU": {"wall": ...}}``)."""
    scores: dict[str, dict[str, float]] = {}
    for column, value in (row or {}).items():
        match = PER_CLASS_COLUMN.match(column)
        if match:
            scores.setdefault(match["score"], {})[match["name"]] = value
    return scores
