"""A comparison grid: arms x input sizes x seeds, one run folder each, every run's settings fixed before any runs.

An arm is an overlay file (``recipes/ablation/ssm_raster.yaml``, or ``NAME=FILE`` to name it) or a list
of model settings (``NAME:--model.KEY=VALUE --model.KEY=VALUE``). Each run's whole configuration (the
recipe, then the arm, then the overrides for every run, resolved by the CLI's own parser, with the
run's input size and seed set) is written to its folder as ``settings.yaml`` before it starts; the run
is ``mambaout fit --config settings.yaml`` and ``mambaout validate`` of its final weights.

Layout of the output folder::

    grid.json                        base recipe, arms, sizes, seeds, overrides and the base settings
    runs/<arm>/size<S>/seed<K>/
        settings.yaml                the run's configuration
        run.json                     arm, size, seed, task, metric, and what --match-macs changed
        costs.json                   parameters, GMACs, L/6D, measured img/s and peak memory (after fit)
        metrics.json                 the validated metrics of the final weights: the run is done
        failed.json                  the last attempt's error, stage and log
        log.txt                      the output of every attempt
        lightning_logs/, validate/   the fit's and the validation's own folders

Every file is written atomically, so a run's status (:func:`run_status`) is read from which files
exist. A grid given again into the same folder with other settings is refused, naming them.
"""

from __future__ import annotations

import copy
import importlib
import io
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mambaout_pl.compare.errors import ArmError, CompareError, GridMismatchError, SizeError, short_error
from mambaout_pl.training.atomic import atomic_write

__all__ = [
    "DONE",
    "FAILED",
    "INTERRUPTED",
    "PENDING",
    "Arm",
    "Grid",
    "Run",
    "plan_grid",
    "write_grid",
    "run_status",
    "resolve_settings",
    "size_settings",
    "settings_differences",
    "write_json",
]

GRID_FILE = "grid.json"
SETTINGS_FILE = "settings.yaml"
RUN_FILE = "run.json"
COSTS_FILE = "costs.json"
METRICS_FILE = "metrics.json"
FAILED_FILE = "failed.json"
LOG_FILE = "log.txt"

DONE, FAILED, INTERRUPTED, PENDING = "done", "failed", "interrupted", "pending"

#: Below this side a four-stage backbone (stride 32) has no last-stage token left.
SMALLEST_SIZE = 32
ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
#: Settings each run gets from the grid; an override for every run may not set them.
GRID_KEYS = ("seed_everything", "trainer.default_root_dir", "ckpt_path")
#: The settings a size sets, per task kind.
SIZE_KEYS = {
    "classification": ("data.image_size",),
    "segmentation": ("data.crop_size", "data.resize_scale", "model.slide_crop_size", "model.slide_stride"),
    "detection": ("model.min_size", "model.max_size", "data.min_size", "data.max_size"),
}


@dataclass(frozen=True)
class Arm:
    """One side of the comparison: an overlay file, or model settings given on the command line."""

    name: str
    overlay: Path | None = None
    settings: tuple[str, ...] = ()

    @classmethod
    def parse(cls, spec: str) -> Arm:
        """``FILE.yaml``, ``NAME=FILE.yaml`` or ``NAME:--model.KEY=VALUE --model.KEY=VALUE ...``."""
        name, colon, settings = spec.partition(":")
        if colon and ARM_NAME.fullmatch(name) and settings.strip().startswith("--"):
            return cls(name, settings=tuple(_split_settings(name, settings)))
        name, equals, path = spec.partition("=")
        if not (equals and ARM_NAME.fullmatch(name)):
            name, path = Path(spec).stem, spec
        overlay = Path(path)
        if overlay.suffix not in (".yaml", ".yml") or not overlay.is_file():
            raise ArmError(
                f"arm '{spec}': no overlay file '{overlay}'. Give an overlay YAML that exists (e.g. "
                "recipes/ablation/gated_conv.yaml, or NAME=FILE.yaml to name it) or model settings as "
                "'NAME:--model.KEY=VALUE ...'."
            )
        if not ARM_NAME.fullmatch(name):
            raise ArmError(
                f"arm '{spec}': '{name}' cannot name a run folder; name it with NAME=FILE.yaml (letters, digits, . _ + -)."
            )
        try:
            content = yaml.safe_load(overlay.read_text())
        except yaml.YAMLError as error:
            raise ArmError(f"arm '{name}': overlay '{overlay}' is not valid YAML ({error}).") from error
        if not isinstance(content, dict):
            raise ArmError(f"arm '{name}': overlay '{overlay}' must hold a mapping of settings (e.g. model: ...).")
        return cls(name, overlay=overlay)

    def describe(self) -> str:
        return str(self.overlay) if self.overlay is not None else " ".join(self.settings)


