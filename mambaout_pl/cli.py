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
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
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
        return super().instantiate_trainer(callbacks=callbacks, plugins=plugins, **kwargs)

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
