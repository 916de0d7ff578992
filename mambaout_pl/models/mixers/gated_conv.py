"""MambaOut's token mixer: a depthwise k x k convolution on channels-last tokens, optionally causal."""

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DepthwiseConvMixer"]


class DepthwiseConvMixer(nn.Conv2d):
    """Depthwise k x k convolution on channels-last tokens: the spatial mixer of a Gated CNN block.

    A plain `nn.Conv2d` underneath (its parameters are `weight` and `bias`), taking and returning
    `[B, H, W, C]` like any token mixer the block may hold. `causal=True` keeps only the kernel
    taps at or before the centre in raster order (the rows above, and the centre row up to the
    centre), so the output at a token depends only on the tokens at or before it.
    """

    def __init__(self, dim: int, kernel_size: int = 7, causal: bool = False):
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size={kernel_size} must be odd so the conv keeps the token grid.")
        super().__init__(dim, dim, kernel_size=kernel_size, padding=kernel_size // 2, groups=dim)
        self.causal = causal
        mask = None
        if causal:
            mask = torch.zeros(kernel_size, kernel_size)
            mask[: kernel_size // 2] = 1
            mask[kernel_size // 2, : kernel_size // 2 + 1] = 1
            mask = mask.view(1, 1, kernel_size, kernel_size)
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)
        if self.causal_mask is None:
            x = self._conv_forward(x, self.weight, self.bias)
        else:
            x = F.conv2d(x, self.weight * self.causal_mask, self.bias, padding=self.padding, groups=self.groups)
        return x.permute(0, 2, 3, 1)
