"""Reports a person reads: a run folder's curves, scores, pictures and config as one HTML page.

- :mod:`~mambaout_pl.report.run_folder`: reading a run folder (``read_run_folder``, ``RunFolder``).
- :mod:`~mambaout_pl.report.plots`: PNG curves with matplotlib's Agg canvas (``line_plot``, ``metric_series``).
- :mod:`~mambaout_pl.report.html`: escaped HTML pieces (``page_html``, ``table_html``, ``image_html``).
- :mod:`~mambaout_pl.report.report`: ``write_report``, what ``mambaout report`` runs.
"""

from mambaout_pl.report.html import format_number, image_html, page_html, pre_html, table_html, write_page
from mambaout_pl.report.plots import line_plot, metric_series, x_axis
from mambaout_pl.report.report import REPORT_FILE, ReportError, write_report
from mambaout_pl.report.run_folder import RunFolder, RunFolderError, per_class_scores, read_run_folder

__all__ = [
    "REPORT_FILE",
    "ReportError",
    "RunFolder",
    "RunFolderError",
    "format_number",
    "image_html",
    "line_plot",
    "metric_series",
    "page_html",
    "per_class_scores",
    "pre_html",
    "read_run_folder",
    "table_html",
    "write_page",
    "write_report",
    "x_axis",
]
