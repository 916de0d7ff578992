"""``ExportSpec`` and ``preprocessing_config`` live in :mod:`mambaout_pl.tasks.export_spec`; this path stays importable."""

from mambaout_pl.tasks.export_spec import ExportSpec, preprocessing_config

__all__ = ["ExportSpec", "preprocessing_config"]
