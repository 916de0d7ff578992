"""``mambaout compare``: a recipe under several arms, at several input sizes and seeds, with costs and seed intervals.

- ``grid.py``: arms x sizes x seeds, run folders, their settings and status, refusal to mix grids.
- ``runner.py``: a run is the CLI's ``fit`` and ``validate``; here, in parallel processes, or on Slurm.
- ``costs.py``: parameters, GMACs, L/6D counted; training img/s and peak memory measured.
- ``matching.py``: ``--match-macs``, an arm's backbone width (or depth) changed to match another's GMACs.
- ``statistics.py``: mean, std, t-based 95% intervals, paired-by-seed differences.
- ``report.py``: ``results.csv``, ``report.md`` and plots, read from the run folders only.
- ``command.py``: the command line.
"""

from mambaout_pl.compare.command import compare_main
from mambaout_pl.compare.errors import ArmError, CompareError, GridMismatchError, SizeError
from mambaout_pl.compare.grid import Arm, Grid, Run, plan_grid, run_status, write_grid
from mambaout_pl.compare.report import collect_runs, parse_metric, write_report
from mambaout_pl.compare.runner import execute_run, run_attempt, run_local, submit_slurm
from mambaout_pl.compare.statistics import paired_difference, summarize

__all__ = [
    "Arm",
    "ArmError",
    "CompareError",
    "Grid",
    "GridMismatchError",
    "Run",
    "SizeError",
    "collect_runs",
    "compare_main",
    "execute_run",
    "paired_difference",
    "parse_metric",
    "plan_grid",
    "run_attempt",
    "run_local",
    "run_status",
    "submit_slurm",
    "summarize",
    "write_grid",
    "write_report",
]
