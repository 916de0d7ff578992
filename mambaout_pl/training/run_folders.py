"""Where a run writes: every output path under ``trainer.default_root_dir``, and a version folder of its own.

- :func:`check_output_paths` resolves the final paths a run would write (checkpoint folder and file
  name, logger folder, name, version and sub-folder, profiler folder and file, prediction writers'
  folders) and refuses any outside the root before anything is written.
- :func:`reserve_log_versions` creates the next ``version_N`` folder of each TensorBoard or CSV
  logger with one ``mkdir``, which fails for all but one process, so that runs started together in
  one root each get their own folder (Lightning only lists the folders that exist).
- :func:`prediction_folder` is where prediction writers write by default: the run's own version
  folder, beside its ``config.yaml``; :func:`check_new_output` refuses to overwrite an earlier file.
- :func:`local_run_folder` is the run's version folder as one process sees it, for code that runs on
  rank zero only (``trainer.log_dir`` is a collective call).
- :func:`follow_checkpoint_run` keeps a command given a checkpoint of a run in that run's folder: a
  resumed ``fit`` continues ``version_N`` itself; ``validate``, ``test`` and ``predict`` write into
  ``version_N/<command>`` (``<command>_1``, ``<command>_2`` ... when the run has one already).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from mambaout_pl.errors import OutputExistsError, OutputPathError
from mambaout_pl.training.atomic import naming_target

#: Attributes of a prediction writer that name the folder or file it writes to.
WRITER_PATH_ATTRIBUTES = ("output_dir", "dirpath", "output_path", "save_dir")
#: Commands that write into a folder of their own inside the run whose checkpoint they are given.
EVALUATION_COMMANDS = ("validate", "test", "predict")
VERSION_FOLDER = re.compile(r"version_\d+")


def check_output_paths(trainer: Trainer, model: Any = None) -> None:
    """Raise :class:`OutputPathError` naming the key and value of the first output path outside the root."""
    root = Path(trainer.default_root_dir).resolve()
    for key, value, path in output_paths(trainer, model):
        resolved = Path(os.path.expanduser(os.path.expandvars(str(path)))).resolve()
        if not resolved.is_relative_to(root):
            raise OutputPathError(
                f"{key} = '{value}' lies outside trainer.default_root_dir ('{root}'): the run would write to "
                f"'{resolved}', and a run writes only under its root folder. Give a path inside it (no '..' leading "
                "out of it, no absolute path elsewhere), or set --trainer.default_root_dir to a folder that contains it."
            )


def output_paths(trainer: Trainer, model: Any = None) -> Iterator[tuple[str, Any, Path]]:
    """``(key, value, final path)`` of every place the run's callbacks, loggers and profiler write."""
    root = Path(trainer.default_root_dir)
    loggers = [logger for logger in trainer.loggers if isinstance(logger, (TensorBoardLogger, CSVLogger))]
    for logger in loggers:
        yield from _logger_paths(logger)
    first_log_dir = _log_dir(loggers[0]) if loggers else None
    for callback in trainer.callbacks:
        name = type(callback).__name__
        if isinstance(callback, LightningModelCheckpoint):
            folder = Path(callback.dirpath) if callback.dirpath else None
            if folder is not None:
                yield f"{name}.dirpath", callback.dirpath, folder
            elif first_log_dir is not None:
                folder = first_log_dir / "checkpoints"
            else:
                folder = root / "checkpoints"
            if callback.filename:
                yield f"{name}.filename", callback.filename, folder / f"{callback.filename}.ckpt"
        if isinstance(callback, BasePredictionWriter):
            for attribute in WRITER_PATH_ATTRIBUTES:
                value = getattr(callback, attribute, None)
                if isinstance(value, (str, os.PathLike)):
                    yield f"{name}.{attribute}", value, Path(value)
    profiler = trainer.profiler
    dirpath = getattr(profiler, "dirpath", None)
    if dirpath:
        yield f"{type(profiler).__name__}.dirpath", dirpath, Path(dirpath)
    filename = getattr(profiler, "filename", None)
    if filename:
        folder = Path(dirpath) if dirpath else (first_log_dir or root)
        yield f"{type(profiler).__name__}.filename", filename, folder / filename
    predict_dir = (getattr(model, "hparams", None) or {}).get("predict_dir")
    if predict_dir:
        yield "model.predict_dir", predict_dir, Path(predict_dir)


def prediction_folder(trainer: Trainer, output_dir: str | os.PathLike | None) -> Path:
    """``output_dir``, else ``<trainer.log_dir>/predict``: the run's version folder (``default_root_dir``
    without a logger). Call it on every process: Lightning broadcasts ``log_dir`` from rank zero."""
    log_dir = trainer.log_dir  # collective: every rank asks
    if output_dir is not None:
        return Path(output_dir)
    folder = Path(log_dir or trainer.default_root_dir)
    return folder if is_command_folder(folder, "predict") else folder / "predict"


def local_run_folder(trainer: Trainer) -> Path:
    """``trainer.log_dir`` as this process sees it, without Lightning's broadcast (which every rank must join):
    for code that runs on rank zero only."""
    loggers = trainer.loggers
    if not loggers:
        return Path(trainer.default_root_dir)
    logger = loggers[0]
    folder = logger.log_dir if isinstance(logger, (TensorBoardLogger, CSVLogger)) else logger.save_dir
    return Path(folder or trainer.default_root_dir)


