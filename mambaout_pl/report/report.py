"""``report.html`` of one run folder: curves, the best epoch, scores per epoch and per class, pictures, the config.

The page and its folder of PNGs (``report/`` beside ``report.html``: ``<page stem>/`` beside any
other page name) are made from the run folder's files only (:mod:`mambaout_pl.report.run_folder`),
so a report can be written on another machine, during or after the run. Writing it again
replaces both.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from mambaout_pl.report.html import Cell, heading_html, image_html, page_html, pre_html, table_html, write_page
from mambaout_pl.report.plots import line_plot, metric_series, x_axis
from mambaout_pl.report.run_folder import PER_CLASS_COLUMN, RunFolder, per_class_scores, read_run_folder
from mambaout_pl.training.atomic import staged_folder

__all__ = ["REPORT_FILE", "ReportError", "curve_columns", "write_report"]

REPORT_FILE = "report.html"
#: File in a report's PNG folder that marks it as one, so that writing a report again may replace it.
ASSETS_MARKER = ".mambaout-report"


class ReportError(FileExistsError):
    """The report's PNG folder exists and holds files a report did not write."""


def curve_columns(rows: list[Mapping[str, float]]) -> dict[str, list[str]]:
    """The columns of each curve: ``loss`` (``*loss``), ``learning rate`` (``lr``, ``lr-*``) and ``scores`` (the other
    evaluation values, per-class ones and COCO's undefined ``-1`` series left out)."""
    columns: list[str] = []
    for row in rows:
        columns += [column for column in row if column not in columns]
    losses = [column for column in columns if column.endswith("loss")]
    rates = [column for column in columns if column == "lr" or column.startswith("lr-")]
    scores = [
        column
        for column in columns
        if column not in ("epoch", "step")
        and column not in losses
        and column not in rates
        and not PER_CLASS_COLUMN.match(column)
        and not all(row[column] == -1 for row in rows if column in row)
    ]
    return {"loss": losses, "learning rate": rates, "scores": scores}


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the report of the run folder ``run_dir`` to ``out`` (default ``<run_dir>/report.html``); returns it."""
    run = read_run_folder(run_dir)
    page = Path(out) if out is not None else run.path / REPORT_FILE
    assets = page.with_suffix("") if page.suffix else page.with_name(f"{page.name}_files")
    check_assets_folder(assets)
    with staged_folder(assets, replace=True) as staging:
        (staging / ASSETS_MARKER).write_text("Written by `mambaout report`; replaced by the next report.\n")
        curves = draw_curves(run, staging)
        pictures = copy_pictures(run, staging)
    sections = [("Summary", summary_html(run))]
    if curves:
        figures = [image_html(f"{assets.name}/{name}", caption) for name, caption in curves]
        sections.append(("Curves", "\n".join(figures)))
    if run.rows:
        sections.append(("Scores per epoch", scores_table(run)))
    per_class = per_class_table(run)
    if per_class:
        sections.append(("Per-class scores", per_class))
    if pictures:
        parts = []
        for heading, files in pictures:
            parts.append(heading_html(heading))
            parts += [image_html(f"{assets.name}/{name}", caption, css_class="picture") for name, caption in files]
        sections.append(("Validation pictures", "\n".join(parts)))
    if run.config_text:
        sections.append(("Config", pre_html(run.config_text)))
    intro = f"Run folder {run.path.resolve()}; the task's metric is {run.monitor} ({run.mode} is best)."
    return write_page(page, page_html(f"Run report: {run.path.name}", sections, intro))


def check_assets_folder(assets: Path) -> None:
    """Raise :class:`ReportError` when ``assets`` exists and is not a folder an earlier report wrote."""
    if assets.exists() and not (assets.is_dir() and (assets / ASSETS_MARKER).is_file()):
        raise ReportError(
            f"'{assets}' exists and was not written by `mambaout report`, which would replace it with the report's "
            "PNG files. Move it away, or write the report elsewhere with --out FILE (its PNGs go to a folder named "
            "after FILE, beside it)."
        )


def draw_curves(run: RunFolder, folder: Path) -> list[tuple[str, str]]:
    """The loss, learning-rate and score curves as PNGs in ``folder``: ``[(file name, caption)]``."""
    rows = run.rows
    x = x_axis(rows)
    best = run.best
    mark = best[x] if best is not None else None
    drawn = []
    for title, columns in curve_columns(rows).items():
        series = metric_series(rows, columns, x)
        if not series:
            continue
        name = f"{title.replace(' ', '_')}.png"
        marked = mark if title != "learning rate" else None
        line_plot(folder / name, series, title, x_label=x, mark_x=marked, mark_label=f"best {run.monitor}")
        drawn.append((name, f"{title}: {', '.join(series)} per {x}"))
    return drawn


def copy_pictures(run: RunFolder, folder: Path) -> list[tuple[str, list[tuple[str, str]]]]:
    """Copy the pictures of the best and the last validation into ``folder``:
    ``[(heading, [(path, caption), ...])]``, the last left out when it is the best."""
    groups = []
    seen: set[tuple[int, int]] = set()
    for which, row in (("Best", run.best), ("Last", run.last or (run.rows[-1] if run.rows else None))):
        pictures = run.pictures_at(row)
        key = (int(row["epoch"]), int(row["step"])) if row is not None else None
        if not pictures or key in seen:
            continue
        seen.add(key)
        (folder / "pictures").mkdir(exist_ok=True)
        files = []
        for index, picture in enumerate(pictures):
            name = f"pictures/epoch{key[0]:03d}-step{key[1]}-{index}.png"
            shutil.copyfile(picture, folder / name)
            files.append((name, f"image {index}"))
        groups.append((f"{which} validation: epoch {key[0]} (step {key[1]})", files))
    return groups


def summary_html(run: RunFolder) -> str:
    best, last = run.best, run.last
    rows: list[list[Cell]] = [["metric", run.monitor], ["best is", run.mode]]
    if best is not None:
        rows += [
            ["best value", best[run.monitor]],
            ["best epoch", int(best["epoch"])],
            ["best step", int(best["step"])],
        ]
    if last is not None:
        rows += [["last value", last[run.monitor]], ["last epoch", int(last["epoch"])]]
    checkpoint = run.best_checkpoint()
    if checkpoint is not None:
        rows.append(["best checkpoint", str(checkpoint.relative_to(run.path))])
    rows.append(["rows in metrics.csv", len(run.rows)])
    return table_html(None, rows, table_id="summary")


def scores_table(run: RunFolder) -> str:
    """One row per metrics row: epoch, step, then every column other than the per-class ones; the best marked."""
    columns: list[str] = []
    for row in run.rows:
        columns += [column for column in row if column not in columns and not PER_CLASS_COLUMN.match(column)]
    best = run.best
    marked = [index for index, row in enumerate(run.rows) if row is best]
    body = [[row.get(column) for column in columns] for row in run.rows]
    caption = f"The best {run.monitor} is marked." if best is not None else None
    return table_html(columns, body, caption=caption, table_id="scores", marked_rows=marked)


def per_class_table(run: RunFolder) -> str:
    """Per-class scores (e.g. segmentation's IoU per class) at the best and the last validation; '' without any."""
    best, last = run.best, run.last
    best_scores, last_scores = per_class_scores(best), per_class_scores(last)
    if not best_scores and not last_scores:
        return ""
    header, columns = ["class"], []
    for score in dict.fromkeys([*best_scores, *last_scores]):
        if best is not None:
            header.append(f"{score} at best (epoch {int(best['epoch'])})")
            columns.append(best_scores.get(score, {}))
        if last is not None and last is not best:
            header.append(f"{score} at last (epoch {int(last['epoch'])})")
            columns.append(last_scores.get(score, {}))
    names = list(dict.fromkeys(name for column in columns for name in column))
    body = [[name, *(column.get(name) for column in columns)] for name in names]
    caption = "A class neither predicted nor present in the validation images has no score."
    return table_html(header, body, caption=caption, table_id="per-class")
