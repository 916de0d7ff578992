"""``mambaout report RUN_DIR [--out FILE]``: write a run folder's report.html and print its path."""

from __future__ import annotations

import argparse
import sys

from mambaout_pl.errors import OutputWriteError
from mambaout_pl.report.report import REPORT_FILE, ReportError, write_report
from mambaout_pl.report.run_folder import RunFolderError


def report_main(argv: list[str]) -> int:
    """Entry point of ``mambaout report``."""
    parser = argparse.ArgumentParser(
        prog="mambaout report",
        description="Write an HTML report of a run folder: loss, learning-rate and score curves, the best epoch, "
        "scores per epoch and per class, validation pictures and the config. Reads only the run folder's files.",
    )
    parser.add_argument("run_dir", help="a run folder, e.g. runs/quickstart/lightning_logs/version_0")
    parser.add_argument(
        "--out",
        default=None,
        metavar="FILE",
        help=f"the page to write (default: RUN_DIR/{REPORT_FILE}); its PNGs go to a folder named after it, beside it",
    )
    args = parser.parse_args(argv)
    try:
        page = write_report(args.run_dir, args.out)
    except (RunFolderError, ReportError, OutputWriteError) as error:
        print(f"mambaout report: error: {error}", file=sys.stderr)
        return 2
    print(f"Report written to {page}")
    return 0
