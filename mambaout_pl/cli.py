"""The ``mambaout`` command (also installed as ``lightning``): LightningCLI over tasks and data modules.

mambaout fit --config recipes/quickstart.yaml
mambaout validate --config recipes/quickstart.yaml --ckpt_path runs/.../last.ckpt
mambaout fit --config recipes/imagenet_mambaout.yaml --print_config
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch.distributed as dist
import yaml
from jsonargparse import Namespace
from lightning.fabric.connector import _convert_precision_to_unified_args
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from mambaout_pl import __version__
from mambaout_pl.command_errors import (
    ConciseArgumentParser,
    ParserError,
    check_recipe_files,
    constructor_message,
    describe_parser_error,
    exit_with_error,
    user_error,
)
from mambaout_pl.errors import CheckpointMismatchError, CheckpointNotFoundError, SettingsError
from mambaout_pl.models import UntrustedNameError, resolve_trusted_class, untrusted_source
from mambaout_pl.tasks import BaseTask
from mambaout_pl.training.checkpoint_io import (
    AtomicCheckpointIO,
    ModelCheckpoint,
    describe_last_checkpoint_folders,
    find_last_checkpoint,
    read_checkpoint,
)
from mambaout_pl.training.metrics_file import MetricsFile
from mambaout_pl.training.preemption import PreemptionCheckpoint
from mambaout_pl.training.progress_bar import RunProgressBar
from mambaout_pl.training.resume import CHECKPOINT_KEY, saved_model_settings
from mambaout_pl.training.run_folders import (
    check_output_paths,
    checkpoint_run_folder,
    follow_checkpoint_run,
    reserve_log_versions,
)
from mambaout_pl.training.run_matching import RunConfigCallback, run_differences
from mambaout_pl.training.run_summary import RunSummary
from mambaout_pl.training.sharded_checkpoint import is_sharded_checkpoint, read_sharded_checkpoint_metadata
from mambaout_pl.training.unused_run_folders import remove_unused_run_folders

#: ``--ckpt_path`` values Lightning resolves itself (the trainer's own checkpoints, the model registry).
LIGHTNING_CHECKPOINT_NAMES = ("best", "last", "hpc", "registry")

#: ``checkpoint.monitor`` / ``checkpoint.mode`` value that stands for the task's ``monitor`` / ``mode``.
TASK_DEFAULT = "auto"

#: What ``mambaout --help`` says first.
DESCRIPTION = (
    "MambaOut and visual Mamba baselines: train, score and predict classification, segmentation and detection."
)

#: One sentence each for Lightning's subcommands in ``mambaout --help`` (Lightning's docstrings are cut mid-sentence).
SUBCOMMAND_HELP: dict[str, str] = {
    "fit": "Train a task on a data module, keeping checkpoints and metrics in a run folder.",
    "validate": "Score a checkpoint on the validation split once.",
    "test": "Score a checkpoint on the test split once.",
    "predict": "Write a checkpoint's predictions (classes, masks or detections) for a split or a folder of images.",
}


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
    newest ``last*.ckpt`` of the earlier runs under the same root folder that were started with the
    command's settings (see :mod:`mambaout_pl.training.run_matching`).

    A command given a checkpoint of a run under its root keeps to that run's folder: a resumed
    ``fit`` continues ``version_N``, and ``validate``, ``test`` and ``predict`` write into
    ``version_N/<command>`` (see :func:`~mambaout_pl.training.run_folders.follow_checkpoint_run`).
    """

    def setup_parser(
        self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]
    ) -> None:
        """Lightning's parser, with ``--version`` and one whole sentence per subcommand in its help."""
        main_kwargs.setdefault("description", DESCRIPTION)
        if Path(sys.argv[0]).name == "__main__.py":  # python -m mambaout_pl
            main_kwargs.setdefault("prog", "python -m mambaout_pl")
        for name, text in SUBCOMMAND_HELP.items():
            subparser_kwargs.setdefault(name, {}).setdefault("description", text)
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        self.parser.add_argument(
            "-V", "--version", action="version", version=version_text(), help="Print the versions and exit."
        )
        subcommands = self.parser._subcommands_action
        for choice in subcommands._choices_actions if subcommands is not None else ():
            choice.help = SUBCOMMAND_HELP.get(choice.dest, choice.help)

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
        """The Trainer, with a rich progress bar (without ``v_num``) unless the config turns progress bars off or brings its own.

        Every path it would write is checked to lie under ``trainer.default_root_dir``, and each
        TensorBoard or CSV logger gets a ``version_N`` folder of its own before anything is written
        (see :mod:`mambaout_pl.training.run_folders`), so runs started together never share one.
        :class:`MetricsFile` writes the run's scalars to ``metrics.csv`` in that folder, and
        :class:`RunSummary` prints its scores and next commands when ``fit`` ends.
        """
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_config = config.get("trainer") or {}
        callbacks = list(trainer_config.get("callbacks") or [])
        wants_bar = trainer_config.get("enable_progress_bar") is not False
        if wants_bar and not any(isinstance(callback, ProgressBar) for callback in callbacks):
            callbacks.append(RunProgressBar())
        for record in (MetricsFile, RunSummary):  # metrics.csv in the run folder; the summary at the end of fit
            if not any(isinstance(callback, record) for callback in callbacks):
                callbacks.append(record())
        plugins = trainer_config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            plugins.append(AtomicCheckpointIO())
        trainer = super().instantiate_trainer(callbacks=callbacks, plugins=plugins, **kwargs)
        lr_monitor = config.get("lr_monitor")
        if not trainer.loggers:  # the learning-rate monitor this CLI adds needs a logger to write to
            trainer.callbacks = [callback for callback in trainer.callbacks if callback is not lr_monitor]
        check_output_paths(trainer, self.model)
        record_precision(self.config.get(str(self.subcommand), self.config), trainer)
        self._last_checkpoint = self._resolve_last_checkpoint(trainer)
        ckpt_path = config.get("ckpt_path")
        ckpt_path = self._last_checkpoint if ckpt_path == "last" else ckpt_path
        # both removed if the command fails before using them
        self._created_run_folders = follow_checkpoint_run(trainer, str(self.subcommand), ckpt_path)
        self._created_run_folders += reserve_log_versions(trainer)
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        """Run ``subcommand``; when it fails, remove the run folders it created that hold only what every command
        writes as it starts (see :mod:`mambaout_pl.training.unused_run_folders`)."""
        failed = True
        try:
            super()._run_subcommand(subcommand)
            failed = False
        finally:
            if failed:
                remove_unused_run_folders(getattr(self, "_created_run_folders", ()))

    def _parse_ckpt_path(self) -> None:
        """Read ``--ckpt_path`` (a file, or a sharded checkpoint folder's ``meta.pt``) without unpickling objects,
        with errors that name the file.

        ``validate``, ``test`` and ``predict`` take the checkpoint's model settings, as Lightning
        does. ``fit`` does not (Lightning would silently replace the recipe's model settings by the
        checkpoint's): the task refuses a checkpoint whose settings differ from the recipe's.

        A checkpoint is data, not code: before the parser sees its settings, every class path in
        them must resolve through the registry's allow-list, unless the user's own config gives
        the same value; the task is then built with the checkpoint's model names resolved the
        same way (:func:`~mambaout_pl.models.untrusted_source`).
        """
        self._checkpoint_source: str | None = None
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and is_sharded_checkpoint(ckpt_path):
            checkpoint = read_sharded_checkpoint_metadata(ckpt_path)
        elif ckpt_path and Path(ckpt_path).is_file():
            checkpoint = read_checkpoint(ckpt_path)
        elif ckpt_path and ckpt_path not in LIGHTNING_CHECKPOINT_NAMES and not str(ckpt_path).startswith("registry:"):
            raise CheckpointNotFoundError(
                f"--ckpt_path '{ckpt_path}' does not exist. Give the path of a checkpoint file (e.g. "
                "<run>/checkpoints/last.ckpt) or folder, or `--ckpt_path last` to resume the newest run under "
                "trainer.default_root_dir."
            )
        else:
            return
        settings = saved_model_settings(checkpoint)
        if subcommand == "fit" or settings is None:
            return
        source = f"checkpoint '{ckpt_path}'"
        self._user_names = frozenset(config_strings(self.config[subcommand].get("model")))
        check_saved_class_paths(settings, self._user_names, source)
        check_checkpoint_task(checkpoint, self.config[subcommand], ckpt_path)
        self._checkpoint_source = source
        own_model = self.config[subcommand].get("model")
        own_model = None if own_model is None else own_model.clone()
        saved = settings.get("dict_kwargs", settings)
        saved_label_names = saved.get("label_names") if isinstance(saved, Mapping) else None
        try:
            self.config = self.parser.parse_object({subcommand: {"model": settings}}, self.config)
        except SystemExit:
            sys.stderr.write(f"Parsing the model settings saved in {ckpt_path} failed.\n")
            raise
        keep_output_settings(self.config[subcommand], own_model)
        if subcommand == "predict" and saved_label_names:
            take_checkpoint_classes(self.config[subcommand], saved_label_names)

    def instantiate_classes(self) -> None:
        """Build the task, data module and trainer; names that came from a checkpoint resolve as data.

        A value a constructor refuses raises :class:`~mambaout_pl.errors.SettingsError` with that
        constructor's own message (jsonargparse would wrap it in a dump of every setting).
        """
        source = getattr(self, "_checkpoint_source", None)
        try:
            if source is None:
                super().instantiate_classes()
                return
            with untrusted_source(source, user_names=self._user_names):
                super().instantiate_classes()
        except (ValueError, TypeError) as error:
            if user_error(error) is not None:
                raise
            raise SettingsError(constructor_message(error)) from error

    def before_instantiate_classes(self) -> None:
        """Give ``checkpoint.monitor`` / ``checkpoint.mode`` left at ``auto`` the task's values."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        follow_task_monitor(config)

    def _resolve_last_checkpoint(self, trainer: Trainer) -> Path | None:
        """For ``fit --ckpt_path last``: the newest ``last*.ckpt`` of the runs under the root whose saved config has
        this command's settings, or None (with a warning) when there is none; found before this run creates its folder.

        A ``last.ckpt`` link to a deleted checkpoint, or checkpoint folders without a ``last*.ckpt``,
        raise :class:`~mambaout_pl.errors.CheckpointError`. With no checkpoint at all (the first
        start of a job that is restarted with the same command), or only runs of other settings,
        the run starts from scratch with a warning naming the folders searched (a mistyped root
        folder shows there) or the settings that differ.
        """
        if self.subcommand != "fit" or self.config_init[self.subcommand].get("ckpt_path") != "last":
            return None
        current = yaml.safe_load(self._parser(self.subcommand).dump(self.config[self.subcommand], skip_none=False))
        differences: dict[Path, Any] = {}

        def same_settings(run: Path) -> bool:
            differences[run] = run_differences(run, current)
            return differences[run] == {}

        found = find_last_checkpoint(trainer, accept_run=same_settings)
        if found is not None:
            return found
        root = Path(trainer.default_root_dir).resolve()
        others = {
            run: found for run, found in differences.items() if found and any((run / "checkpoints").glob("last*.ckpt"))
        }
        if others:
            described = "; ".join(describe_differences(run, found) for run, found in sorted(others.items())[:3])
            rank_zero_warn(
                f"--ckpt_path last: no run under '{root}' was started with this command's settings, so none is "
                f"resumed and this run starts from scratch. The runs there with a last checkpoint differ ({{setting: "
                f"(theirs, this command's)}}): {described}. To continue one of them, run it with its own config "
                "(--config <run>/config.yaml) or give its checkpoint with --ckpt_path PATH."
            )
            return None
        state = "exists but holds no checkpoint" if root.is_dir() else "does not exist"
        rank_zero_warn(
            f"--ckpt_path last: no checkpoint to resume in {describe_last_checkpoint_folders(trainer)}, and "
            f"trainer.default_root_dir '{root}' {state}: this run starts from scratch. If you meant to continue "
            "an earlier run, give its root folder with --trainer.default_root_dir (or its checkpoint with "
            "--ckpt_path PATH)."
        )
        return None

    def before_fit(self) -> None:
        """Resolve ``--ckpt_path last`` across run versions (Lightning only looks in the new, empty one)."""
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") != "last":
            return
        found = getattr(self, "_last_checkpoint", None)
        config["ckpt_path"] = None if found is None else str(found)
        if found is None:
            return
        runs = [checkpoint_run_folder(found, logger) for logger in self.trainer.loggers]
        run = next((folder for folder in runs if folder is not None), None)
        where = f"the run in '{run}' (started with this command's settings)" if run is not None else f"'{found.parent}'"
        rank_zero_info(f"--ckpt_path last: resuming {where} from {found.name}.")


def describe_differences(run: Path, differences: Mapping[str, tuple[Any, Any]] | None, shown: int = 3) -> str:
    """``version_0: {'model.init_args.lr': (0.002, 0.001)}`` (the first ``shown`` settings), for messages."""
    if differences is None:
        return f"{run.name}: no readable config.yaml"
    items = dict(list(differences.items())[:shown])
    return f"{run.name}: {items}" + (f" and {len(differences) - shown} more" if len(differences) > shown else "")


def config_strings(value: Any) -> Iterator[str]:
    """Every string in a (parsed) config value, nested ones included."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from config_strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from config_strings(item)


