"""The report of a grid, read from its run folders only: ``results.csv``, ``report.md`` and two PNG plots.

Every run folder holds its record (``run.json``), costs (``costs.json``) and validated metrics
(``metrics.json``), whichever launcher ran it, so the report reads the same wherever the runs ran.

- ``results.csv``: one row per run folder: arm, size, seed, status, the task's monitored metric and
  its value, parameters, GMACs, training img/s, peak memory, the first stage's L/6D, the folder.
- ``report.md``: per arm and size, the metric's mean ± std and 95% t-interval over seeds beside the
  cost columns; each arm's paired-by-seed difference from the reference arm at each size, called
  significant only when its interval excludes 0; the runs that did not finish, with their logs.
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
from mambaout_pl.training.atomic import atomic_write

__all__ = ["RunRecord", "collect_runs", "results_table", "write_report", "CSV_COLUMNS"]

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


def collect_runs(out: Path) -> list[RunRecord]:
    """Every run folder under ``out/runs`` that has its ``run.json``, as records, in folder order."""
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
        if record.status == DONE:
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


def report_text(records: Sequence[RunRecord], out: Path, arms: Sequence[str], reference: str | None) -> str:
    """``report.md``'s text."""
    done = [r for r in records if r.status == DONE]
    grid = json.loads((out / GRID_FILE).read_text()) if (out / GRID_FILE).is_file() else {}
    monitor = records[0].monitor if records else grid.get("monitor", "metric")
    mode = records[0].mode if records else grid.get("mode", "max")
    counts = {
        status: sum(r.status == status for r in records) for status in ("done", "interrupted", "failed", "pending")
    }
    lines = [
        f"# Comparison: {out.name}",
        "",
        f"Recipe `{grid.get('base', '?')}`, task `{grid.get('task', '?')}`; overrides for every run: "
        f"`{' '.join(grid.get('overrides', [])) or 'none'}`. Metric: `{monitor}` of the final weights "
        f"(`validate` of each run's last.ckpt; {'higher' if mode == 'max' else 'lower'} is better). "
        f"Runs: {', '.join(f'{n} {status}' for status, n in counts.items() if n)}.",
        "",
        f"## {monitor} per arm and size",
        "",
        f"Mean ± sample std over seeds and the t-based {CONFIDENCE:.0%} interval of the mean. Costs: parameters, "
        "GMACs per image (a detector's as the paper counts them: backbone + FPN, RPN head, box and mask heads on the "
        "RoIs kept at test time), the backbone's GMACs, training img/s and peak memory (means over the seeds' runs, "
        "measured while they ran), and L/6D of the first stage at the input the backbone got.",
        "",
        "| arm | size | input | L/6D | seeds | " + monitor + f" | {CONFIDENCE:.0%} interval | params | GMACs | "
        "backbone GMACs | train img/s | peak MiB | changed |",
        "|---|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    groups = _groups(records, arms)
    for (arm, size), group in groups.items():
        finished = [r for r in group if r.status == DONE]
        summary = summarize([r.value for r in finished]) if finished else None
        mean_text, interval = _summary_text(summary)
        with_costs = [r for r in group if r.costs]
        cost = {key: _mean([r.costs.get(key) for r in with_costs]) for key in COST_KEYS}
        inputs = sorted({"x".join(map(str, r.costs["input_size"])) for r in with_costs if r.costs.get("input_size")})
        lines.append(
            f"| {arm} | {size} | {', '.join(inputs) or '-'} | {_format(cost['l_over_6d'], 2)} | "
            f"{len(finished)}/{len(group)} | {mean_text} | {interval} | "
            f"{_count(cost['params'])} | {_format(cost['gmacs'])} | "
            f"{_format(cost['backbone_gmacs'])} | {_format(cost['train_images_per_second'], 1)} | "
            f"{_format(cost['peak_memory_mb'], 0)} | {_changed(group[0]) or '-'} |"
        )
    arm_names = list(dict.fromkeys(arm for arm, _ in groups))
    reference = reference if reference in arm_names else (arm_names[0] if arm_names else None)
    if reference is not None and len(arm_names) > 1:
        lines += [
            "",
            f"## Paired differences from {reference}",
            "",
            f"Per size, each arm's {monitor} minus {reference}'s on the seeds both finished: mean ± std of the "
            f"differences and their {CONFIDENCE:.0%} t-interval. Significant only when the interval excludes 0.",
            "",
            f"| size | arm | seeds | difference | {CONFIDENCE:.0%} interval | significant |",
            "|---:|---|---|---:|---|---|",
        ]
        for size in sorted({r.size for r in done}):
            base_values = {r.seed: r.value for r in done if r.arm == reference and r.size == size}
            for arm in arm_names:
                if arm == reference:
                    continue
                values = {r.seed: r.value for r in done if r.arm == arm and r.size == size}
                difference = paired_difference(values, base_values)
                if difference is None:
                    lines.append(f"| {size} | {arm} | none shared | - | - | - |")
                    continue
                mean_text, interval = _summary_text(difference.summary)
                verdict = {True: "**yes**", False: "no", None: "- (one seed)"}[difference.significant]
                seeds = ",".join(map(str, difference.seeds))
                lines.append(f"| {size} | {arm} | {seeds} | {mean_text} | {interval} | {verdict} |")
    unfinished = [r for r in records if r.status != DONE]
    if unfinished:
        lines += ["", "## Runs not done", ""]
        for r in unfinished:
            detail = r.status
            if r.failure is not None:
                detail = f"failed in {r.failure['stage']}: {r.failure['error']}"
            lines.append(
                f"- arm {r.arm}, size {r.size}, seed {r.seed}: {detail}; log `{(r.folder / LOG_FILE).relative_to(out)}`"
            )
    if done:
        lines += [
            "",
            "## Plots",
            "",
            f"![{monitor} against L/6D](metric_vs_l6d.png)",
            "",
            f"![{monitor} against GMACs](metric_vs_gmacs.png)",
        ]
    return "\n".join(lines) + "\n"


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


def write_report(out: Path, arms: Sequence[str] = (), reference: str | None = None) -> list[Path]:
    """Write ``results.csv``, ``report.md`` and (with any run done) the two plots into ``out``; returns their paths.

    ``arms`` orders the arms (default: ``grid.json``'s order); ``reference`` is the arm the others are
    compared with (default: the first).
    """
    out = Path(out)
    if not arms and (out / GRID_FILE).is_file():
        arms = list(json.loads((out / GRID_FILE).read_text())["arms"])
    records = collect_runs(out)
    written = [out / "results.csv", out / "report.md"]
    csv_text = results_table(records, out)
    markdown = report_text(records, out, arms, reference)
    atomic_write(written[0], lambda file: file.write(csv_text.encode()))
    atomic_write(written[1], lambda file: file.write(markdown.encode()))
    if any(r.status == DONE for r in records):
        for name, key, label in (
            ("metric_vs_l6d.png", "l_over_6d", "first stage L / 6D (attention's quadratic / linear FLOPs)"),
            ("metric_vs_gmacs.png", "gmacs", "GMACs per image"),
        ):
            _plot(records, arms, key, label, out / name)
            written.append(out / name)
    return written
