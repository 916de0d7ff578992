"""Multi-scale backbones for dense prediction: a list of NCHW stage outputs from ours or any timm model."""

import os
from collections.abc import Sequence
from typing import Any

import timm
import torch
from torch import nn

from .feature_pyramid import SimpleFeaturePyramid
from .registry import create_model, resolve_model
from .weights import CheckpointError

__all__ = ["FeatureBackbone", "LAST_FOUR"]

LAST_FOUR = (-4, -3, -2, -1)


class FeatureBackbone(nn.Module):
    """A backbone returning one NCHW feature map per selected stage, highest resolution first.

    Our models (`list_models()`) and models named by a dotted class path run their
    `forward_intermediates`; any other name is a timm model built with
    `timm.create_model(name, features_only=True, out_indices=...)`. Channels-last outputs (MambaOut,
    Swin and other NHWC models) are permuted to NCHW. Four maps of one stride (a plain model: Vision
    Mamba, a ViT) go through a `SimpleFeaturePyramid` to strides /4, /2, x1 and x2 of it.

    Args:
        name: A model name: ours, a dotted class path, or a timm model.
        out_indices: Stages (feature levels) to return; negative values count from the last, so the
            default is the last four (timm's ResNets have a stride-2 level before them). For one of
            our plain models (every block one level of one stride, Vision Mamba) the default takes
            four evenly spaced blocks instead, as Vim's and BEiT's dense-task backbones do.
        pretrained: A local checkpoint file to start from (ImageNet weights); None for random weights.
        drop_path_rate: Stochastic depth rate of the last block (passed only when above 0).
        simple_pyramid: Rescale the maps with a `SimpleFeaturePyramid`; None: when they are four maps
            of one stride.
        **kwargs: Further arguments of the model.

    Attributes:
        channels: Channels of each returned feature map.
        reductions: Stride of each returned feature map relative to the input.
    """

    def __init__(
        self,
        name: str,
        out_indices: Sequence[int] = LAST_FOUR,
        pretrained: str | os.PathLike | None = None,
        drop_path_rate: float = 0.0,
        simple_pyramid: bool | None = None,
        **kwargs: Any,
    ):
        super().__init__()
        if drop_path_rate > 0:
            kwargs["drop_path_rate"] = drop_path_rate
        self.name = name
        self.uses_timm_features = resolve_model(name).kind == "timm"
        if self.uses_timm_features:
            self.model = _timm_features(name, tuple(out_indices), pretrained, **kwargs)
            self.indices = list(out_indices)
            self.channels: list[int] = list(self.model.feature_info.channels())
            self.reductions: list[int] = list(self.model.feature_info.reduction())
            self.channels_last = str(getattr(self.model, "output_fmt", "NCHW")).endswith("NHWC")
        else:
            self._build_own(name, out_indices, pretrained, **kwargs)
        if simple_pyramid is None:
            simple_pyramid = len(self.reductions) == 4 and len(set(self.reductions)) == 1
        self.pyramid = SimpleFeaturePyramid(self.channels) if simple_pyramid else None
        if self.pyramid is not None:
            self.reductions = [max(1, round(r / scale)) for r, scale in zip(self.reductions, self.pyramid.scales)]

    def _build_own(
        self, name: str, out_indices: Sequence[int], pretrained: str | os.PathLike | None, **kwargs: Any
    ) -> None:
        self.model = create_model(name, pretrained=pretrained, **kwargs)
        if not hasattr(self.model, "forward_intermediates"):
            raise TypeError(
                f"Model '{name}' ({type(self.model).__name__}) has no forward_intermediates method, so its stage "
                "outputs cannot be taken; give it one (see mambaout_pl.models.MambaOut) or use a timm model name."
            )
        feature_info = getattr(self.model, "feature_info", None)
        if feature_info:
            num_stages = len(feature_info)
            if tuple(out_indices) == LAST_FOUR and num_stages > 4 and len({f["reduction"] for f in feature_info}) == 1:
                out_indices = [num_stages * quarter // 4 - 1 for quarter in (1, 2, 3, 4)]
            self.indices = _resolve_indices(out_indices, num_stages, name)
            self.channels = [feature_info[i]["num_chs"] for i in self.indices]
            self.reductions = [feature_info[i]["reduction"] for i in self.indices]
        else:
            self.indices = list(out_indices)
            self.channels, self.reductions = self._probe()
        if hasattr(self.model, "prune_intermediate_layers"):
            self.model.prune_intermediate_layers(self.indices, prune_head=True)
        self.channels_last = False

    def _probe(self) -> tuple:
        """Channels and strides of a model without `feature_info`, from one forward pass at 64x64."""
        training = self.model.training
        self.model.eval()
        with torch.no_grad():
            outputs = self._intermediates(torch.zeros(1, 3, 64, 64))
        self.model.train(training)
        return [output.shape[1] for output in outputs], [64 // output.shape[-1] for output in outputs]

    def _intermediates(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(images, indices=self.indices, intermediates_only=True)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """NCHW feature maps `[B, channels[i], H / reductions[i], W / reductions[i]]`."""
        if self.uses_timm_features:
            features = self.model(images)
        else:
            features = self._intermediates(images)
        if self.channels_last:
            features = [feature.permute(0, 3, 1, 2).contiguous() for feature in features]
        if self.pyramid is not None:
            return self.pyramid(features)
        return list(features)


def _resolve_indices(out_indices: Sequence[int], num_stages: int, name: str) -> list[int]:
    resolved = [index + num_stages if index < 0 else index for index in out_indices]
    if not resolved or not all(0 <= index < num_stages for index in resolved):
        raise ValueError(f"out_indices={list(out_indices)} do not fit the {num_stages} stages of '{name}'.")
    return resolved


def _timm_features(
    name: str,
    out_indices: tuple,
    pretrained: str | os.PathLike | None,
    **kwargs: Any,
) -> nn.Module:
    """timm's feature extractor, with weights from a local file through timm's own loader (weights only)."""
    if pretrained is None:
        return timm.create_model(name, pretrained=False, features_only=True, out_indices=out_indices, **kwargs)
    path = os.fspath(os.path.expanduser(pretrained))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint file not found: '{path}'.")
    try:
        return timm.create_model(
            name,
            pretrained=True,
            pretrained_cfg_overlay=dict(file=path),
            features_only=True,
            out_indices=out_indices,
            **kwargs,
        )
    except (RuntimeError, KeyError, ValueError, OSError) as error:
        raise CheckpointError(
            f"Cannot load '{path}' into timm's '{name}': {error}. Give a timm state dict of this model "
            "(.pth, .bin or .safetensors)."
        ) from error
