"""Which earlier run a command continues: the one whose saved settings are the command's.

A run saves the settings it was started with as ``config.yaml`` in its folder (a resume with other
settings adds ``config-resume<K>.yaml``). ``fit --ckpt_path last`` resumes a run only when one of
these equals the command's settings, except :data:`IGNORED_SETTINGS`: the checkpoint to resume
itself, and settings that change how a run is shown or where it is found, not what it trains.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback

__all__ = [
    "IGNORED_SETTINGS",
    "RESUME_CONFIG",
    "RunConfigCallback",
    "differing_settings",
    "flat_settings",
    "run_configs",
    "run_differences",
]

#: Dotted settings that do not change training: they are not compared.
IGNORED_SETTINGS = frozenset(
    {
        "ckpt_path",
        "trainer.default_root_dir",
        "trainer.enable_progress_bar",
        "trainer.enable_model_summary",
    }
)
#: Name of the config a resume with other settings saves beside the run's ``config.yaml``.
RESUME_CONFIG = "config-resume{index}.yaml"


def flat_settings(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"trainer.max_epochs": 12, ...}``: the leaves of a nested config, lists kept whole."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flat_settings(value, f"{name}."))
        else:
            flat[name] = list(value) if isinstance(value, tuple) else value
    return flat


def differing_settings(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{dotted name: (saved, current)}`` for the settings other than :data:`IGNORED_SETTINGS` that differ."""
    theirs, ours = flat_settings(saved), flat_settings(current)
    return {
        name: (theirs.get(name), ours.get(name))
        for name in sorted(set(theirs) | set(ours))
        if name not in IGNORED_SETTINGS and theirs.get(name) != ours.get(name)
    }


def run_configs(run: Path) -> Iterator[Path]:
    """The configs a run saved: ``config.yaml``, then those of resumes with other settings."""
    if (run / "config.yaml").is_file():
        yield run / "config.yaml"
    yield from sorted(run.glob(RESUME_CONFIG.format(index="*")))


def run_differences(run: Path, current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]] | None:
    """The settings in which ``run`` differs from ``current``: ``{}`` when one of its configs matches, the
    differences from its ``config.yaml`` otherwise, None when it saved no config that can be read."""
    first = None
    for path in run_configs(run):
        try:
            saved = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            continue
        if not isinstance(saved, Mapping):
            continue
        differences = differing_settings(saved, current)
        if not differences:
            return {}
        first = differences if first is None else first
    return first


class RunConfigCallback(SaveConfigCallback):
    """Lightning's ``SaveConfigCallback``, for a command that continues an earlier run's folder.

    A resumed ``fit`` finds the run's ``config.yaml`` there: it saves nothing when one of the run's
    configs has its settings (see :func:`run_differences`), else its own as ``config-resume<K>.yaml``.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved or not self.save_to_log_dir or self.overwrite:
            return super().setup(trainer, pl_module, stage)
        folder = Path(trainer.log_dir)  # collective: every rank asks
        name: str | None = self.config_filename
        if trainer.is_global_zero and (folder / self.config_filename).is_file():
            current = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
            if run_differences(folder, current) == {}:
                name = None
            else:
                index = 1
                while (folder / RESUME_CONFIG.format(index=index)).exists():
                    index += 1
                name = RESUME_CONFIG.format(index=index)
        name = trainer.strategy.broadcast(name)
        if name is None:
            self.already_saved = True
            return None
        self.config_filename = name
        return super().setup(trainer, pl_module, stage)