def check_saved_class_paths(settings: Any, user_names: frozenset[str], source: str, top: bool = True) -> None:
    """Raise ``UntrustedNameError`` for a class path in a checkpoint's model settings that the allow-list
    refuses (the task class: a :class:`BaseTask`), unless ``user_names`` (the user's own config) gives it too."""
    if isinstance(settings, Mapping):
        for key, value in settings.items():
            if key in ("class_path", "_class_path") and isinstance(value, str) and value not in user_names:
                resolve_trusted_class(value, base=BaseTask if top else None, source=source)
            elif key in ("class_path", "_class_path") and not isinstance(value, str):
                raise UntrustedNameError(f"{key} = {value!r} in {source} is not a class path.")
            else:
                check_saved_class_paths(value, user_names, source, top=False)
    elif isinstance(settings, (list, tuple)):
        for item in settings:
            check_saved_class_paths(item, user_names, source, top=False)


def task_class_of(model: Any) -> type:
    """The task class a parsed ``model`` config names (the user's own, or a checkpoint's already checked
    by :func:`check_saved_class_paths`)."""
    module_name, _, class_name = str(model.get("class_path")).rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)


def check_checkpoint_task(checkpoint: Mapping[str, Any], config: Any, ckpt_path: str) -> None:
    """Raise :class:`CheckpointMismatchError` when ``validate``/``test``/``predict`` get a checkpoint of another
    task than the config's (its task class recorded when saved, already checked as trusted), rather than let
    the checkpoint's network meet the config's data."""
    recorded = (checkpoint.get(CHECKPOINT_KEY) or {}).get("task")
    model = config.get("model")
    if not isinstance(recorded, str) or model is None or model.get("class_path") is None:
        return
    own, theirs = task_class_of(model), task_class_of({"class_path": recorded})
    if issubclass(theirs, own) or issubclass(own, theirs):
        return
    recipes = ", ".join(f"'{path}'" for path in config.get("config") or []) or "the command line"
    run_config = Path(ckpt_path).parent.parent / "config.yaml"
    hint = f"its run's config (--config {run_config})" if run_config.is_file() else "the recipe that trained it"
    raise CheckpointMismatchError(
        f"'{ckpt_path}' is a checkpoint of {recorded}, but {recipes} sets up {model.get('class_path')}: a network "
        f"of another task, which this command cannot evaluate on that task's data. Give {hint}, or a checkpoint "
        f"of {model.get('class_path')}."
    )


