"""The errors mambaout-pl raises for mistakes a user can make, one class per concept.

This module imports nothing heavy, so that ``mambaout_pl.models`` (which never imports Lightning)
and the training code share the same classes.
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint or weight file that cannot be read."""


class UnsafeCheckpointError(CheckpointError):
    """A torch file that holds Python objects other than tensors and plain containers."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A ``--ckpt_path`` that names no file or checkpoint folder."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint whose task, weights or settings do not fit the model or run loading it."""


class SettingsError(ValueError):
    """A config value that the task, data module, trainer or a callback refused when built."""


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class OutputPathError(ValueError):
    """A path from the config that the run would write to lies outside ``trainer.default_root_dir``."""


class OutputExistsError(FileExistsError):
    """A file the run would write exists already (an earlier run's): it is never overwritten."""


class OutputInUseError(OutputExistsError):
    """A file or folder that another command running now has reserved for its outputs."""


class OutputWriteError(OSError):
    """A file or folder cannot be written at its target: no space, no permission, or a file where a folder should be."""


class ExportError(ValueError):
    """A checkpoint cannot be exported or published as asked."""


def first_sentence(error: BaseException) -> str:
    """The first sentence of ``error``'s message, for one-line messages (torch's reader errors run on)."""
    return str(error).split(". ")[0]
