"""The report of a grid, read from its run folders only: ``results.csv``, ``report.md``, ``report.html``, two PNG plots.

Every run folder holds its record (``run.json``), costs (``costs.json``) and validated metrics
(``metrics.json``), whichever launcher ran it, so the report reads the same wherever the runs ran.

- ``results.csv``: one row per run folder: arm, size, seed, status, the task's monitored metric and
  its value, parameters, GMACs, training img/s, peak memory, the first stage's L/6D, the folder.
- ``report.md``: per arm and size, the metric's mean ± std and 95% t-interval over seeds beside the
  cost columns; each arm's paired-by-seed difference from the reference arm at each size, called
  significant only when its interval excludes 0; the runs that did not finish, with their logs.
- ``report.html``: the same page for a browser, linking each finished run's own ``report.html``
  (``mambaout report`` of its training folder: curves, per-class scores, pictures).
- ``metric_vs_l6d.png`` (the metric against the first stage's L/6D, one line per arm, 95% intervals
  as error bars) and ``metric_vs_gmacs.png``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mambaout_pl.compare.errors import CompareError
from mambaout_pl.compare.grid import (
    COSTS_FILE,
    DONE,
    FAILED,
    FAILED_FILE,
    GRID_FILE,
    LOG_FILE,
    METRICS_FILE,
    RUN_FILE,
    run_status,
)
from mambaout_pl.compare.statistics import CONFIDENCE, Summary, paired_difference, summarize
from mambaout_pl.report.html import image_html, link_html, page_html, paragraph_html, table_html, write_page
from mambaout_pl.report.report import REPORT_FILE
from mambaout_pl.report.report import write_report as write_run_report
from mambaout_pl.training.atomic import atomic_write
from mambaout_pl.training.metrics_file import METRICS_FILE as RUN_METRICS_FILE

__all__ = ["RunRecord", "collect_runs", "parse_metric", "results_table", "write_report", "CSV_COLUMNS"]

CSV_COLUMNS = (
    "arm",
    "size",
    "seed",
    "status",
    "metric",
    "value",
    "params",
    "gmacs",
    "gmacs_counted",
    "backbone_gmacs",
    "train_images_per_second",
    "peak_memory_mb",
    "memory_measure",
    "l_over_6d",
    "input",
    "changed",
    "run_folder",
)
COST_KEYS = ("params", "gmacs", "backbone_gmacs", "train_images_per_second", "peak_memory_mb", "l_over_6d")


@dataclass
class RunRecord:
    """What one run folder says about its run."""

    folder: Path
    arm: str
    size: int
    seed: int
    status: str
    monitor: str
    mode: str
    value: float | None = None
    costs: dict[str, Any] = field(default_factory=dict)
    matched: dict[str, Any] | None = None
    failure: dict[str, Any] | None = None


def parse_metric(text: str) -> tuple[str, str]:
    """``NAME[:min|max]`` as (name, mode); without a mode, names holding ``loss`` are lower-is-better."""
    name, colon, mode = text.rpartition(":") if text.endswith((":min", ":max")) else (text, "", "")
    if not name:
        raise CompareError(f"--metric '{text}': give a logged metric's name, e.g. val/loss or val/loss:min.")
    return name, mode or ("min" if "loss" in name else "max")


def _metric_value(folder: Path, metric: str) -> float:
    logged = json.loads((folder / METRICS_FILE).read_text()).get("metrics", {})
    if metric not in logged:
        raise CompareError(
            f"--metric {metric}: {folder / METRICS_FILE} has no such metric; its validate logged "
            f"{', '.join(sorted(logged)) or 'nothing'}."
        )
    return float(logged[metric])


def collect_runs(out: Path, metric: tuple[str, str] | None = None) -> list[RunRecord]:
    """Every run folder under ``out/runs`` that has its ``run.json``, as records, in folder order.

    ``metric`` (name, mode) reports another metric the runs' ``validate`` logged instead of the grid's monitor.
    """
    records = []
    for path in sorted(Path(out).glob("runs/*/size*/seed*/" + RUN_FILE)):
        folder = path.parent
        info = json.loads(path.read_text())
        record = RunRecord(
            folder=folder,
            arm=info["arm"],
            size=int(info["size"]),
            seed=int(info["seed"]),
            status=run_status(folder),
            monitor=info["monitor"],
            mode=info["mode"],
            matched=info.get("matched"),
        )
        if (folder / COSTS_FILE).is_file():
            record.costs = json.loads((folder / COSTS_FILE).read_text())
        if metric is not None:
            record.monitor, record.mode = metric
        if record.status == DONE and metric is not None:
            record.value = _metric_value(folder, metric[0])
        elif record.status == DONE:
            record.value = float(json.loads((folder / METRICS_FILE).read_text())["value"])
        elif record.status == FAILED:
            record.failure = json.loads((folder / FAILED_FILE).read_text())
        records.append(record)
    return records


def _changed(record: RunRecord) -> str:
    changed = (record.matched or {}).get("changed") or {}
    return "; ".join(f"{key} {value['from']} -> {value['to']}" for key, value in changed.items())


def results_table(records: Sequence[RunRecord], out: Path) -> str:
    """``results.csv``'s text: one row per run."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for record in records:
        costs = record.costs
        writer.writerow(
            [
                record.arm,
                record.size,
                record.seed,
                record.status,
                record.monitor,
                "" if record.value is None else repr(record.value),
                costs.get("params", ""),
                _plain(costs.get("gmacs")),
                costs.get("gmacs_counted", ""),
                _plain(costs.get("backbone_gmacs")),
                _plain(costs.get("train_images_per_second")),
                _plain(costs.get("peak_memory_mb")),
                costs.get("memory_measure", ""),
                _plain(costs.get("l_over_6d")),
                "x".join(map(str, costs["input_size"])) if costs.get("input_size") else "",
                _changed(record),
                str(record.folder.relative_to(out)),
            ]
        )
    return buffer.getvalue()


