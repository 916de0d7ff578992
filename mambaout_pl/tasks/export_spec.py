"""ExportSpec: what a task tells ``mambaout export`` about its network.

Tasks return it from ``BaseTask.export_spec``; the export code reads it and names no task.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ExportSpec:
    """How a task's network is exported and published.

    Args:
        model_name: the name or dotted class path that ``mambaout_pl.models.create_model`` rebuilds it from.
        model_args: the constructor arguments (JSON-serialisable, no weights).
        pipeline_tag: the Hub pipeline tag, e.g. ``"image-classification"``.
        metrics: the Hub metric names of the model card, e.g. ``("accuracy",)``.
        timm_format: write timm's format (``timm.create_model("hf-hub:...")`` loads it) when timm can
            build ``model_name`` with these weights; otherwise, and when False, mambaout-pl's format.
        label_names: class names, index-aligned, written to ``config.json``.
        preprocessing: the input the weights expect, in timm's ``pretrained_cfg`` terms
            (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``).
        dataset: the dataset the network was trained on (a Hub id or a path).
    """

    model_name: str
    model_args: dict[str, Any]
    pipeline_tag: str
    metrics: tuple[str, ...] = ()
    timm_format: bool = False
    label_names: list[str] | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)
    dataset: str | None = None


def preprocessing_config(data_hparams: Mapping[str, Any], size_key: str) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` entries from a data module's saved hyper-parameters, the input size read from ``size_key``."""
    config: dict[str, Any] = {}
    size = data_hparams.get(size_key)
    if size:
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        config["input_size"] = (3, height, width)
    for key in ("crop_pct", "interpolation", "mean", "std"):
        if data_hparams.get(key) is not None:
            config[key] = tuple(data_hparams[key]) if isinstance(data_hparams[key], list) else data_hparams[key]
    return config
