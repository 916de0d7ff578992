"""The ``mambaout`` command (also installed as ``lightning``): LightningCLI over tasks and data modules.

    mambaout fit --config recipes/quickstart.yaml
    mambaout validate --config recipes/quickstart.yaml --ckpt_path runs/.../last.ckpt
    mambaout fit --config recipes/imagenet_mambaout.yaml --print_config
"""

from __future__ import annotations

import importlib
import sys

from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from mambaout_pl.tasks import BaseTask


class MambaOutCLI(LightningCLI):
    """LightningCLI with a best-checkpoint callback, LR monitoring and data-to-task links."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/top1",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "epoch{epoch:03d}-step{step}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.set_defaults({"trainer.callbacks": [{"class_path": "lightning.pytorch.callbacks.RichProgressBar"}]})
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.label_names", "model.init_args.label_names", apply_on="instantiate")


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
}


def main(args: list[str] | None = None) -> int | None:
    """Entry point of ``mambaout``, ``lightning`` and ``python -m mambaout_pl``."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in TOOL_COMMANDS:
        module_name, function_name = TOOL_COMMANDS[argv[0]].split(":")
        return getattr(importlib.import_module(module_name), function_name)(argv[1:])
    run_cli(argv)
    return None


if __name__ == "__main__":
    raise SystemExit(main())
