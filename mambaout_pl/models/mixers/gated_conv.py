"""MambaOut's token mixer: a depthwise k x k convolution on channels-last tokens, optionally causal."""

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["KERNEL_SIZE_RANGE", "DepthwiseConvMixer"]

#: Smallest and largest kernel side the mixer takes (odd sides only).
KERNEL_SIZE_RANGE = (3, 31)


class DepthwiseConvMixer(nn.Conv2d):
    """Depthwise k x k convolution on channels-last tokens: the spatial mixer of a Gated CNN block.

    A plain `nn.Conv2d` underneath (its parameters are `weight` and `bias`), taking and returning
    `[B, H, W, C]` like any token mixer the block may hold. `kernel_size` is odd, from 3 to 31
    (MambaOut: 7). `causal=True` keeps only the kernel taps at or before the centre in raster order
    (the rows above, and the centre row up to the centre), so the output at a token depends only on
    the tokens at or before it.
    """

    def __init__(self, dim: int, kernel_size: int = 7, causal: bool = False):
        smallest, largest = KERNEL_SIZE_RANGE
        if not isinstance(kernel_size, int) or kernel_size % 2 != 1 or not smallest <= kernel_size <= largest:
            raise ValueError(
                f"kernel_size={kernel_size!r} must be an odd integer from {smallest} to {largest} (odd, so that the "
                "conv keeps the token grid; MambaOut uses 7)."
            )
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
