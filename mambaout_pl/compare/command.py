"""``mambaout compare``: one recipe under several arms, at several input sizes and seeds, into one report.

    mambaout compare --config recipes/quickstart_segmentation.yaml \\
        --arms recipes/ablation/gated_conv.yaml recipes/ablation/ssm_cross.yaml recipes/ablation/attention_full.yaml \\
        --sizes 48 96 --seeds 3 --out runs/compare/segmentation --jobs 2 -- --trainer.max_epochs=4
    mambaout compare --out runs/compare/segmentation --report      # the report of what has finished
    mambaout compare ... --launcher slurm --slurm timeout_min=120 gpus_per_node=1 slurm_partition=gpu

Each (arm, size, seed) is a ``fit`` and a ``validate`` of the CLI in its own folder under ``--out``;
the same command again skips finished runs and resumes interrupted ones from their ``last.ckpt``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from mambaout_pl.compare.errors import CompareError
from mambaout_pl.errors import OutputWriteError

__all__ = ["compare_main", "build_parser"]

EXIT_FAILED_RUNS = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mambaout compare",
        description="Train one recipe under several arms (token mixers, models) at several input sizes and seeds, "
        "each run through fit and validate in its own folder, and report the task's metric with seed intervals "
        "beside parameters, GMACs, img/s, peak memory and the first stage's L/6D. Settings for every run go "
        "after '--'.",
    )
    parser.add_argument("--config", type=Path, help="the recipe every arm starts from (e.g. recipes/quickstart.yaml)")
    parser.add_argument(
        "--arms",
        nargs="+",
        default=[],
        metavar="ARM",
        help="overlay files (recipes/ablation/*.yaml, recipes/baselines/*.yaml; NAME=FILE.yaml to name one) or "
        "model settings 'NAME:--model.KEY=VALUE --model.KEY=VALUE'",
    )
    parser.add_argument(
        "--sizes",
        nargs="+",
        type=int,
        metavar="S",
        help="input sizes in pixels: classification data.image_size; segmentation data.crop_size (resize_scale "
        "scaled alike); detection min_size (max_size scaled alike). Default: the recipe's own",
    )
    parser.add_argument("--seeds", type=int, default=1, help="seeds per arm and size, 0..N-1 (default 1)")
    parser.add_argument("--out", type=Path, required=True, help="the grid's folder: run folders, results and report")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once on this machine (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / jobs)")
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local")
    parser.add_argument(
        "--slurm",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="submitit parameters for --launcher slurm, e.g. timeout_min=120 gpus_per_node=1 slurm_partition=gpu "
        "slurm_array_parallelism=8",
    )
    parser.add_argument("--wait", action="store_true", help="--launcher slurm: wait for the jobs, then report")
    parser.add_argument(
        "--match-macs",
        metavar="ARM",
        default=None,
        help="change every other arm's backbone width (or depth) to within 5%% of ARM's backbone GMACs at each size",
    )
    parser.add_argument(
        "--reference", metavar="ARM", default=None, help="the arm differences are taken from (default: the first)"
    )
    parser.add_argument(
        "--metric",
        metavar="NAME[:min|max]",
        default=None,
        help="report another metric the runs' validate logged (e.g. val/loss), into report.<metric>.md and its "
        "companions; names holding 'loss' are lower-is-better unless :max is given (default: the task's monitor)",
    )
    parser.add_argument("--report", action="store_true", help="only write the report of what --out holds")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their status; run and write nothing")
    return parser


def _parameters(items: Sequence[str]) -> dict[str, Any]:
    parameters = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise CompareError(f"--slurm '{item}': give KEY=VALUE, e.g. timeout_min=120 or slurm_partition=gpu.")
        parameters[key] = yaml.safe_load(value)
    return parameters


def compare_main(argv: Sequence[str] | None = None) -> int:
    """Run the command; 0 when every run is done, 1 when some failed, 2 for a grid that cannot run as given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, overrides = argv[:split], argv[split + 1 :]
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args, overrides)
    except (CompareError, OutputWriteError) as error:
        print(f"mambaout compare: error: {error}", file=sys.stderr)
        return EXIT_USAGE


def _run(args: argparse.Namespace, overrides: list[str]) -> int:
    from mambaout_pl.compare.grid import DONE, FAILED, INTERRUPTED, Arm, plan_grid, run_status, write_grid
    from mambaout_pl.compare.report import parse_metric, write_report
    from mambaout_pl.compare.runner import run_local, submit_slurm

    metric = None if args.metric is None else parse_metric(args.metric)
    if args.report:
        if not (args.out / "grid.json").is_file():
            raise CompareError(f"--report: '{args.out}' holds no grid.json; give the --out of a grid.")
        return _print_report(write_report(args.out, reference=args.reference, metric=metric))
    if args.config is None:
        raise CompareError("--config: give the recipe every arm starts from (or --report to report a grid).")
    if args.launcher == "local" and args.jobs < 1:
        raise CompareError(f"--jobs {args.jobs}: give 1 or more runs at once.")
    parameters = _parameters(args.slurm)
    arms = [Arm.parse(spec) for spec in args.arms]
    if args.reference is not None and args.reference not in [arm.name for arm in arms]:
        raise CompareError(
            f"--reference '{args.reference}' is not one of the arms ({', '.join(a.name for a in arms)})."
        )
    grid = plan_grid(args.config, arms, args.sizes, args.seeds, args.out, overrides, args.match_macs)
    statuses = [run_status(run.folder) for run in grid.runs]
    counts = {status: statuses.count(status) for status in dict.fromkeys(statuses)}
    print(
        f"{len(grid.runs)} runs ({len(grid.arms)} arms x {len(grid.sizes)} sizes {grid.sizes} x {len(grid.seeds)} "
        f"seeds), {grid.kind}, metric {grid.monitor}: {', '.join(f'{n} {s}' for s, n in counts.items())}",
        flush=True,
    )
    if args.dry_run:
        for run, status in zip(grid.runs, statuses):
            print(f"  {status:<12}{run.label()}  {run.folder}")
        return 0
    write_grid(grid)
    folders = [run.folder for run in grid.runs]
    reference = args.reference or grid.arms[0].name
    if args.launcher == "slurm":
        jobs = submit_slurm(folders, grid.out, parameters, args.threads)
        print(f"submitted {len(jobs)} runs as a job array: {', '.join(str(job.job_id) for job in jobs) or 'none'}")
        if not args.wait:
            print(f"when they have finished: mambaout compare --out {grid.out} --report")
            return 0
        for job in jobs:
            job.result()
    else:
        run_local(folders, args.jobs, args.threads, report=lambda line: print(line, flush=True))
    final = [run_status(folder) for folder in folders]
    code = _print_report(write_report(grid.out, [arm.name for arm in grid.arms], reference))
    if metric is not None:
        code = max(code, _print_report(write_report(grid.out, [arm.name for arm in grid.arms], reference, metric)))
    if FAILED in final:
        print(f"{final.count(FAILED)} run(s) failed (see above and report.md); the same command retries them.")
        return EXIT_FAILED_RUNS
    if INTERRUPTED in final or final.count(DONE) < len(final):
        print("some runs did not finish; the same command resumes them.")
        return EXIT_FAILED_RUNS
    return code


def _print_report(paths: Sequence[Path]) -> int:
    print("wrote " + ", ".join(str(path) for path in paths))
    return 0
