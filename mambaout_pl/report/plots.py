"""Curves as PNG files with matplotlib's Agg canvas (no pyplot, no display, no global backend change).

:func:`line_plot` draws any named series; :func:`metric_series` takes them from metrics rows
(``mambaout_pl.training.metrics_file``), one point per row holding the column.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mambaout_pl.training.atomic import atomic_write

__all__ = ["Series", "line_plot", "metric_series", "x_axis"]

#: ``label -> (x values, y values)``.
Series = Mapping[str, tuple[Sequence[float], Sequence[float]]]


def x_axis(rows: Sequence[Mapping[str, float]]) -> str:
    """``"epoch"`` when every row is a different epoch, else ``"step"`` (several validations per epoch)."""
    epochs = [row.get("epoch") for row in rows]
    return "epoch" if len(set(epochs)) == len(epochs) else "step"


def metric_series(
    rows: Sequence[Mapping[str, float]], columns: Sequence[str], x: str = "epoch"
) -> dict[str, tuple[list[float], list[float]]]:
    """``{column: (x values, values)}`` of the rows holding each of ``columns`` (finite values only)."""
    series = {}
    for column in columns:
        points = [(row[x], row[column]) for row in rows if column in row and math.isfinite(row[column])]
        if points:
            series[column] = ([point[0] for point in points], [point[1] for point in points])
    return series


def line_plot(
    path: Path,
    series: Series,
    title: str,
    x_label: str = "epoch",
    y_label: str = "",
    mark_x: float | None = None,
    mark_label: str = "best",
    log_y: bool = False,
    size: tuple[float, float] = (6.4, 3.6),
    dpi: int = 110,
) -> Path:
    """Draw ``series`` as lines with markers into the PNG ``path`` (written atomically); returns ``path``.

    ``mark_x`` draws a dashed vertical line there (e.g. the best epoch), labelled ``mark_label``;
    ``log_y`` uses a logarithmic y axis where every value is positive.
    """
    figure = Figure(figsize=size, dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, (xs, ys) in series.items():
        axes.plot(list(xs), list(ys), marker="o", markersize=3, linewidth=1.5, label=label)
    if mark_x is not None:
        axes.axvline(mark_x, color="0.4", linestyle="--", linewidth=1, label=f"{mark_label} ({x_label} {mark_x:g})")
    if log_y and all(value > 0 for _, ys in series.values() for value in ys):
        axes.set_yscale("log")
    if x_label in ("epoch", "step"):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_title(title)
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.grid(True, alpha=0.3)
    if series or mark_x is not None:
        axes.legend(fontsize="small")
    atomic_write(path, lambda file: figure.savefig(file, format="png"))
    return path
