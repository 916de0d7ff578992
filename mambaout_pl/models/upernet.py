"""UperNet decode head (pyramid pooling on the last stage + FPN) and the auxiliary FCN head.

UperNet: Xiao et al., "Unified Perceptual Parsing for Scene Understanding", ECCV 2018, as
mmsegmentation's `UPerHead` and `FCNHead` build it: conv -> BatchNorm -> ReLU units (conv without
bias, Kaiming-normal initialised), bilinear resizing with `align_corners=False`, dropout 0.1 before a
1x1 classifier initialised with N(0, 0.01). Use Lightning's `sync_batchnorm` under DDP, as
mmsegmentation uses SyncBN.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvNormAct", "PyramidPooling", "UperNetHead", "FCNHead"]


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of NCHW maps to `size` (align_corners=False); a no-op when already that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvNormAct(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> ReLU."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, padding=kernel_size // 2, bias=False)
        self.norm = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")


def make_classifier(in_chs: int, num_classes: int) -> nn.Conv2d:
    """The 1x1 conv that turns features into class logits, initialised with N(0, 0.01) and zero bias."""
    conv = nn.Conv2d(in_chs, num_classes, 1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return conv


class PyramidPooling(nn.Module):
    """Average-pool to each of `scales` x `scales` bins, 1x1 conv, upsample back; returns the input and the pooled maps."""

    def __init__(self, in_chs: int, channels: int, scales: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        self.stages = nn.ModuleList(
            [nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvNormAct(in_chs, channels, 1)) for scale in scales]
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x] + [resize(stage(x), x.shape[-2:]) for stage in self.stages]


class UperNetHead(nn.Module):
    """UperNet: pyramid pooling on the last feature map, a top-down FPN, fusion of all levels, classifier.

    Args:
        in_channels: Channels of the input feature maps, highest resolution first.
        num_classes: Output classes.
        channels: Width of every internal layer (512 in the paper's UperNet).
        pool_scales: Bin counts of the pyramid pooling.
        dropout: Dropout before the classifier.
    Returns (forward):
        Logits at the resolution of the first feature map.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ):
        super().__init__()
        in_channels = list(in_channels)
        self.pyramid_pooling = PyramidPooling(in_channels[-1], channels, pool_scales)
        self.bottleneck = ConvNormAct(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList([ConvNormAct(chs, channels, 1) for chs in in_channels[:-1]])
        self.fpn_convs = nn.ModuleList([ConvNormAct(channels, channels, 3) for _ in in_channels[:-1]])
        self.fpn_bottleneck = ConvNormAct(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = make_classifier(channels, num_classes)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(feature) for conv, feature in zip(self.lateral_convs, features)]
        laterals.append(self.bottleneck(torch.cat(self.pyramid_pooling(features[-1]), dim=1)))
        for i in range(len(laterals) - 1, 0, -1):  # top-down: add each coarser level to the finer one
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
        outputs = [conv(lateral) for conv, lateral in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outputs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([resize(output, size) for output in outputs], dim=1))
        return self.classifier(self.dropout(fused))


class FCNHead(nn.Module):
    """FCN head: `num_convs` 3x3 conv units, dropout, 1x1 classifier (UperNet's auxiliary head).

    Args:
        in_chs: Channels of the input feature map.
        num_classes: Output classes.
        channels: Width of the conv units.
        num_convs: Number of conv units.
        dropout: Dropout before the classifier.
    """

    def __init__(self, in_chs: int, num_classes: int, channels: int = 256, num_convs: int = 1, dropout: float = 0.1):
        super().__init__()
        self.convs = nn.Sequential(
            *[ConvNormAct(in_chs if i == 0 else channels, channels, 3) for i in range(num_convs)]
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = make_classifier(channels if num_convs else in_chs, num_classes)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.convs(feature)))
