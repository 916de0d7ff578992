"""Export: a task checkpoint as a Hub folder (timm's format or mambaout-pl's), its model card, push to the Hub.

``mambaout_pl.export.hub`` holds the export, push and callback, ``mambaout_pl.export.deploy`` the
ONNX and ``torch.export`` files. A task says how its network is exported with an :class:`ExportSpec`
(:mod:`mambaout_pl.tasks.export_spec`, re-exported here).
"""

from mambaout_pl.tasks.export_spec import ExportSpec, preprocessing_config

__all__ = ["ExportSpec", "preprocessing_config"]
