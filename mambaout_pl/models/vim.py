"""Vision Mamba (Vim): a plain stack of bidirectional Mamba blocks over patch tokens, with a class token in the middle.

Paper: Lianghui Zhu, Bencheng Liao, Qian Zhang, Xinlong Wang, Wenyu Liu, Xinggang Wang, "Vision Mamba:
Efficient Visual Representation Learning with Bidirectional State Space Model", ICML 2024,
https://arxiv.org/abs/2401.09417

Module names, and so state-dict keys, are those of the official `vim/models_mamba.py` (hustvl/Vim):
its checkpoints, `{"model": state_dict}` (with `model_ema` beside it), load unchanged. The model is
the configuration of the paper's rows (`bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2`):
RMSNorm, a float32 residual stream, absolute position embeddings, bimamba v2 (each layer scans the
tokens forwards and backwards with its own conv, projections, `A` and `D`; the two outputs are
averaged) and one class token inserted at the middle of the patch sequence, whose final feature is
classified. The official code's other options (rotary embeddings, two class tokens, random token
orders, layer pairs) are not part of those models and not offered.

Class token position: for `num_patches` patch tokens (raster order) the class token sits at index
`num_patches // 2` of the sequence (98 of 197 at 224 x 224), for every input size. An input whose
patch grid differs from the training grid (`img_size`) gets position embeddings resampled on the fly:
the patch entries (those around index `num_patches // 2` of `pos_embed`) are resized bicubically as a
grid, and the class token keeps its own entry, placed at the middle of the new sequence. (The
official fine-tuning and segmentation code resizes `pos_embed[:, 1:]`, as for a class token at
index 0; that split does not fit these middle-token checkpoints.)
"""

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, RmsNorm, lecun_normal_, resample_abs_pos_embed, to_2tuple, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from .mixers.ssm import selective_scan
from .registry import register_model
from .weights import load_pretrained

__all__ = ["VisionMamba", "PatchEmbed", "BidirectionalMamba", "Block"]

_GLOBAL_POOLS = ("token", "avg", "")


def _cfg(**overrides: Any) -> dict[str, Any]:
    """Pre-processing and head facts of the official ImageNet-1k weights (DeiT's evaluation transform)."""
    return {
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        **overrides,
    }


