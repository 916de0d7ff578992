"""A trained network ready to predict one image: loaded from a task checkpoint or an export folder.

``load_predictor(source)`` reads either what ``mambaout fit`` writes (a ``.ckpt``: the task, its
settings and its data module's pre-processing) or what ``mambaout export`` writes (a folder with
``config.json``), and returns the predictor of the network's kind:

- :class:`Classifier`: the most probable classes with their probabilities (timm's eval transform);
- :class:`Segmenter`: a label map at the image's size (the data module's eval rescale, whole or
  sliding-window inference as the task was set);
- :class:`Detector`: boxes, labels, scores (and masks) of an ``RCNNDetector``.

Both sources are data: names in them resolve through the registry's allow-list, as ``mambaout
export`` and ``from_pretrained`` do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torch import nn

from mambaout_pl.data.segmentation_transforms import create_segmentation_transforms
from mambaout_pl.export.hub import read_task_checkpoint, task_from_checkpoint
from mambaout_pl.export.spec import preprocessing_config
from mambaout_pl.models.detector import RCNNDetector
from mambaout_pl.models.inference import segment
from mambaout_pl.models.registry import from_pretrained
from mambaout_pl.models.segmentor import UperNetSegmentor

__all__ = ["Classifier", "Detector", "Predictor", "Segmenter", "load_predictor"]


@dataclass
class Predictor:
    """A network in eval mode with its class names and the pre-processing it was trained with.

    ``label_names`` are index-aligned with the network's outputs (detection: labels 1..K);
    ``preprocessing`` holds timm ``pretrained_cfg`` entries (``input_size``, ``mean``, ``std``,
    ``interpolation``, ``crop_pct``) and, for segmentation, the data module's ``resize_scale``.
    """

    network: nn.Module
    label_names: list[str] | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    kind: str = "classification"  # or "segmentation", "detection"

    def name_of(self, index: int) -> str:
        names = self.label_names
        return names[index] if names and 0 <= index < len(names) else str(index)


@dataclass
class Classifier(Predictor):
    """Top classes of an image."""

    def __post_init__(self) -> None:
        given = {key: tuple(value) if isinstance(value, list) else value for key, value in self.preprocessing.items()}
        config = resolve_data_config(given, model=self.network)
        self.transform = create_transform(**config, is_training=False)

    @torch.inference_mode()
    def probabilities(self, image: Image.Image) -> torch.Tensor:
        """Class probabilities ``[num_classes]`` of ``image`` (RGB)."""
        logits = self.network(self.transform(image)[None])
        return logits.float().softmax(dim=-1)[0]

    def top_classes(self, image: Image.Image, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` most probable ``(class name, probability)``, most probable first."""
        probabilities = self.probabilities(image)
        values, indices = probabilities.topk(min(k, probabilities.numel()))
        return [(self.name_of(index), value) for index, value in zip(indices.tolist(), values.tolist())]


@dataclass
class Segmenter(Predictor):
    """A label map of an image at its own size.

    ``inference``: ``{"mode", "crop_size", "stride"}`` of :func:`~mambaout_pl.models.inference.segment`.
    """

    inference: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        preprocessing = self.preprocessing
        scale = preprocessing.get("resize_scale")
        if scale is None:  # an export: fit the shorter side to the training crop, as ADE20K's 2048x512 does
            _, height, width = preprocessing.get("input_size", (3, 512, 512))
            scale = (4 * max(height, width), min(height, width))
        self.transform = create_segmentation_transforms(
            training=False,
            scale=tuple(scale),
            mean=tuple(preprocessing.get("mean", (0.485, 0.456, 0.406))),
            std=tuple(preprocessing.get("std", (0.229, 0.224, 0.225))),
        )

    @torch.inference_mode()
    def label_map(self, image: Image.Image) -> np.ndarray:
        """The most probable class of each pixel, ``[H, W]`` int64 at ``image``'s size."""
        pixels = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
        normalised, _ = self.transform(pixels)
        scores = segment(self.network, normalised[None], (image.height, image.width), **self.inference)
        return scores[0].argmax(dim=0).numpy()


@dataclass
class Detector(Predictor):
    """Objects of an image: ``boxes`` (XYXY pixels), ``labels`` (1..K), ``scores`` and, for Mask R-CNN, ``masks``."""

    @torch.inference_mode()
    def objects(self, image: Image.Image) -> dict[str, torch.Tensor]:
        pixels = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).float() / 255.0
        return self.network([pixels])[0]

    def names(self) -> dict[int, str]:
        """``{label: name}`` of labels 1..K."""
        return {index + 1: name for index, name in enumerate(self.label_names or [])}


def load_predictor(source: str | os.PathLike) -> Predictor:
    """The predictor of a task checkpoint (a ``.ckpt`` file) or an export folder (with ``config.json``)."""
    path = Path(source)
    if path.is_dir():
        return _from_export(path)
    if path.is_file():
        return _from_checkpoint(path)
    raise FileNotFoundError(
        f"'{source}' does not exist: give a checkpoint written by `mambaout fit` (runs/.../checkpoints/*.ckpt) "
        "or a folder written by `mambaout export`."
    )


def _from_checkpoint(path: Path) -> Predictor:
    checkpoint = read_task_checkpoint(path)
    task = task_from_checkpoint(checkpoint, path)
    data_hparams = checkpoint.get("datamodule_hyper_parameters", {}) or {}
    hparams = task.hparams
    network = task.model.eval()
    if isinstance(network, UperNetSegmentor):
        preprocessing = preprocessing_config(data_hparams, size_key="crop_size")
        if data_hparams.get("resize_scale"):
            preprocessing["resize_scale"] = tuple(data_hparams["resize_scale"])
        inference = {
            "mode": hparams.get("inference", "whole"),
            "crop_size": tuple(hparams.get("slide_crop_size", (512, 512))),
            "stride": tuple(hparams.get("slide_stride", (341, 341))),
        }
        return _build(network, hparams.get("label_names"), preprocessing, str(path), inference)
    preprocessing = preprocessing_config(data_hparams, size_key="image_size")
    return _build(network, hparams.get("label_names"), preprocessing, str(path))


def _from_export(folder: Path) -> Predictor:
    network = from_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    preprocessing = dict(config.get("pretrained_cfg") or {})
    keep = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
    preprocessing = {key: value for key, value in preprocessing.items() if key in keep and value is not None}
    return _build(network, config.get("label_names"), preprocessing, str(folder))


def _build(
    network: nn.Module,
    label_names: Sequence[str] | None,
    preprocessing: Mapping[str, Any],
    source: str,
    inference: Mapping[str, Any] | None = None,
) -> Predictor:
    names = [str(name) for name in label_names] if label_names else None
    common = dict(network=network.eval(), label_names=names, preprocessing=dict(preprocessing), source=source)
    if isinstance(network, RCNNDetector):
        return Detector(**common, kind="detection")
    if isinstance(network, UperNetSegmentor):
        return Segmenter(**common, kind="segmentation", inference=dict(inference or {}))
    return Classifier(**common, kind="classification")