def _split_settings(name: str, text: str) -> Iterator[str]:
    for setting in re.split(r"\s+(?=--)", text.strip()):
        if not re.fullmatch(r"--model\.[\w.]+=.+", setting, flags=re.DOTALL):
            raise ArmError(
                f"arm '{name}': '{setting}' is not a --model.KEY=VALUE setting. An arm sets the model only; "
                "settings for every run go after '--' at the end of the command."
            )
        yield setting


@dataclass
class Run:
    """One (arm, size, seed) of a grid: its folder, its whole configuration and what the report needs of it."""

    arm: str
    size: int
    seed: int
    folder: Path
    settings: dict[str, Any]
    info: dict[str, Any]

    def label(self) -> str:
        return f"arm {self.arm}, size {self.size}, seed {self.seed}"


@dataclass
class Grid:
    """The planned grid: every run's folder and configuration, checked against what the output folder holds."""

    out: Path
    base: Path
    arms: list[Arm]
    sizes: list[int]
    seeds: list[int]
    overrides: list[str]
    task: str
    kind: str
    monitor: str
    mode: str
    base_settings: dict[str, Any]
    match_macs: str | None = None
    runs: list[Run] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """What ``grid.json`` holds: the command's inputs and the base settings every arm starts from."""
        return {
            "base": str(self.base),
            "task": self.task,
            "monitor": self.monitor,
            "mode": self.mode,
            "arms": {arm.name: arm.describe() for arm in self.arms},
            "sizes": self.sizes,
            "seeds": self.seeds,
            "overrides": self.overrides,
            "match_macs": self.match_macs,
            "base_settings": self.base_settings,
        }


def run_status(folder: Path) -> str:
    """``done`` (metrics written), ``failed`` (the last attempt's error written), ``interrupted`` (started,
    unfinished: it resumes from its ``last.ckpt``) or ``pending`` (never started)."""
    if (folder / METRICS_FILE).is_file():
        return DONE
    if (folder / FAILED_FILE).is_file():
        return FAILED
    if (folder / COSTS_FILE).is_file() or any(folder.glob("lightning_logs/version_*")):
        return INTERRUPTED
    return PENDING


def run_folder(out: Path, arm: str, size: int, seed: int) -> Path:
    return out / "runs" / arm / f"size{size}" / f"seed{seed}"