def check_new_output(path: Path, key: str = "model.predict_dir") -> None:
    """Raise :class:`OutputExistsError` if ``path`` exists: a run never overwrites an earlier run's file."""
    if path.exists() or path.is_symlink():
        raise OutputExistsError(
            f"'{path}' exists already (written by an earlier run?) and a run never overwrites a file. Move it "
            f"away, or set `{key}` to another folder (unset, each run writes into its own version folder)."
        )


def reserve_log_versions(trainer: Trainer) -> list[Path]:
    """Give each TensorBoard or CSV logger without a fixed ``version`` the next ``version_N`` folder, created here;
    returns the folders created.

    ``mkdir`` either creates the folder or fails because another process has; the next number is
    then tried. Other ranks of the same run follow rank zero (Lightning broadcasts its folder).
    """
    created: list[Path] = []
    if rank_zero_only.rank != 0:
        return created
    for logger in trainer.loggers:
        if not isinstance(logger, (TensorBoardLogger, CSVLogger)) or logger._version is not None:
            continue
        versions_root = Path(logger.root_dir)
        version = logger._get_next_version()
        with naming_target(versions_root / f"version_{version}"):
            versions_root.mkdir(parents=True, exist_ok=True)
            while True:
                try:
                    (versions_root / f"version_{version}").mkdir()
                    break
                except FileExistsError:
                    version += 1
        logger._version = version  # where Lightning's loggers keep the version they write to
        created.append(versions_root / f"version_{version}")
    return created


def checkpoint_run_folder(ckpt_path: str | os.PathLike | None, logger: Any) -> Path | None:
    """The ``version_N`` folder of ``logger`` (a TensorBoard or CSV logger) that holds ``ckpt_path`` in its
    ``checkpoints`` folder, or None for a checkpoint kept anywhere else."""
    if not ckpt_path or "://" in str(ckpt_path) or not isinstance(logger, (TensorBoardLogger, CSVLogger)):
        return None
    checkpoints = Path(ckpt_path).absolute().parent.resolve()
    run = checkpoints.parent
    if checkpoints.name != "checkpoints" or not VERSION_FOLDER.fullmatch(run.name):
        return None
    return run if run.parent == Path(logger.root_dir).resolve() else None


def follow_checkpoint_run(trainer: Trainer, command: str, ckpt_path: str | os.PathLike | None) -> list[Path]:
    """Point each TensorBoard or CSV logger without a fixed ``version`` at the run ``ckpt_path`` belongs to
    (see :func:`checkpoint_run_folder`); returns the folders created.

    ``fit`` (resuming) continues the run's own ``version_N``: the same TensorBoard run, the same
    ``metrics.csv``. ``validate``, ``test`` and ``predict`` get ``version_N/<command>``, or
    ``<command>_1``, ``<command>_2`` ... beside an earlier one, created with one ``mkdir`` each as
    :func:`reserve_log_versions` does. Loggers of other roots and checkpoints elsewhere are left as they are.
    """
    created: list[Path] = []
    for logger in trainer.loggers:
        if getattr(logger, "_version", 0) is not None:
            continue
        run = checkpoint_run_folder(ckpt_path, logger)
        if run is None:
            continue
        if command == "fit":
            logger._version = int(run.name.removeprefix("version_"))
            continue
        if command not in EVALUATION_COMMANDS:
            continue
        if rank_zero_only.rank != 0:  # other ranks follow rank zero's folder, which Lightning broadcasts
            logger._version = f"{run.name}/{command}"
            continue
        index = 0
        with naming_target(run / command):
            while True:
                name = command if index == 0 else f"{command}_{index}"
                try:
                    (run / name).mkdir()
                    break
                except FileExistsError:
                    index += 1
        logger._version = f"{run.name}/{name}"
        created.append(run / name)
    return created


def is_command_folder(folder: Path, command: str) -> bool:
    """True for ``version_N/<command>`` (or ``<command>_K``), the folder :func:`follow_checkpoint_run` gives a command."""
    return VERSION_FOLDER.fullmatch(folder.parent.name) is not None and (
        re.fullmatch(rf"{command}(_\d+)?", folder.name) is not None
    )


def _logger_paths(logger: TensorBoardLogger | CSVLogger) -> Iterator[tuple[str, Any, Path]]:
    name = type(logger).__name__
    yield f"{name}.save_dir", logger.save_dir, Path(logger.save_dir)
    yield f"{name}.name", logger.name, Path(logger.root_dir)
    version = logger._version
    if version is not None:
        yield f"{name}.version", version, Path(logger.root_dir) / _version_folder(version)
    sub_dir = getattr(logger, "sub_dir", None)
    if sub_dir is not None:
        yield f"{name}.sub_dir", sub_dir, Path(logger.root_dir) / _version_folder(version or 0) / str(sub_dir)


def _log_dir(logger: TensorBoardLogger | CSVLogger) -> Path:
    """The logger's run folder without asking the logger (which would pick a version by listing folders)."""
    return Path(logger.root_dir) / _version_folder(logger._version or 0)


def _version_folder(version: int | str) -> str:
    return version if isinstance(version, str) else f"version_{version}"
