"""The ``mambaout`` command (also installed as ``lightning``): LightningCLI over tasks and data modules.

    mambaout fit --config recipes/quickstart.yaml
    mambaout validate --config recipes/quickstart.yaml --ckpt_path runs/.../last.ckpt
    mambaout fit --config recipes/imagenet_mambaout.yaml --print_config
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from lightning.fabric.connector import _convert_precision_to_unified_args
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar, RichProgressBar
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from mambaout_pl.errors import OutputPathError
from mambaout_pl.tasks import BaseTask
from mambaout_pl.training.checkpoint_io import AtomicCheckpointIO, ModelCheckpoint, find_last_checkpoint, read_checkpoint
from mambaout_pl.training.preemption import PreemptionCheckpoint
from mambaout_pl.training.resume import saved_model_settings

#: ``checkpoint.monitor`` / ``checkpoint.mode`` value that stands for the task's ``monitor`` / ``mode``.
TASK_DEFAULT = "auto"


class MambaOutCLI(LightningCLI):
    """LightningCLI with checkpoints, LR monitoring, a rich progress bar and data-to-task links.

    Two checkpoint callbacks: ``checkpoint`` keeps the best epoch by the task's ``monitor`` and
    ``mode`` (``auto``: e.g. ``val/top1`` for classification, ``val/mIoU`` for segmentation; an
    explicit ``checkpoint.monitor`` wins, and with it ``checkpoint.mode: auto`` means ``min`` unless
    it is the task's own value; ``--print_config`` shows ``auto``, the run's ``config.yaml`` the
    value used); ``latest_checkpoint`` keeps the latest epoch, linked as ``last.ckpt`` for
    ``--ckpt_path last``. ``preemption`` saves ``last.ckpt`` and stops on SIGTERM or SIGINT (see
    ``PreemptionCheckpoint``). Checkpoints are written atomically (``AtomicCheckpointIO``) unless
    the config brings its own checkpoint IO plugin. ``fit --ckpt_path last`` resumes from the
    newest ``last*.ckpt`` of any earlier run version under the same root folder.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": TASK_DEFAULT,
                "checkpoint.mode": TASK_DEFAULT,
                "checkpoint.filename": "best-epoch{epoch:03d}-step{step}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(ModelCheckpoint, "latest_checkpoint")
        parser.set_defaults(
            {
                "latest_checkpoint.monitor": None,
                "latest_checkpoint.save_top_k": 1,
                "latest_checkpoint.save_last": "link",
                "latest_checkpoint.filename": "epoch{epoch:03d}-step{step}",
                "latest_checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(PreemptionCheckpoint, "preemption")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.label_names", "model.init_args.label_names", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer, with a rich progress bar unless the config turns progress bars off or brings its own."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_config = config.get("trainer") or {}
        callbacks = list(trainer_config.get("callbacks") or [])
        wants_bar = trainer_config.get("enable_progress_bar") is not False
        if wants_bar and not any(isinstance(callback, ProgressBar) for callback in callbacks):
            callbacks.append(RichProgressBar())
        plugins = trainer_config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            plugins.append(AtomicCheckpointIO())
        trainer = super().instantiate_trainer(callbacks=callbacks, plugins=plugins, **kwargs)
        check_output_folders(trainer, self.model)
        record_precision(self.config.get(str(self.subcommand), self.config), trainer)
        return trainer

    def _parse_ckpt_path(self) -> None:
        """Read ``--ckpt_path`` without unpickling objects, with errors that name the file.

        ``validate``, ``test`` and ``predict`` take the checkpoint's model settings, as Lightning
        does. ``fit`` does not (Lightning would silently replace the recipe's model settings by the
        checkpoint's): the task refuses a checkpoint whose settings differ from the recipe's.
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        settings = saved_model_settings(read_checkpoint(ckpt_path))
        if subcommand == "fit" or settings is None:
            return
        try:
            self.config = self.parser.parse_object({subcommand: {"model": settings}}, self.config)
        except SystemExit:
            sys.stderr.write(f"Parsing the model settings saved in {ckpt_path} failed.\n")
            raise

    def before_instantiate_classes(self) -> None:
        """Give ``checkpoint.monitor`` / ``checkpoint.mode`` left at ``auto`` the task's values."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        follow_task_monitor(config)

    def before_fit(self) -> None:
        """Resolve ``--ckpt_path last`` across run versions (Lightning only looks in the new, empty one)."""
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") != "last":
            return
        found = find_last_checkpoint(self.trainer)
        if found is not None:
            config["ckpt_path"] = str(found)
            rank_zero_info(f"Resuming from {found}.")


def follow_task_monitor(config: Any) -> None:
    """Resolve ``auto`` in a parsed config's ``checkpoint.monitor`` and ``checkpoint.mode`` from the task class."""
    checkpoint = config.get("checkpoint")
    model = config.get("model")
    if checkpoint is None or model is None or TASK_DEFAULT not in (checkpoint.get("monitor"), checkpoint.get("mode")):
        return
    module_name, _, class_name = str(model.get("class_path")).rpartition(".")
    task_class = getattr(importlib.import_module(module_name), class_name)
    if checkpoint.get("monitor") == TASK_DEFAULT:
        checkpoint["monitor"] = task_class.monitor
    if checkpoint.get("mode") == TASK_DEFAULT:
        checkpoint["mode"] = task_class.mode if checkpoint["monitor"] == task_class.monitor else "min"


def check_output_folders(trainer: Trainer, model: Any) -> None:
    """Refuse checkpoint, log and prediction folders outside ``trainer.default_root_dir``.

    Everything a run writes stays under its root folder, so a config can neither scatter files nor
    overwrite files elsewhere; exports go where ``mambaout export`` is told.
    """
    root = Path(trainer.default_root_dir).resolve()
    folders: list[tuple[str, Any]] = []
    for callback in trainer.callbacks:
        if isinstance(callback, LightningModelCheckpoint) and callback.dirpath:
            folders.append((f"{type(callback).__name__}.dirpath", callback.dirpath))
    for logger in trainer.loggers:
        if isinstance(logger, (TensorBoardLogger, CSVLogger)):
            folders.append((f"{type(logger).__name__}.save_dir", logger.save_dir))
    predict_dir = (getattr(model, "hparams", None) or {}).get("predict_dir")
    if predict_dir:
        folders.append(("model.predict_dir", predict_dir))
    for key, folder in folders:
        if not Path(folder).resolve().is_relative_to(root):
            raise OutputPathError(
                f"{key} = '{folder}' lies outside trainer.default_root_dir ('{root}'), and a run writes only "
                "under its root folder. Give a folder inside it, or set --trainer.default_root_dir to a folder "
                "that contains it."
            )


def record_precision(config: Any, trainer: Trainer) -> None:
    """Write the precision ``trainer`` runs at into the parsed ``config`` that the run saves as ``config.yaml``.

    Lightning runs ``16-mixed`` on CPU as ``bf16-mixed`` (with a warning); the saved config says so,
    so that repeating the run from it gives the same numbers.
    """
    trainer_config = config.get("trainer")
    requested = trainer_config.get("precision") if trainer_config is not None else None
    if requested is not None and _convert_precision_to_unified_args(requested) != trainer.precision:
        trainer_config["precision"] = trainer.precision


def run_cli(args: ArgsType = None) -> MambaOutCLI:
    """Parse ``args`` (default: the command line), run the subcommand and return the CLI."""
    return MambaOutCLI(
        BaseTask,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
    )


#: Commands beside Lightning's fit/validate/test/predict: name -> "module:function(argv) -> int".
TOOL_COMMANDS: dict[str, str] = {
    "export": "mambaout_pl.export.hub:export_main",
    "push": "mambaout_pl.export.hub:push_main",
    "analyze": "mambaout_pl.analysis:analyze_main",
    "profile": "mambaout_pl.analysis:profile_main",
}


def main(args: list[str] | None = None) -> int | None:
    """Entry point of ``mambaout``, ``lightning`` and ``python -m mambaout_pl``."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in TOOL_COMMANDS:
        module_name, function_name = TOOL_COMMANDS[argv[0]].split(":")
        return getattr(importlib.import_module(module_name), function_name)(argv[1:])
    run_cli(args)  # None: Lightning reads the command line itself
    return None


if __name__ == "__main__":
    raise SystemExit(main())