def plan_grid(
    base: Path,
    arms: Sequence[Arm],
    sizes: Sequence[int] | None,
    seeds: int,
    out: Path,
    overrides: Sequence[str] = (),
    match_macs: str | None = None,
) -> Grid:
    """Resolve every run's configuration and check it against the output folder; writes nothing.

    Raises :class:`ArmError`, :class:`SizeError` or :class:`CompareError` for an arm, size, seed count
    or override that cannot be run, and :class:`GridMismatchError` when ``out`` holds files that are not
    a grid, or runs of this grid made with other settings.
    """
    base, out = Path(base), Path(out)
    if not base.is_file():
        raise CompareError(f"--config '{base}': no such recipe file. Give the recipe every arm starts from.")
    if not arms:
        raise ArmError("--arms: give at least one arm (an overlay file or NAME:--model.KEY=VALUE settings).")
    names = [arm.name for arm in arms]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ArmError(f"--arms: two arms are named {', '.join(repeated)}; name them apart with NAME=FILE.yaml.")
    if match_macs is not None and match_macs not in names:
        raise ArmError(f"--match-macs '{match_macs}' is not one of the arms ({', '.join(names)}).")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise CompareError(f"--seeds {seeds!r}: give the number of seeds per arm and size, 1 or more (seeds 0..N-1).")
    previous = read_grid_record(out)

    base_settings = resolve_settings([base], overrides, f"--config {base}")
    task = base_settings["model"]["class_path"]
    task_class = _import(task)
    kind = task_kind(task_class)
    check_overrides(overrides, kind)
    sizes = check_sizes(sizes, base_settings, kind)
    grid = Grid(
        out=out,
        base=base,
        arms=list(arms),
        sizes=sizes,
        seeds=list(range(seeds)),
        overrides=list(overrides),
        task=task,
        kind=kind,
        monitor=task_class.monitor,
        mode=task_class.mode,
        base_settings=base_settings,
        match_macs=match_macs,
    )
    if previous is not None:
        check_same_grid(previous, grid)

    arm_settings = {}
    for arm in arms:
        configs = [base] if arm.overlay is None else [base, arm.overlay]
        settings = resolve_settings(configs, [*arm.settings, *overrides], f"arm '{arm.name}'")
        if settings["model"]["class_path"] != task:
            raise ArmError(
                f"arm '{arm.name}' changes the task to {settings['model']['class_path']} (the recipe's is {task}); "
                "an arm changes the network, not the task."
            )
        arm_settings[arm.name] = settings

    matches: dict[tuple[str, int], dict[str, Any]] = {}
    if match_macs is not None:
        from mambaout_pl.compare.matching import match_backbone_macs

        for size in sizes:
            reference = sized(arm_settings[match_macs], kind, size)
            for arm in arms:
                if arm.name != match_macs:
                    matches[arm.name, size] = match_backbone_macs(
                        sized(arm_settings[arm.name], kind, size), reference, kind, size, arm.name, match_macs
                    )

    mismatches = []
    for arm in arms:
        for size in sizes:
            for seed in grid.seeds:
                settings = sized(arm_settings[arm.name], kind, size)
                match = matches.get((arm.name, size))
                if match is not None:
                    settings["model"]["init_args"]["backbone_args"] = match["backbone_args"]
                settings["seed_everything"] = seed
                settings["trainer"].pop("default_root_dir", None)
                folder = run_folder(out, arm.name, size, seed)
                info = {
                    "arm": arm.name,
                    "arm_source": arm.describe(),
                    "size": size,
                    "seed": seed,
                    "task": task,
                    "kind": kind,
                    "monitor": grid.monitor,
                    "mode": grid.mode,
                    "matched": None if match is None else {k: v for k, v in match.items() if k != "backbone_args"},
                }
                run = Run(arm.name, size, seed, folder, settings, info)
                existing = folder / SETTINGS_FILE
                if existing.is_file():
                    differences = settings_differences(yaml.safe_load(existing.read_text()), settings)
                    if differences:
                        mismatches.append((run, differences))
                grid.runs.append(run)
    if mismatches:
        run, differences = mismatches[0]
        raise GridMismatchError(
            f"'{out}' holds {len(mismatches)} run(s) of this grid made with other settings, e.g. {run.label()} "
            f"('{run.folder}'): {'; '.join(differences[:4])}{' ...' if len(differences) > 4 else ''}. Results of "
            "different settings are never mixed: give another --out, or the settings that folder was run with."
        )
    return grid


def write_grid(grid: Grid) -> None:
    """Write ``grid.json`` (extended by any arms, sizes and seeds new to the folder) and each new run's files."""
    record = grid.record()
    previous = read_grid_record(grid.out)
    if previous is not None:
        record["arms"] = {**previous["arms"], **record["arms"]}
        record["sizes"] = sorted(set(previous["sizes"]) | set(record["sizes"]))
        record["seeds"] = sorted(set(previous["seeds"]) | set(record["seeds"]))
    write_json(grid.out / GRID_FILE, record)
    for run in grid.runs:
        if not (run.folder / SETTINGS_FILE).is_file():
            text = yaml.safe_dump(run.settings, sort_keys=False)
            atomic_write(run.folder / SETTINGS_FILE, lambda file, text=text: file.write(text.encode()))
            write_json(run.folder / RUN_FILE, run.info)


