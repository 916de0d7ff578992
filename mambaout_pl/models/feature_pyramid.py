"""A simple feature pyramid for plain backbones: four same-stride maps rescaled to strides /4, /2, x1 and x2.

Plain models (Vision Mamba, ViTs) keep one stride (16) through all their blocks, while UperNet and
Mask R-CNN's FPN expect four levels from stride 4 to 32. BEiT's and Vim's segmentation backbones
bridge the two with this neck: two transposed convolutions (x4) on the first map, one (x2) on the
second, the third as it is, a 2x2 max-pool on the fourth.
"""

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["SimpleFeaturePyramid"]


class SimpleFeaturePyramid(nn.Module):
    """Rescale four `[B, C, H, W]` maps of one stride to 4x, 2x, 1x and 0.5x their size.

    Args:
        channels: Channels of each input map (kept by the neck).
        norm_layer: Norm between the two transposed convolutions of the 4x level (BatchNorm, as BEiT's
            and Vim's; a DDP run with `sync_batchnorm` synchronises it).
    """

    scales = (4.0, 2.0, 1.0, 0.5)

    def __init__(self, channels: Sequence[int], norm_layer: type[nn.Module] = nn.BatchNorm2d):
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"A simple feature pyramid takes four maps, got {len(channels)} (channels {channels}).")
        first, second = channels[0], channels[1]
        self.upsample4 = nn.Sequential(
            nn.ConvTranspose2d(first, first, kernel_size=2, stride=2),
            norm_layer(first),
            nn.GELU(),
            nn.ConvTranspose2d(first, first, kernel_size=2, stride=2),
        )
        self.upsample2 = nn.ConvTranspose2d(second, second, kernel_size=2, stride=2)
        self.keep = nn.Identity()
        self.downsample2 = nn.MaxPool2d(kernel_size=2, stride=2)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        levels = (self.upsample4, self.upsample2, self.keep, self.downsample2)
        return [level(feature) for level, feature in zip(levels, features)]
