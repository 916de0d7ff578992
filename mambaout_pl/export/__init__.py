"""Export: a task checkpoint as a Hub folder (timm's format or mambaout-pl's), its model card, push to the Hub.

``mambaout_pl.export.hub`` holds the export, push and callback; it is imported on use so that tasks
can import :class:`ExportSpec` from here.
"""

from mambaout_pl.export.spec import ExportSpec, preprocessing_config

__all__ = ["ExportSpec", "preprocessing_config"]