def keep_output_settings(config: Any, own_model: Any) -> None:
    """Give the run's own values back to the task's ``output_settings`` (where and how it writes
    predictions), which the checkpoint's settings replaced: they describe this run, not the network."""
    model = config.get("model")
    own_arguments = own_model.get("init_args") if own_model is not None else None
    if model is None or own_arguments is None or task_class_of(model) is not task_class_of(own_model):
        return
    for name in getattr(task_class_of(model), "output_settings", ()):
        if name in own_arguments:
            model["init_args"][name] = own_arguments[name]


def take_checkpoint_classes(config: Any, label_names: list[str]) -> None:
    """``predict``: the data's class names are the checkpoint's ``label_names`` (the network predicts those;
    the images to predict may have no labels at all), unless the config names them itself."""
    data = config.get("data")
    data_arguments = data.get("init_args") if data is not None else None
    if data_arguments is not None and "label_names" in data_arguments and data_arguments["label_names"] is None:
        data_arguments["label_names"] = list(label_names)


def follow_task_monitor(config: Any) -> None:
    """Resolve ``auto`` in a parsed config's ``checkpoint.monitor`` and ``checkpoint.mode`` from the task class."""
    checkpoint = config.get("checkpoint")
    model = config.get("model")
    if checkpoint is None or model is None or TASK_DEFAULT not in (checkpoint.get("monitor"), checkpoint.get("mode")):
        return
    task_class = task_class_of(model)
    if checkpoint.get("monitor") == TASK_DEFAULT:
        checkpoint["monitor"] = task_class.monitor
    if checkpoint.get("mode") == TASK_DEFAULT:
        checkpoint["mode"] = task_class.mode if checkpoint["monitor"] == task_class.monitor else "min"