def _plain(value: Any) -> str:
    return "" if value is None else repr(value)


def _mean(values: Sequence[Any]) -> float | None:
    numbers = [float(value) for value in values if value is not None]
    return math.fsum(numbers) / len(numbers) if numbers else None


def _format(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _groups(records: Sequence[RunRecord], arms: Sequence[str]) -> dict[tuple[str, int], list[RunRecord]]:
    order = {arm: index for index, arm in enumerate(arms)}
    keys = sorted({(r.arm, r.size) for r in records}, key=lambda key: (order.get(key[0], len(order)), key[0], key[1]))
    return {key: [r for r in records if (r.arm, r.size) == key] for key in keys}


def _summary_text(summary: Summary | None) -> tuple[str, str]:
    if summary is None:
        return "-", "-"
    spread = "" if summary.std is None else f" ± {summary.std:.4f}"
    interval = "-" if summary.low is None else f"[{summary.low:.4f}, {summary.high:.4f}]"
    return f"{summary.mean:.4f}{spread}", interval


def summary_rows(records: Sequence[RunRecord], arms: Sequence[str], monitor: str) -> tuple[list[str], list[list[str]]]:
    """The per-arm-and-size table: header and rows of formatted cells."""
    header = [
        "arm", "size", "input", "L/6D", "seeds", monitor, f"{CONFIDENCE:.0%} interval", "params", "GMACs",
        "backbone GMACs", "train img/s", "peak MiB", "changed",
    ]  # fmt: skip
    rows = []
    for (arm, size), group in _groups(records, arms).items():
        finished = [r for r in group if r.status == DONE]
        summary = summarize([r.value for r in finished]) if finished else None
        mean_text, interval = _summary_text(summary)
        with_costs = [r for r in group if r.costs]
        cost = {key: _mean([r.costs.get(key) for r in with_costs]) for key in COST_KEYS}
        inputs = sorted({"x".join(map(str, r.costs["input_size"])) for r in with_costs if r.costs.get("input_size")})
        rows.append(
            [
                arm,
                str(size),
                ", ".join(inputs) or "-",
                _format(cost["l_over_6d"], 2),
                f"{len(finished)}/{len(group)}",
                mean_text,
                interval,
                _count(cost["params"]),
                _format(cost["gmacs"]),
                _format(cost["backbone_gmacs"]),
                _format(cost["train_images_per_second"], 1),
                _format(cost["peak_memory_mb"], 0),
                _changed(group[0]) or "-",
            ]
        )
    return header, rows


def difference_rows(records: Sequence[RunRecord], arm_names: Sequence[str], reference: str) -> list[list[str]]:
    """Per size, each arm's paired-by-seed difference from ``reference``: formatted rows of :data:`DIFFERENCE_HEADER`."""
    done = [r for r in records if r.status == DONE]
    rows = []
    for size in sorted({r.size for r in done}):
        base_values = {r.seed: r.value for r in done if r.arm == reference and r.size == size}
        for arm in arm_names:
            if arm == reference:
                continue
            values = {r.seed: r.value for r in done if r.arm == arm and r.size == size}
            difference = paired_difference(values, base_values)
            if difference is None:
                rows.append([str(size), arm, "none shared", "-", "-", "-"])
                continue
            mean_text, interval = _summary_text(difference.summary)
            verdict = {True: "yes", False: "no", None: "- (one seed)"}[difference.significant]
            rows.append([str(size), arm, ",".join(map(str, difference.seeds)), mean_text, interval, verdict])
    return rows


DIFFERENCE_HEADER = ["size", "arm", "seeds", "difference", f"{CONFIDENCE:.0%} interval", "significant"]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> list[str]:
    """A Markdown table's lines; ``right[i]`` aligns column ``i`` to the right."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


@dataclass
class ReportContent:
    """What both ``report.md`` and ``report.html`` show."""

    title: str
    intro: str
    monitor: str
    summary: tuple[list[str], list[list[str]]]
    reference: str | None
    differences: list[list[str]]
    unfinished: list[str]
    plots: tuple[str, ...]


def report_content(
    records: Sequence[RunRecord],
    out: Path,
    arms: Sequence[str],
    reference: str | None,
    plots: tuple[str, str] = ("metric_vs_l6d.png", "metric_vs_gmacs.png"),
) -> ReportContent:
    grid = json.loads((out / GRID_FILE).read_text()) if (out / GRID_FILE).is_file() else {}
    monitor = records[0].monitor if records else grid.get("monitor", "metric")
    mode = records[0].mode if records else grid.get("mode", "max")
    counts = {
        status: sum(r.status == status for r in records) for status in ("done", "interrupted", "failed", "pending")
    }
    intro = (
        f"Recipe `{grid.get('base', '?')}`, task `{grid.get('task', '?')}`; overrides for every run: "
        f"`{' '.join(grid.get('overrides', [])) or 'none'}`. Metric: `{monitor}` of the final weights "
        f"(`validate` of each run's last.ckpt; {'higher' if mode == 'max' else 'lower'} is better). "
        f"Runs: {', '.join(f'{n} {status}' for status, n in counts.items() if n)}."
    )
    arm_names = list(dict.fromkeys(arm for arm, _ in _groups(records, arms)))
    reference = reference if reference in arm_names else (arm_names[0] if arm_names else None)
    differences = difference_rows(records, arm_names, reference) if reference and len(arm_names) > 1 else []
    unfinished = []
    for r in records:
        if r.status == DONE:
            continue
        detail = r.status
        if r.failure is not None:
            detail = f"failed in {r.failure['stage']}: {r.failure['error']}"
        log = (r.folder / LOG_FILE).relative_to(out)
        unfinished.append(f"arm {r.arm}, size {r.size}, seed {r.seed}: {detail}; log `{log}`")
    return ReportContent(
        title=f"Comparison: {out.name}",
        intro=intro,
        monitor=monitor,
        summary=summary_rows(records, arms, monitor),
        reference=reference if differences else None,
        differences=differences,
        unfinished=unfinished,
        plots=plots if any(r.status == DONE for r in records) else (),
    )


SUMMARY_NOTE = (
    "Mean ± sample std over seeds and the t-based {confidence} interval of the mean. Costs: parameters, GMACs per "
    "image (a detector's as the paper counts them: backbone + FPN, RPN head, box and mask heads on the RoIs kept at "
    "test time), the backbone's GMACs, training img/s and peak memory (means over the seeds' runs, measured while "
    "they ran), and L/6D of the first stage at the input the backbone got."
)
DIFFERENCE_NOTE = (
    "Per size, each arm's {monitor} minus {reference}'s on the seeds both finished: mean ± std of the differences "
    "and their {confidence} t-interval. Significant only when the interval excludes 0."
)
PLOT_AXES = ("against L/6D", "against GMACs")


def report_text(content: ReportContent) -> str:
    """``report.md``'s text."""
    confidence = f"{CONFIDENCE:.0%}"
    header, rows = content.summary
    right = [False, True, False, True, True, True, False, True, True, True, True, True, False]
    lines = [f"# {content.title}", "", content.intro, "", f"## {content.monitor} per arm and size", ""]
    lines += [SUMMARY_NOTE.format(confidence=confidence), "", *markdown_table(header, rows, right)]
    if content.reference is not None:
        note = DIFFERENCE_NOTE.format(monitor=content.monitor, reference=content.reference, confidence=confidence)
        lines += ["", f"## Paired differences from {content.reference}", "", note, ""]
        bold = [[*row[:-1], "**yes**" if row[-1] == "yes" else row[-1]] for row in content.differences]
        lines += markdown_table(DIFFERENCE_HEADER, bold, [True, False, False, True, False, False])
    if content.unfinished:
        lines += ["", "## Runs not done", "", *(f"- {line}" for line in content.unfinished)]
    if content.plots:
        lines += ["", "## Plots"]
        for name, what in zip(content.plots, PLOT_AXES):
            lines += ["", f"![{content.monitor} {what}]({name})"]
    return "\n".join(lines) + "\n"


def report_html(content: ReportContent, out: Path, run_pages: Sequence[Path]) -> str:
    """``report.html``'s text: ``report.md``'s sections, and links to the runs' own reports (``run_pages``)."""
    confidence = f"{CONFIDENCE:.0%}"
    header, rows = content.summary
    summary = paragraph_html(SUMMARY_NOTE.format(confidence=confidence)) + table_html(header, rows, table_id="summary")
    sections = [(f"{content.monitor} per arm and size", summary)]
    if content.reference is not None:
        note = DIFFERENCE_NOTE.format(monitor=content.monitor, reference=content.reference, confidence=confidence)
        body = paragraph_html(note) + table_html(DIFFERENCE_HEADER, content.differences, table_id="differences")
        sections.append((f"Paired differences from {content.reference}", body))
    if content.unfinished:
        sections.append(("Runs not done", "".join(paragraph_html(line) for line in content.unfinished)))
    if content.plots:
        figures = [
            image_html(name, f"{content.monitor} {what}", width=640) for name, what in zip(content.plots, PLOT_AXES)
        ]
        sections.append(("Plots", "\n".join(figures)))
    if run_pages:
        links = [link_html(str(page.relative_to(out)), str(page.parent.relative_to(out))) for page in run_pages]
        sections.append(("Runs", "<ul>" + "".join(f"<li>{link}</li>" for link in links) + "</ul>"))
    return page_html(content.title, sections, intro=content.intro)


def write_run_reports(records: Sequence[RunRecord]) -> list[Path]:
    """Each finished run's own ``report.html`` (``mambaout report`` of its training folder), written again only
    when the run's ``metrics.csv`` is newer than it; returns the pages."""
    pages = []
    for record in records:
        if record.status != DONE:
            continue
        for run_dir in sorted(record.folder.glob("lightning_logs/version_*")):
            metrics, page = run_dir / RUN_METRICS_FILE, run_dir / REPORT_FILE
            if not metrics.is_file():
                continue
            if not page.is_file() or page.stat().st_mtime < metrics.stat().st_mtime:
                write_run_report(run_dir)
            pages.append(page)
    return pages


def _plot(records: Sequence[RunRecord], arms: Sequence[str], x_key: str, x_label: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    monitor = records[0].monitor
    for arm in dict.fromkeys(arm for arm, _ in _groups(records, arms)):
        points = []
        for size in sorted({r.size for r in records if r.arm == arm}):
            finished = [r for r in records if r.arm == arm and r.size == size and r.status == DONE]
            x = _mean([r.costs.get(x_key) for r in finished])
            if not finished or x is None:
                continue
            summary = summarize([r.value for r in finished])
            points.append((x, summary.mean, summary.half_width or 0.0))
        if points:
            xs, ys, errors = zip(*points)
            axes.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=arm)
    if x_key == "l_over_6d":
        axes.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    axes.set_xlabel(x_label)
    axes.set_ylabel(f"{monitor} (mean, {CONFIDENCE:.0%} interval)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    atomic_write(path, lambda file: file.write(buffer.getvalue()))


def _suffixed(name: str, suffix: str) -> str:
    stem, dot, extension = name.rpartition(".")
    return f"{stem}{suffix}{dot}{extension}"


def write_report(
    out: Path, arms: Sequence[str] = (), reference: str | None = None, metric: tuple[str, str] | None = None
) -> list[Path]:
    """Write ``results.csv``, ``report.md``, ``report.html`` (with each finished run's own ``report.html``) and
    (with any run done) the two plots into ``out``; returns the grid's files.

    ``arms`` orders the arms (default: ``grid.json``'s order); ``reference`` is the arm the others are
    compared with (default: the first). ``metric`` (name, mode, see :func:`parse_metric`) reports another
    metric than the grid's monitor, into files named after it (``report.val_loss.md``, ...), so the
    monitor's report stays.
    """
    out = Path(out)
    grid = json.loads((out / GRID_FILE).read_text()) if (out / GRID_FILE).is_file() else {}
    if not arms and grid:
        arms = list(grid["arms"])
    if metric is not None and metric[0] == grid.get("monitor"):
        metric = None if metric[1] == grid.get("mode") else metric
    records = collect_runs(out, metric)
    suffix = "" if metric is None else "." + metric[0].replace("/", "_")
    names = ["results.csv", "report.md", REPORT_FILE, "metric_vs_l6d.png", "metric_vs_gmacs.png"]
    csv_name, md_name, html_name, l6d_name, gmacs_name = (_suffixed(name, suffix) for name in names)
    written = [out / csv_name, out / md_name, out / html_name]
    csv_text = results_table(records, out)
    content = report_content(records, out, arms, reference, plots=(l6d_name, gmacs_name))
    markdown = report_text(content)
    atomic_write(written[0], lambda file: file.write(csv_text.encode()))
    atomic_write(written[1], lambda file: file.write(markdown.encode()))
    if any(r.status == DONE for r in records):
        for name, key, label in (
            (l6d_name, "l_over_6d", "first stage L / 6D (attention's quadratic / linear FLOPs)"),
            (gmacs_name, "gmacs", "GMACs per image"),
        ):
            _plot(records, arms, key, label, out / name)
            written.append(out / name)
    write_page(written[2], report_html(content, out, write_run_reports(records)))
    return written
