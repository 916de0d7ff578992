"""The cost axis of a comparison: parameters, GMACs and L/6D counted, training img/s and peak memory measured.

- :class:`TrainingCosts` is a callback for ``fit``: images per second over its training steps (the
  images the backbone receives, from the start to the end of each step, after a few warm-up steps),
  the peak memory (CUDA: the most allocated; CPU: the process's peak resident size) and the input
  size the backbone is given.
- :func:`network_costs` counts a task's network on the meta device at that input size: parameters,
  GMACs per image (:func:`mambaout_pl.analysis.count_macs`, scans included; a detector as the
  paper counts it, see :func:`detector_macs`), the backbone's own GMACs, and the first stage's
  tokens L, channels D and L/(6D) as ``mambaout analyze`` computes them.
"""

from __future__ import annotations

import copy
import resource
import sys
import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mambaout_pl.analysis import count_macs, long_sequence_report
from mambaout_pl.models.backbones import FeatureBackbone

__all__ = ["TrainingCosts", "backbone_of", "detector_macs", "network_costs", "peak_memory_mb"]


def backbone_of(network: nn.Module) -> nn.Module:
    """The network's ``FeatureBackbone`` (segmentors, detectors), or the network itself (classifiers)."""
    return next((module for module in network.modules() if isinstance(module, FeatureBackbone)), network)


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """The peak memory in MiB and what it measures: CUDA's most allocated, else this process's peak resident size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 2**10), "process_max_rss"


class TrainingCosts(Callback):
    """Measure a fit: training images per second, peak memory and the backbone's input size.

    Only the training steps are timed (``on_train_batch_start`` to ``on_train_batch_end``, so data
    loading and validation are left out), after ``warmup_steps`` steps; a fit with fewer steps
    leaves out only its first step, and a fit of one step times that step.
    """

    def __init__(self, warmup_steps: int = 3) -> None:
        self.warmup_steps = warmup_steps
        self.steps: list[tuple[int, float]] = []  # (images, seconds) per training step
        self.input_size: tuple[int, int] | None = None
        self._images = 0
        self._start = 0.0
        self._in_step = False
        self._hook: Any = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        network = getattr(pl_module, "model", pl_module)
        self._hook = backbone_of(network).register_forward_pre_hook(self._count_images)

    def _count_images(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        images = args[0] if args else None
        if self._in_step and isinstance(images, torch.Tensor) and images.dim() == 4:
            self._images += images.shape[0]
            if self.input_size is None:
                self.input_size = (int(images.shape[-2]), int(images.shape[-1]))

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self._images, self._in_step, self._start = 0, True, time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self._in_step = False
        self.steps.append((self._images, time.perf_counter() - self._start))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def timed_steps(self) -> list[tuple[int, float]]:
        """The steps whose images and seconds count: all but the warm-up (or but the first, or the only one)."""
        skip = self.warmup_steps if len(self.steps) > self.warmup_steps else min(1, len(self.steps) - 1)
        return self.steps[max(skip, 0) :]

    @property
    def images_per_second(self) -> float | None:
        timed = self.timed_steps()
        seconds = sum(step[1] for step in timed)
        return sum(step[0] for step in timed) / seconds if seconds > 0 else None

    def measurement(self, device: torch.device) -> dict[str, Any]:
        memory, measure = peak_memory_mb(device)
        return {
            "train_images_per_second": self.images_per_second,
            "timed_steps": len(self.timed_steps()),
            "peak_memory_mb": memory,
            "memory_measure": measure,
            "input_size": list(self.input_size) if self.input_size else None,
        }


def _flop_macs(function: Any, *args: Any) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        function(*args)
    return counter.get_total_flops() // 2


def detector_macs(detector: nn.Module, input_size: tuple[int, int]) -> tuple[int, str]:
    """MACs of one detector forward pass as the paper counts them (mmcv: convolutions and linear layers), and how.

    Backbone and FPN on the image, the RPN head on the FPN maps, the box head on the RoIs kept at
    test time and the mask head on the detections kept per image. ``detector`` is a meta-device
    ``RCNNDetector`` (torchvision's layout: ``backbone``, ``rpn``, ``roi_heads``).
    """
    detector = detector.eval()
    heads = detector.roi_heads
    image = torch.empty(1, 3, *input_size, device="meta")
    body = count_macs(detector.backbone, input_size)
    with torch.no_grad():
        features = list(detector.backbone(image).values())
    rpn = _flop_macs(detector.rpn.head, features)
    box_rois = detector.rpn.post_nms_top_n()
    channels = detector.backbone.out_channels
    box_side = heads.box_roi_pool.output_size[0]
    boxes = torch.empty(box_rois, channels, box_side, box_side, device="meta")
    box = _flop_macs(lambda x: heads.box_predictor(heads.box_head(x)), boxes)
    how = f"backbone+FPN, RPN head, box head on {box_rois} RoIs"
    mask = 0
    if heads.has_mask():
        mask_rois = heads.detections_per_img
        mask_side = heads.mask_roi_pool.output_size[0]
        masks = torch.empty(mask_rois, channels, mask_side, mask_side, device="meta")
        mask = _flop_macs(lambda x: heads.mask_predictor(heads.mask_head(x)), masks)
        how += f", mask head on {mask_rois} RoIs"
    return body + rpn + box + mask, how


def network_costs(network: nn.Module, input_size: tuple[int, int], kind: str) -> dict[str, Any]:
    """Parameters, GMACs per image (whole network and backbone) and the first stage's L/6D at ``input_size``."""
    params = sum(parameter.numel() for parameter in network.parameters())
    meta = copy.deepcopy(network).to("meta")
    backbone = backbone_of(meta)
    if kind == "detection":
        macs, counted = detector_macs(meta, input_size)
    else:
        macs, counted = count_macs(meta, input_size), "network"
    costs: dict[str, Any] = {
        "params": params,
        "gmacs": macs / 1e9,
        "gmacs_counted": counted,
        "backbone_gmacs": count_macs(backbone, input_size) / 1e9,
        "input_size": list(input_size),
        "first_stage_tokens": None,
        "first_stage_channels": None,
        "l_over_6d": None,
    }
    stages_model = backbone.model if isinstance(backbone, FeatureBackbone) else backbone
    if hasattr(stages_model, "forward_intermediates"):
        first = long_sequence_report(stages_model, {"input": tuple(input_size)})[0]
        costs.update(
            first_stage_tokens=first.tokens, first_stage_channels=first.channels, l_over_6d=first.attention_ratio
        )
    return costs