def record_precision(config: Any, trainer: Trainer) -> None:
    """Write the precision ``trainer`` runs at into the parsed ``config`` that the run saves as ``config.yaml``.

    Lightning runs ``16-mixed`` on CPU as ``bf16-mixed`` (with a warning); the saved config says so,
    so that repeating the run from it gives the same numbers.
    """
    trainer_config = config.get("trainer")
    requested = trainer_config.get("precision") if trainer_config is not None else None
    if requested is not None and _convert_precision_to_unified_args(requested) != trainer.precision:
        trainer_config["precision"] = trainer.precision


def run_cli(
    args: ArgsType = None, parser_class: type[LightningArgumentParser] = LightningArgumentParser
) -> MambaOutCLI:
    """Parse ``args`` (default: the command line), run the subcommand and return the CLI.

    ``parser_class``: :class:`~mambaout_pl.command_errors.ConciseArgumentParser` raises the parser's
    refusals instead of printing its usage (what ``main`` reports in one line).
    """
    return MambaOutCLI(
        BaseTask,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        parser_class=parser_class,
        save_config_callback=RunConfigCallback,
    )


#: Commands beside Lightning's fit/validate/test/predict: name -> "module:function(argv) -> int".
TOOL_COMMANDS: dict[str, str] = {
    "export": "mambaout_pl.export.hub:export_main",
    "push": "mambaout_pl.export.hub:push_main",
    "consolidate": "mambaout_pl.training.sharded_checkpoint:consolidate_main",
    "analyze": "mambaout_pl.analysis:analyze_main",
    "profile": "mambaout_pl.analysis:profile_main",
    "compare": "mambaout_pl.compare.command:compare_main",
    "report": "mambaout_pl.report.command:report_main",
    "demo": "mambaout_pl.demo.command:demo_main",
}
#: One line each for ``mambaout --help``.
TOOL_COMMAND_HELP: dict[str, str] = {
    "export": "Write a checkpoint's network as a Hub folder (timm format for classifiers) or for deployment.",
    "push": "Export a checkpoint and upload it to the Hugging Face Hub.",
    "consolidate": "Write a sharded checkpoint folder (ModelParallelStrategy) as one checkpoint file.",
    "analyze": "Tokens against 6 x channels per stage: the paper's long-sequence criterion.",
    "profile": "Parameters, GMACs and images per second of a model.",
    "compare": "Train a recipe under several arms, sizes and seeds; report the metric with intervals and costs.",
    "report": "Write report.html for a run folder: curves, best epoch, per-class scores, config, pictures.",
    "demo": "Serve a checkpoint or export as a Gradio page on localhost (top-5 classes, masks, boxes).",
}


