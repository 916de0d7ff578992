"""Run folders a failed command leaves with nothing in them worth keeping, removed when it fails.

A command creates its run folder (``version_N``, or ``<run>/validate`` ...) before anything runs,
and the logger and the CLI write their first files there at once: an events file, ``hparams.yaml``,
``config.yaml``. A command that then fails on its data or a checkpoint leaves a folder that holds
only those, and every such failure adds one. :func:`remove_unused_run_folders` removes the folders
the failed command created itself (no other command writes into a folder another one created)
when they hold nothing else: a checkpoint, a metrics row, a picture or a prediction keeps a folder.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from mambaout_pl.training.metrics_file import METRICS_FILE

__all__ = ["is_unused_run_folder", "remove_unused_run_folders"]

#: Files a command writes into its run folder when it starts, before it has computed anything.
STARTING_FILES = ("hparams.yaml", "config.yaml")
EVENTS_FILE_PREFIX = "events.out.tfevents."


def is_unused_run_folder(folder: Path) -> bool:
    """True when ``folder`` holds nothing but the files a command writes as it starts (an events file of the
    logger, ``hparams.yaml``, ``config.yaml``, a ``metrics.csv`` without rows) and empty folders."""
    if not folder.is_dir() or folder.is_symlink():
        return False
    for path in folder.rglob("*"):
        if path.is_symlink():
            return False
        if path.is_dir():
            continue
        name = path.name
        if path.parent == folder and (name in STARTING_FILES or name.startswith(EVENTS_FILE_PREFIX)):
            continue
        if path.parent == folder and name == METRICS_FILE and _has_no_rows(path):
            continue
        return False
    return True


def remove_unused_run_folders(folders: Iterable[Path]) -> list[Path]:
    """Remove each of ``folders`` (folders the failing command created) that :func:`is_unused_run_folder`;
    returns those removed. A folder that cannot be removed is left as it is."""
    removed = []
    for folder in folders:
        if is_unused_run_folder(folder):
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                removed.append(folder)
    return removed


def _has_no_rows(path: Path) -> bool:
    try:
        with path.open() as file:
            lines = [line for line in file if line.strip()]
    except (OSError, UnicodeDecodeError):
        return False
    return len(lines) <= 1