def write_json(path: Path, value: Any) -> None:
    """``value`` as indented JSON at ``path``, written atomically."""
    text = json.dumps(value, indent=2) + "\n"
    atomic_write(path, lambda file: file.write(text.encode()))


def read_grid_record(out: Path) -> dict[str, Any] | None:
    """The folder's ``grid.json``; None for a new or empty folder. Refuses a folder holding other files."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise GridMismatchError(f"--out '{out}' is a file; give a folder for the grid's runs and report.")
    path = out / GRID_FILE
    if not path.is_file():
        if any(out.iterdir()):
            raise GridMismatchError(
                f"--out '{out}' holds files but no {GRID_FILE}: it is not a comparison grid. Give a new or empty "
                "folder (or the folder of the grid to continue)."
            )
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise GridMismatchError(
            f"'{path}' is not valid JSON ({error}); it was not written by mambaout compare."
        ) from error


def check_same_grid(previous: Mapping[str, Any], grid: Grid) -> None:
    """Refuse a grid whose task, base settings or --match-macs differ from those the folder was made with."""
    differences = []
    if previous.get("match_macs") != grid.match_macs:
        differences.append(f"--match-macs: {previous.get('match_macs')} there, {grid.match_macs} now")
    differences += settings_differences(previous.get("base_settings", {}), grid.base_settings)
    if differences:
        raise GridMismatchError(
            f"'{grid.out}' holds a grid made with other settings (recipe '{previous.get('base')}', overrides "
            f"{previous.get('overrides')}): {'; '.join(differences[:4])}{' ...' if len(differences) > 4 else ''}. "
            "Results of different settings are never mixed: give another --out, or the settings of that grid."
        )


def settings_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key: OLD there, NEW now`` for every dotted key whose value differs."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    missing = object()
    differences = []
    for key in sorted(set(flat_old) | set(flat_new)):
        before, after = flat_old.get(key, missing), flat_new.get(key, missing)
        if before != after:
            shown = [("unset" if value is missing else json.dumps(value)) for value in (before, after)]
            differences.append(f"{key}: {shown[0]} there, {shown[1]} now")
    return differences


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        flat = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}


def resolve_settings(configs: Sequence[Path], arguments: Sequence[str], what: str) -> dict[str, Any]:
    """The whole configuration ``mambaout fit --config ... ARGUMENTS`` runs with, as the CLI's parser resolves it.

    Raises :class:`ArmError` naming ``what`` with the parser's message when it refuses them.
    """
    from mambaout_pl.cli import run_cli

    args = ["fit", *(f"--config={config}" for config in configs), *arguments, "--print_config"]
    printed, errors = io.StringIO(), io.StringIO()
    code: Any = 0
    with redirect_stdout(printed), redirect_stderr(errors):
        try:
            run_cli(args)
        except SystemExit as exit_:
            code = exit_.code
    if code not in (0, None):
        message = errors.getvalue()
        message = message[message.rfind("error:") + len("error:") :] if "error:" in message else message
        raise ArmError(f"{what}: the CLI refuses its settings: {short_error(message, 400)}")
    return yaml.safe_load(printed.getvalue())


def _import(class_path: str) -> type:
    module_name, _, class_name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)


def task_kind(task_class: type) -> str:
    """``classification``, ``segmentation`` or ``detection``: which settings an input size sets."""
    from mambaout_pl.tasks import ClassificationTask, ObjectDetectionTask, SegmentationTask

    for kind, base in (
        ("classification", ClassificationTask),
        ("segmentation", SegmentationTask),
        ("detection", ObjectDetectionTask),
    ):
        if issubclass(task_class, base):
            return kind
    raise CompareError(
        f"task {task_class.__name__}: compare knows the input size of classification, segmentation and detection "
        "tasks only (subclasses of ClassificationTask, SegmentationTask or ObjectDetectionTask)."
    )


def native_size(settings: Mapping[str, Any], kind: str) -> int:
    """The recipe's own input size: its image size, crop size or the detector's shorter side."""
    data, model = settings["data"]["init_args"], settings["model"]["init_args"]
    value = {"classification": data.get("image_size"), "segmentation": data.get("crop_size")}.get(
        kind, model.get("min_size")
    )
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def size_settings(settings: Mapping[str, Any], kind: str, size: int) -> dict[str, Any]:
    """The dotted settings that give a run the input size ``size``, scaled from the recipe's own.

    Classification: ``data.image_size``. Segmentation: ``data.crop_size``, with ``resize_scale`` (and,
    for sliding-window inference, the window and its stride) scaled alike. Detection: the
    detector's ``min_size`` (and the data module's, where it has one), ``max_size`` scaled alike.
    """
    data, model = settings["data"]["init_args"], settings["model"]["init_args"]
    own = native_size(settings, kind)

    def scaled(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [max(1, round(item * size / own)) for item in value]
        return None if value is None else max(1, round(value * size / own))

    if kind == "classification":
        return {"data.image_size": size}
    if kind == "segmentation":
        changes = {"data.crop_size": size, "data.resize_scale": scaled(data.get("resize_scale"))}
        if model.get("inference") == "slide":
            changes["model.slide_crop_size"] = [size, size]
            changes["model.slide_stride"] = scaled(model.get("slide_stride"))
        return changes
    changes = {"model.min_size": size, "model.max_size": scaled(model.get("max_size"))}
    for key in ("min_size", "max_size"):
        if data.get(key) is not None:
            changes[f"data.{key}"] = size if key == "min_size" else round(data[key] * size / data["min_size"])
    return changes


def sized(settings: Mapping[str, Any], kind: str, size: int) -> dict[str, Any]:
    """A copy of ``settings`` with the input size ``size`` (see :func:`size_settings`)."""
    result = copy.deepcopy(dict(settings))
    for key, value in size_settings(settings, kind, size).items():
        section, name = key.split(".")
        result[section]["init_args"][name] = value
    return result


def check_sizes(sizes: Sequence[int] | None, settings: Mapping[str, Any], kind: str) -> list[int]:
    """The sizes to run, each a whole number of pixels >= 32, none twice; default: the recipe's own."""
    if not sizes:
        return [native_size(settings, kind)]
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, int) or size < SMALLEST_SIZE:
            raise SizeError(
                f"--sizes: {size!r} is not an input size; give whole numbers of pixels of at least {SMALLEST_SIZE} "
                "(a four-stage backbone reduces its input 32 times), e.g. --sizes 64 128."
            )
    repeated = sorted({size for size in sizes if list(sizes).count(size) > 1})
    if repeated:
        raise SizeError(f"--sizes: {', '.join(map(str, repeated))} given twice; give each size once.")
    return sorted(sizes)


def override_keys(overrides: Sequence[str]) -> Iterator[tuple[str, str]]:
    """``(argument, dotted key)`` of each ``--key=value`` or ``--key value`` override, ``init_args`` left out."""
    for argument in overrides:
        if argument.startswith("--") and len(argument) > 2:
            key = argument[2:].split("=", 1)[0]
            yield argument, key.replace(".init_args.", ".").replace(".dict_kwargs.", ".")


def check_overrides(overrides: Sequence[str], kind: str) -> None:
    """Refuse an override for every run that sets what the grid sets per run (seed, root folder, input size)."""
    for argument, key in override_keys(overrides):
        if key in GRID_KEYS or key in SIZE_KEYS[kind]:
            what = "--sizes" if key in SIZE_KEYS[kind] else "the grid (per run)"
            raise CompareError(
                f"override '{argument}': {key} is set by {what}, so it cannot be given for every run; leave it out."
            )