def version_text() -> str:
    """``mambaout-pl X (torch Y, lightning Z, timm W)``."""
    import lightning
    import timm
    import torch

    return f"mambaout-pl {__version__} (torch {torch.__version__}, lightning {lightning.__version__}, timm {timm.__version__})"


def print_help(args: list[str] | None = None) -> int:
    """Lightning's help (fit, validate, test, predict), then the commands mambaout-pl adds; ``args`` None: the
    command line is ``--help`` and Lightning reads it itself."""
    try:
        run_cli(args if args is None else ["--help"])
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise
    print("\nmore subcommands (each with its own --help):")
    for name, text in TOOL_COMMAND_HELP.items():
        print(f"  {name:<12}{text}")
    return 0


def main(args: list[str] | None = None) -> int | None:
    """Entry point of ``mambaout``, ``lightning`` and ``python -m mambaout_pl``; ``args`` (default: the command
    line) as an argument list, from Python."""
    if args is None:  # a command: the user's modules in the working folder import as under `python -m`
        import_from_working_folder()
    argv = sys.argv[1:] if args is None else list(args)
    if argv in (["--version"], ["-V"]):
        print(version_text())
        return 0
    if argv in (["--help"], ["-h"]):
        return print_help(args)
    if not argv:
        print_help(["--help"])
        return 2  # a subcommand is required
    if argv and argv[0] in TOOL_COMMANDS:
        module_name, function_name = TOOL_COMMANDS[argv[0]].split(":")
        return getattr(importlib.import_module(module_name), function_name)(argv[1:])
    try:
        check_recipe_files(argv)
        run_cli(args, parser_class=ConciseArgumentParser)  # None: Lightning reads the command line itself
    except ParserError as error:  # a mistake in the command line or a recipe: one line, no usage dump
        exit_with_error(describe_parser_error(error, argv))
    except Exception as error:  # the user's data, files or settings: the message, no traceback
        cause = user_error(error)
        if cause is None:
            raise
        exit_with_error(str(cause))
    close_process_group()
    return None


def import_from_working_folder() -> None:
    """Let the class paths a user gives (``--model.class_path my_module.MyTask``, a recipe's) import modules of
    the working folder, as ``python -m mambaout_pl`` does: a console script starts with only its own folder on
    ``sys.path``.

    The folder goes last, so that a file in it never shadows an installed package, and not at all under
    ``python -P`` / ``PYTHONSAFEPATH``. Names read from checkpoints and exports still resolve only through the
    allow-list (:func:`~mambaout_pl.models.untrusted_source`), wherever their modules lie.
    """
    if getattr(sys.flags, "safe_path", False):
        return
    folder = os.getcwd()
    if not any(os.path.abspath(entry or os.curdir) == folder for entry in sys.path):
        sys.path.append(folder)


def close_process_group() -> None:
    """Destroy the process group a finished multi-process run created, while the interpreter is whole: left to
    the interpreter's exit, gloo's threads can abort the process ("terminate called without an active
    exception", exit status 134) after the run succeeded."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