class PatchEmbed(nn.Module):
    """Image to patch features with one strided conv: `[B, C, H, W]` in, `[B, embed_dim, H', W']` out."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        stride: int = 16,
        in_chans: int = 3,
        embed_dim: int = 192,
    ):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.stride = stride
        self.grid_size = self.feat_size(self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride)

    def feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """Patch grid `(rows, columns)` of an image of `img_size` `(height, width)`."""
        if img_size[0] < self.patch_size[0] or img_size[1] < self.patch_size[1]:
            raise ValueError(
                f"Image size {tuple(img_size)} is smaller than one {self.patch_size} patch; give images of at "
                f"least {self.patch_size[0]} x {self.patch_size[1]} pixels."
            )
        return tuple((size - patch) // self.stride + 1 for size, patch in zip(img_size, self.patch_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.feat_size(x.shape[-2:])
        return self.proj(x)


class BidirectionalMamba(nn.Module):
    """Mamba layer scanning the tokens both ways (the official `Mamba` with `bimamba_type='v2'`), `[B, L, C]` in and out.

    `in_proj` gives the values `x` and the gate `z`. Each direction (forward; backward on the reversed
    tokens, `*_b` parameters) runs a causal depthwise conv, SiLU, and a selective scan whose step sizes
    and `B`, `C` projections come from each token; the backward output is reversed back, the two are
    summed, gated by `silu(z)`, halved (`divide_out`) and projected by `out_proj`. Both directions go
    through one `selective_scan` call, stacked along the channels (one group of `B`, `C` each).

    Args:
        dim: Channels of the tokens.
        d_state: State size per channel (N).
        d_conv: Kernel size of the causal convs.
        expand: Inner width relative to `dim`.
        dt_rank: Rank of the step-size projections; None gives ceil(dim / 16).
        divide_out: Average the two directions (the official `if_divide_out`) instead of summing them.
        chunk_size: Tokens per chunk of the scan (see `selective_scan`); None picks by device.
        dt_min: Smallest initial step size.
        dt_max: Largest initial step size.
        dt_init_floor: Lower bound of the initial step sizes.
    """

    def __init__(
        self,
        dim: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        divide_out: bool = True,
        chunk_size: int | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
    ):
        super().__init__()
        if d_state < 1 or d_conv < 1 or expand < 1:
            raise ValueError(f"d_state={d_state}, d_conv={d_conv} and expand={expand} must be positive.")
        self.d_state = d_state
        self.d_inner = expand * dim
        self.dt_rank = dt_rank or math.ceil(dim / 16)
        self.divide_out = divide_out
        self.chunk_size = chunk_size

        # Registered in the official order, so the parameter order (and an optimizer state) is the official one.
        self.in_proj = nn.Linear(dim, 2 * self.d_inner, bias=False)
        self.conv1d = self._causal_conv(d_conv)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.A_b_log = nn.Parameter(torch.empty(self.d_inner, d_state))
        self.conv1d_b = self._causal_conv(d_conv)
        self.x_proj_b = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj_b = nn.Linear(self.dt_rank, self.d_inner)
        self.D_b = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, dim, bias=False)
        self.reset_parameters(dt_min, dt_max, dt_init_floor)

    def _causal_conv(self, kernel_size: int) -> nn.Conv1d:
        # Padded on both sides; the first `length` outputs are the causal ones.
        return nn.Conv1d(self.d_inner, self.d_inner, kernel_size, groups=self.d_inner, padding=kernel_size - 1)

    def reset_parameters(self, dt_min: float = 1e-3, dt_max: float = 1e-1, dt_init_floor: float = 1e-4) -> None:
        """Mamba's initialisation: `A = -(1..N)`, `D = 1`, step sizes log-uniform in [dt_min, dt_max]."""
        with torch.no_grad():
            for dt_proj in (self.dt_proj, self.dt_proj_b):
                nn.init.uniform_(dt_proj.weight, -(self.dt_rank**-0.5), self.dt_rank**-0.5)
                dt = torch.exp(torch.rand_like(dt_proj.bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
                dt = dt.clamp(min=dt_init_floor)
                dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
            for A_log in (self.A_log, self.A_b_log):
                A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand_as(A_log))
            self.D.fill_(1.0)
            self.D_b.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        values, gate = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # [B, d_inner, L] each
        directions = (
            (values, self.conv1d, self.x_proj, self.dt_proj),
            (values.flip(-1), self.conv1d_b, self.x_proj_b, self.dt_proj_b),
        )
        inputs, deltas, input_projections, output_projections = [], [], [], []
        for sequence, conv, x_proj, dt_proj in directions:
            u = F.silu(conv(sequence)[..., :length])
            dt, B, C = x_proj(u.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
            inputs.append(u)
            deltas.append(F.linear(dt, dt_proj.weight).transpose(1, 2))  # its bias is the scan's delta_bias
            input_projections.append(B.transpose(1, 2))
            output_projections.append(C.transpose(1, 2))

        y = selective_scan(
            u=torch.cat(inputs, dim=1),
            delta=torch.cat(deltas, dim=1),
            A=-torch.exp(torch.cat([self.A_log, self.A_b_log]).float()),
            B=torch.stack(input_projections, dim=1),  # [B, 2, N, L]: one group per direction
            C=torch.stack(output_projections, dim=1),
            D=torch.cat([self.D, self.D_b]).float(),
            delta_bias=torch.cat([self.dt_proj.bias, self.dt_proj_b.bias]).float(),
            delta_softplus=True,
            chunk_size=self.chunk_size,
        )
        forward_y, backward_y = y.chunk(2, dim=1)
        y = (forward_y + backward_y.flip(-1)) * F.silu(gate)
        if self.divide_out:
            y = y / 2
        return self.out_proj(y.transpose(1, 2))


class Block(nn.Module):
    """`norm -> mixer` on the residual stream `[B, L, C]`; the model adds the output back to the stream.

    `drop_path` is the stochastic depth of the *previous* block's output as it joins the stream in
    front of this block, where the official block applies it: block i's output is dropped at rate
    `linspace(0, drop_path_rate, depth)[i]`, the last block's by `VisionMamba.drop_path`.
    """

    def __init__(
        self,
        dim: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        divide_out: bool = True,
        norm_eps: float = 1e-5,
        drop_path: float = 0.0,
        chunk_size: int | None = None,
    ):
        super().__init__()
        self.mixer = BidirectionalMamba(
            dim,
            d_state=d_state,
            d_conv=d_conv,
            expand=expand,
            dt_rank=dt_rank,
            divide_out=divide_out,
            chunk_size=chunk_size,
        )
        self.norm = RmsNorm(dim, eps=norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        return self.mixer(self.norm(residual.to(self.norm.weight.dtype)))


class VisionMamba(nn.Module):
    """Vision Mamba image classifier and plain (single-scale) backbone.

    Tokens: patch features in raster order with the class token inserted at index `num_patches // 2`,
    plus position embeddings. The residual stream (float32 with `residual_in_fp32`) passes through
    `depth` blocks, each adding `mixer(norm(stream))`; `norm_f` normalises the final stream and the
    head classifies the class token's feature.

    Args:
        img_size: Training image size; inputs of other sizes get resampled position embeddings.
        patch_size: Patch size of the patch embedding.
        stride: Stride of the patch embedding (the official stride-8 models overlap their patches).
        in_chans: Input image channels.
        num_classes: Classifier outputs; 0 leaves the model without a classifier.
        global_pool: Head input: 'token' (the class token, as the official model), 'avg' (mean of the
            patch tokens) or '' (every token).
        embed_dim: Channels of the tokens.
        depth: Number of blocks.
        d_state: SSM state size per channel.
        d_conv: Kernel size of the causal convs of the mixers.
        expand: Mixer inner width relative to `embed_dim`.
        dt_rank: Rank of the step-size projections; None gives ceil(embed_dim / 16).
        divide_out: Average the two scan directions of each mixer (the official `if_divide_out`).
        residual_in_fp32: Keep the residual stream in float32 whatever the model's dtype.
        norm_eps: Epsilon of the RMS norms.
        drop_rate: Dropout after adding the position embeddings (the official `pos_drop`).
        drop_path_rate: Stochastic depth rate of the last block's output, rising linearly from 0.
        chunk_size: Tokens per chunk of the scans (see `selective_scan`); None picks by device.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        stride: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 192,
        depth: int = 24,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        divide_out: bool = True,
        residual_in_fp32: bool = True,
        norm_eps: float = 1e-5,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        chunk_size: int | None = None,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}.")
        self.num_classes = num_classes
        self.global_pool = _check_global_pool(global_pool)
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.residual_in_fp32 = residual_in_fp32
        self.grad_checkpointing = False
        self.pretrained_cfg = self.default_cfg = _cfg()

        # Registered in the official order (state-dict and parameter order).
        self.patch_embed = PatchEmbed(img_size, patch_size, stride, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.layers = nn.ModuleList(
            [
                Block(
                    embed_dim,
                    d_state=d_state,
                    d_conv=d_conv,
                    expand=expand,
                    dt_rank=dt_rank,
                    divide_out=divide_out,
                    norm_eps=norm_eps,
                    drop_path=rates[i - 1] if i > 0 else 0.0,
                    chunk_size=chunk_size,
                )
                for i in range(depth)
            ]
        )
        self.norm_f = RmsNorm(embed_dim, eps=norm_eps)
        self.feature_info = [dict(num_chs=embed_dim, reduction=stride, module=f"layers.{i}") for i in range(depth)]
        self._init_weights()

    def _init_weights(self) -> None:
        """The official initialisation (DeiT's for the embeddings and head, GPT-2's scaled output projections)."""
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for layer in self.layers:
            nn.init.kaiming_uniform_(layer.mixer.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                layer.mixer.out_proj.weight /= math.sqrt(len(self.layers))

    def no_weight_decay(self) -> set[str]:
        """Parameters kept out of weight decay: the embeddings and each mixer's `A_log`, `A_b_log`, `D`, `D_b`.

        The SSM parameters are the ones Mamba marks `_no_weight_decay`. (The official training builds
        its optimizer with timm's `create_optimizer`, which does not read that mark, so it decays the
        two-dimensional `A_log` and `A_b_log`.)
        """
        names = {"pos_embed", "cls_token"}
        ssm = ("A_log", "A_b_log", "D", "D_b")
        return names | {name for name, _ in self.named_parameters() if name.rpartition(".")[2] in ssm}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter-name patterns ordering the layers from input to output (for layer-wise lr decay)."""
        return dict(
            stem=r"^cls_token|^pos_embed|^patch_embed",
            blocks=[(r"^layers\.(\d+)", None), (r"^norm_f", (99999,))],
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass (training only) to save memory."""
        self.grad_checkpointing = enable

    def shard_units(self) -> list[nn.Module]:
        """The blocks, the units a sharded (FSDP2) run gathers one at a time."""
        return list(self.layers)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a freshly initialised one of `num_classes` outputs (0: none)."""
        if global_pool is not None:
            self.global_pool = _check_global_pool(global_pool)
        self.num_classes = num_classes
        if num_classes > 0:
            reference = self.pos_embed
            head = nn.Linear(self.num_features, num_classes, device=reference.device, dtype=reference.dtype)
            trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
            self.head = head
        else:
            self.head = nn.Identity()

    @staticmethod
    def class_token_index(num_patches: int) -> int:
        """Index of the class token in a sequence of `num_patches` patch tokens plus the class token."""
        return num_patches // 2

    def _pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position embeddings for a `grid` of patches: the trained ones, or resampled to another grid."""
        train_grid = self.patch_embed.grid_size
        if tuple(grid) == tuple(train_grid):
            return self.pos_embed
        middle = self.class_token_index(self.patch_embed.num_patches)
        cls_pos = self.pos_embed[:, middle : middle + 1]
        patch_pos = torch.cat([self.pos_embed[:, :middle], self.pos_embed[:, middle + 1 :]], dim=1)
        patch_pos = resample_abs_pos_embed(
            patch_pos, new_size=list(grid), old_size=list(train_grid), num_prefix_tokens=0, antialias=False
        )
        new_middle = self.class_token_index(grid[0] * grid[1])
        return torch.cat([patch_pos[:, :new_middle], cls_pos, patch_pos[:, new_middle:]], dim=1)

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Tokens `[B, num_patches + 1, C]` with the class token in the middle and positions added; the grid."""
        x = self.patch_embed(x)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        middle = self.class_token_index(grid[0] * grid[1])
        cls_token = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :middle], cls_token, x[:, middle:]], dim=1)
        return self.pos_drop(x + self._pos_embed_for(grid)), grid

    def _output_drop_path(self, index: int) -> nn.Module:
        """Stochastic depth of block `index`'s output (the next block's `drop_path`, or the model's after the last)."""
        return self.layers[index + 1].drop_path if index + 1 < len(self.layers) else self.drop_path

    def _run_block(self, index: int, stream: torch.Tensor) -> torch.Tensor:
        """The residual stream after block `index`."""
        layer = self.layers[index]
        if self.grad_checkpointing and self.training and torch.is_grad_enabled() and not torch.jit.is_scripting():
            hidden = checkpoint(layer, stream, use_reentrant=False)
        else:
            hidden = layer(stream)
        return stream + self._output_drop_path(index)(hidden)

    def _stream(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() if self.residual_in_fp32 else x

    def _block_indices(self, indices: int | Sequence[int] | None) -> list[int]:
        """Blocks to take: four evenly spaced if None (the last of each quarter), the last n if an int, else these."""
        depth = len(self.layers)
        if indices is None:
            count = min(4, depth)
            return [(k + 1) * depth // count - 1 for k in range(count)]
        if isinstance(indices, int):
            if not 0 < indices <= depth:
                raise ValueError(f"Cannot take the last {indices} of {depth} blocks.")
            return list(range(depth - indices, depth))
        resolved = [i + depth if i < 0 else i for i in indices]
        if not resolved or not all(0 <= i < depth for i in resolved):
            raise ValueError(f"Block indices {list(indices)} out of range for {depth} blocks.")
        return resolved

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Patch features of selected blocks for dense prediction, at the patch stride.

        Each intermediate is the residual stream after the block (its input plus its output), the
        tensor the official model normalises next (the following block's norm, or `norm_f` after the
        last): the stream carries the whole representation, a mixer output only its update. (The
        official segmentation backbone takes the mixer outputs by default.) The class token is dropped.

        Args:
            x: Images `[B, C, H, W]`.
            indices: Blocks to take: four evenly spaced if None ((5, 11, 17, 23) for depth 24), the
                last n if an int, else these block indices (negative ones count from the end).
            norm: Apply `norm_f` to each intermediate.
            stop_early: Skip the blocks after the last requested one.
            output_fmt: 'NCHW' (`[B, C, H', W']`) or 'NLC' (`[B, H' * W', C]`).
            intermediates_only: Return only the intermediates.
        Returns:
            The intermediates, or `(final normalised tokens [B, L, C], intermediates)`.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got '{output_fmt}'.")
        take_indices = self._block_indices(indices)
        last_index = max(take_indices) if stop_early or intermediates_only else len(self.layers) - 1

        tokens, grid = self._embed(x)
        middle = self.class_token_index(grid[0] * grid[1])
        stream = self._stream(tokens)
        intermediates = []
        for i in range(last_index + 1):
            stream = self._run_block(i, stream)
            if i in take_indices:
                feature = self.norm_f(stream.to(self.pos_embed.dtype)) if norm else stream
                feature = torch.cat([feature[:, :middle], feature[:, middle + 1 :]], dim=1)
                if output_fmt == "NCHW":
                    feature = feature.transpose(1, 2).reshape(x.shape[0], -1, *grid).contiguous()
                intermediates.append(feature)
        if intermediates_only:
            return intermediates
        return self.norm_f(stream.to(self.pos_embed.dtype)), intermediates

    def prune_intermediate_layers(
        self,
        indices: int | Sequence[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the blocks after the last of `indices` (and `norm_f`, the head if asked); returns the kept indices.

        `feature_info` keeps describing all blocks, as timm's.
        """
        take_indices = self._block_indices(indices)
        self.layers = self.layers[: max(take_indices) + 1]
        if prune_norm:
            self.norm_f = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised tokens `[B, num_patches + 1, C]`, the class token at index `num_patches // 2`."""
        stream = self._stream(self._embed(x)[0])
        for i in range(len(self.layers)):
            stream = self._run_block(i, stream)
        return self.norm_f(stream.to(self.pos_embed.dtype))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool:
            middle = self.class_token_index(x.shape[1] - 1)
            if self.global_pool == "token":
                x = x[:, middle]
            else:
                x = torch.cat([x[:, :middle], x[:, middle + 1 :]], dim=1).mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _check_global_pool(global_pool: str) -> str:
    if global_pool not in _GLOBAL_POOLS:
        raise ValueError(f"Unknown global_pool '{global_pool}', expected 'token', 'avg' or '' (none).")
    return global_pool


def _create_vim(pretrained: str | os.PathLike | None, **kwargs: Any) -> VisionMamba:
    if pretrained is not None and not isinstance(pretrained, (str, os.PathLike)):
        raise ValueError(
            f"pretrained must be the path of a checkpoint file or export folder, `hf-hub:user/repo` or None, "
            f"got {pretrained!r}."
        )
    model = VisionMamba(**kwargs)
    if pretrained:
        load_pretrained(model, pretrained)
    return model


# The paper's models. Default drop path rates: those of the official ImageNet training scripts.


@register_model
def vim_tiny(pretrained: str | os.PathLike | None = None, **kwargs: Any) -> VisionMamba:
    """Vim-Ti: embed dim 192, 24 blocks, 7.1M params."""
    args = dict(patch_size=16, embed_dim=192, depth=24, drop_path_rate=0.0)
    return _create_vim(pretrained, **dict(args, **kwargs))


@register_model
def vim_small(pretrained: str | os.PathLike | None = None, **kwargs: Any) -> VisionMamba:
    """Vim-S: embed dim 384, 24 blocks, 25.8M params."""
    args = dict(patch_size=16, embed_dim=384, depth=24, drop_path_rate=0.05)
    return _create_vim(pretrained, **dict(args, **kwargs))


# The official names.
register_model("vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2")(vim_tiny)
register_model("vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2")(vim_small)
