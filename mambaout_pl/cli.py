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

from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar, RichProgressBar
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from mambaout_pl.checkpointing import AtomicCheckpointIO, ModelCheckpoint, find_last_checkpoint
from mambaout_pl.preemption import PreemptionCheckpoint
from mambaout_pl.tasks import BaseTask


class MambaOutCLI(LightningCLI):
    """LightningCLI with checkpoints, LR monitoring, a rich progress bar and data-to-task links.

    Two checkpoint callbacks: ``checkpoint`` keeps the best epoch by ``val/top1`` (set ``monitor``
    for other tasks); ``latest_checkpoint`` keeps the latest epoch, linked as ``last.ckpt`` for
    ``--ckpt_path last``. ``preemption`` saves ``last.ckpt`` and stops on SIGTERM or SIGINT (see
    ``PreemptionCheckpoint``). Checkpoints are written atomically (``AtomicCheckpointIO``) unless
    the config brings its own checkpoint IO plugin. ``fit --ckpt_path last`` resumes from the
    newest ``last*.ckpt`` of any earlier run version under the same root folder.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/top1",
                "checkpoint.mode": "max",
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
        checkpoint = AtomicCheckpointIO().load_checkpoint(ckpt_path, map_location="cpu")
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if subcommand == "fit" or not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        try:
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)
        except SystemExit:
            sys.stderr.write(f"Parsing the model settings saved in {ckpt_path} failed.\n")
            raise

    def before_fit(self) -> None:
        """Resolve ``--ckpt_path last`` across run versions (Lightning only looks in the new, empty one)."""
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") != "last":
            return
        found = find_last_checkpoint(self.trainer)
        if found is not None:
            config["ckpt_path"] = str(found)
            rank_zero_info(f"Resuming from {found}.")


class OutputPathError(ValueError):
    """A folder from the config that the run would write to lies outside ``trainer.default_root_dir``."""


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
    "export": "mambaout_pl.hub:export_main",
    "push": "mambaout_pl.hub:push_main",
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
