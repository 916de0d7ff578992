"""Multi-head self-attention as a token mixer, causal or fully visible, optionally within windows."""

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AttentionMixer"]


class AttentionMixer(nn.Module):
    """Multi-head self-attention over the H*W tokens (`scaled_dot_product_attention`), no position embedding.

    Positions reach the tokens through the zero-padded convs of the stem and downsampling layers,
    as in MetaFormer's attention baselines. The block's `fc2` after the gate is the output
    projection. `causal=True` lets each token see only the tokens at or before it in raster order;
    `window_size` restricts attention to non-overlapping windows (with padding masked out), which
    large stages need: without windows, more than `max_tokens` tokens is an error.

    Args:
        dim: Channels.
        num_heads: Heads; None gives `dim // head_dim` (at least one).
        head_dim: Channels per head when `num_heads` is None.
        causal: Mask the tokens after each token in raster order (within its window, if windowed).
        window_size: Side of the square attention windows; None attends over the whole stage.
        qkv_bias: Bias in the query/key/value projection.
        max_tokens: Largest H*W attended without windows.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int | None = None,
        head_dim: int = 32,
        causal: bool = False,
        window_size: int | None = None,
        qkv_bias: bool = False,
        max_tokens: int = 4096,
    ):
        super().__init__()
        if num_heads is None:
            if head_dim < 1:
                raise ValueError(f"head_dim={head_dim} must be positive.")
            num_heads = max(1, dim // head_dim)
        if num_heads < 1 or dim % num_heads:
            raise ValueError(
                f"Attention over {dim} channels cannot use num_heads={num_heads}: choose a head count "
                f"that divides {dim}, or leave num_heads unset to get {dim} // head_dim heads."
            )
        if window_size is not None and window_size < 1:
            raise ValueError(f"window_size={window_size} must be a positive number of tokens, or None for no windows.")
        self.num_heads = num_heads
        self.causal = causal
        self.window_size = window_size
        self.max_tokens = max_tokens
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        size = self.window_size
        mask = None
        if size is None:
            if height * width > self.max_tokens:
                raise ValueError(self._too_many_tokens_message(height, width))
            grid_h, grid_w, pad_h, pad_w = 1, 1, 0, 0
            tokens = x.reshape(batch, 1, height * width, channels)
        else:
            pad_h, pad_w = -height % size, -width % size
            grid_h, grid_w = (height + pad_h) // size, (width + pad_w) // size
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
            tokens = (
                x.view(batch, grid_h, size, grid_w, size, channels)
                .permute(0, 1, 3, 2, 4, 5)
                .reshape(batch, grid_h * grid_w, size * size, channels)
            )
            if pad_h or pad_w:
                mask = self._window_mask(height, width, size, grid_h, grid_w, x.device)
        windows, length = tokens.shape[1], tokens.shape[2]

        qkv = self.qkv(tokens).view(batch * windows, length, 3, self.num_heads, channels // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [batch * windows, heads, length, head channels]
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            mask = mask.expand(batch, -1, -1, -1, -1).reshape(batch * windows, 1, length, length)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(batch, windows, length, channels)

        if size is None:
            return out.view(batch, height, width, channels)
        out = (
            out.view(batch, grid_h, grid_w, size, size, channels)
            .permute(0, 1, 3, 2, 4, 5)
            .reshape(batch, grid_h * size, grid_w * size, channels)
        )
        return out[:, :height, :width]

    def _window_mask(
        self,
        height: int,
        width: int,
        size: int,
        grid_h: int,
        grid_w: int,
        device: torch.device,
    ) -> torch.Tensor:
        """`[windows, 1, size^2, size^2]`: True where a query may attend a key (real key, causal order)."""
        real = torch.zeros(grid_h * size, grid_w * size, dtype=torch.bool, device=device)
        real[:height, :width] = True
        real = real.view(grid_h, size, grid_w, size).permute(0, 2, 1, 3).reshape(grid_h * grid_w, 1, 1, size * size)
        mask = real.expand(-1, 1, size * size, -1)
        if self.causal:
            mask = mask & torch.ones(size * size, size * size, dtype=torch.bool, device=device).tril()
        return mask

    def _too_many_tokens_message(self, height: int, width: int) -> str:
        tokens = height * width
        gigabytes = tokens * tokens * 4 / 1e9
        return (
            f"Attention over a {height}x{width} stage is {tokens} tokens, more than max_tokens={self.max_tokens}: "
            f"its score matrix alone is {gigabytes:.1f} GB per image and head in float32. Set window_size for "
            "the large stages (per stage, e.g. window_size=[8, 8, None, None]), use a smaller input, or raise "
            'max_tokens (mixer_args={"max_tokens": N}).'
        )
