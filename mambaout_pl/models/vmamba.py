"""VMamba: visual state-space models that scan the token grid in four directions (SS2D).

Paper: Yue Liu, Yunjie Tian, Yuzhong Zhao, Hongtian Yu, Lingxi Xie, Yaowei Wang, Qixiang Ye,
Jianbin Jiao, Yunfan Liu, "VMamba: Visual State Space Model", NeurIPS 2024,
https://arxiv.org/abs/2401.10166. Official code: https://github.com/MzeroMiko/VMamba (`vmamba.py`).

Two forward types of the official code are built here, the ones of the published models:

- 'v0' (`vanilla_vmamba_*`, the paper's VMamba-T/S/B): channels-last blocks of one SS2D mixer
  with a SiLU gate `z`, Swin's patch merging between stages, no MLP.
- 'v05_noz' (`vmamba_*_s1l8` / `_s2l15`, VMambaV9 in the MambaOut paper): channels-first blocks of
  an ungated SS2D mixer then an MLP, overlapping conv stem and conv downsampling.
  'v05' is the same mixer with the gate.

SS2D reads the feature map in four orders (rows, columns, and both reversed), runs one selective
scan over the four sequences stacked along the channels (`selective_scan` with `groups=4`: each
direction has its own projections, `A` and `D`), and sums the four outputs back on the grid.

The class is `VSSM`, as in the official code: its constructor takes the official arguments
(`ssm_d_state`, `forward_type`, `downsample_version`, ...) so an official config maps onto it
unchanged, and module names, and so state-dict keys, are the official ones.
"""

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm2d, get_act_layer, trunc_normal_
from timm.models import build_model_with_cfg
from torch import nn
from torch.utils.checkpoint import checkpoint

from .mixers.ssm import selective_scan
from .registry import register_model
from .weights import pretrained_builder

__all__ = [
    "VSSM",
    "VSSLayer",
    "VSSBlock",
    "SS2Dv0",
    "SS2D",
    "ChannelLinear",
    "PatchMerge",
    "Mlp",
    "VSSMClassifier",
    "FORWARD_TYPES",
    "cross_scan",
    "cross_merge",
    "checkpoint_filter_fn",
]

#: Forward types built here: the vanilla mixer, and the later mixer with and without its gate.
FORWARD_TYPES = ("v0", "v05", "v05_noz")
NUM_DIRECTIONS = 4
_NORM_LAYERS = {"ln": False, "ln2d": True}  # norm_layer -> channels-first layout

LayerType = str | Callable[..., nn.Module]


def _cfg(url: str = "", **overrides: Any) -> dict[str, Any]:
    """Pre-processing and head facts of the official ImageNet-1k weights (the official evaluation transform)."""
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.0",
        "classifier": "classifier.head",
        "license": "mit",
        "paper_ids": "arXiv:2401.10166",
        "origin_url": "https://github.com/MzeroMiko/VMamba",
        **overrides,
    }


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """The four token orders of a `[B, C, H, W]` map: `[B, 4, C, H*W]` rows, columns, rows reversed, columns reversed."""
    rows = x.flatten(2)
    columns = x.transpose(2, 3).flatten(2)
    return torch.stack([rows, columns, rows.flip(-1), columns.flip(-1)], dim=1)


def cross_merge(ys: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Sum `[B, 4, C, H*W]` sequences in `cross_scan`'s orders back onto the grid, as `[B, C, H*W]` in row order."""
    ys = ys[:, :2] + ys[:, 2:].flip(-1)
    columns = ys[:, 1].unflatten(-1, (width, height)).transpose(-1, -2).flatten(-2)
    return ys[:, 0] + columns


class ChannelLinear(nn.Linear):
    """A linear map over dim 1 of `[B, C, H, W]` or `[B, C, L]` inputs, computed as a 1x1 convolution.

    The weight keeps nn.Linear's `[out_features, in_features]` shape. With `groups > 1` the input has
    `groups * in_features` channels in `groups` consecutive blocks, block `k` mapped by rows
    `k * out_features / groups ...` of the weight.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, groups: int = 1):
        super().__init__(in_features, out_features, bias=bias)
        if out_features % groups:
            raise ValueError(f"out_features={out_features} must be a multiple of groups={groups}.")
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            return F.conv2d(x, self.weight[:, :, None, None], self.bias, groups=self.groups)
        return F.conv1d(x, self.weight[:, :, None], self.bias, groups=self.groups)


class Permute(nn.Module):
    """`x.permute(*dims)` as a layer (no parameters)."""

    def __init__(self, *dims: int):
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


class PatchMerge(nn.Module):
    """Swin's patch merging: each 2x2 patch's four tokens concatenated along the channels, halving H and W.

    The order is (even row, even column), (odd, even), (even, odd), (odd, odd). An odd height or
    width gets one zero row or column at the bottom or right first (as Swin pads).
    """

    def __init__(self, channels_first: bool = False):
        super().__init__()
        self.channels_first = channels_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.channels_first:
            x = x.permute(0, 3, 1, 2)
        height, width = x.shape[-2:]
        if height % 2 or width % 2:
            x = F.pad(x, (0, width % 2, 0, height % 2))
        x = torch.cat([x[..., 0::2, 0::2], x[..., 1::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 1::2]], dim=1)
        return x if self.channels_first else x.permute(0, 2, 3, 1)


class Mlp(nn.Module):
    """`fc1 -> act -> dropout -> fc2 -> dropout`, channels-last or (with `ChannelLinear`) channels-first."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
        channels_first: bool = False,
    ):
        super().__init__()
        linear = ChannelLinear if channels_first else nn.Linear
        self.fc1 = linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def _layer_norm(dim: int, channels_first: bool) -> nn.Module:
    """LayerNorm over the channels (eps 1e-5, as nn.LayerNorm), of NCHW or NHWC inputs."""
    return LayerNorm2d(dim, eps=1e-5) if channels_first else nn.LayerNorm(dim)


def _step_size_bias(size: int, dt_min: float, dt_max: float, dt_init_floor: float) -> torch.Tensor:
    """Biases whose softplus (the initial step sizes) are log-uniform in [dt_min, dt_max] (Mamba's init)."""
    dt = torch.exp(torch.rand(size) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))  # the inverse of softplus


class _SS2DBase(nn.Module):
    """What the SS2D mixers share: `A_logs`, `Ds`, `dt_projs_bias` and the four-direction selective scan."""

    d_inner: int
    d_state: int
    dt_rank: int

    def _init_scan_parameters(
        self,
        initialize: str,
        dt_min: float,
        dt_max: float,
        dt_init_floor: float,
    ) -> None:
        """Mamba's initialisation ('v0': `A = -(1..N)`, `D = 1`, log-uniform step sizes) or the official 'v1' / 'v2'."""
        channels = NUM_DIRECTIONS * self.d_inner
        with torch.no_grad():
            self.Ds.fill_(1.0)
            if initialize == "v0":
                states = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_logs.device)
                self.A_logs.copy_(torch.log(states).expand(channels, -1))
                self.dt_projs_bias.copy_(
                    _step_size_bias(channels, dt_min, dt_max, dt_init_floor).view(NUM_DIRECTIONS, -1)
                )
            elif initialize == "v1":
                self.A_logs.normal_()
                self.dt_projs_bias.normal_(std=0.1)
            elif initialize == "v2":
                self.A_logs.zero_()
                self.dt_projs_bias.uniform_(0.0, 0.1)
            else:
                raise ValueError(f"Unknown ssm_init '{initialize}', expected 'v0', 'v1' or 'v2'.")

    def _scan(self, xs: torch.Tensor, dts: torch.Tensor, Bs: torch.Tensor, Cs: torch.Tensor) -> torch.Tensor:
        """Selective scan of the four sequences `xs`, `dts` `[B, 4 * d_inner, L]`; float32 `[B, 4, d_inner, L]`.

        The output stays in float32 into the mixer's norm (in the norm's dtype when that is lower,
        as in a model cast to half precision), as the official mixers keep it.
        """
        batch, _, length = xs.shape
        ys = selective_scan(
            u=xs.float(),
            delta=dts,
            A=-torch.exp(self.A_logs.float()),
            B=Bs,
            C=Cs,
            D=self.Ds.float(),
            delta_bias=self.dt_projs_bias.float().view(-1),
            delta_softplus=True,
        )
        return ys.view(batch, NUM_DIRECTIONS, -1, length)


class SS2Dv0(_SS2DBase):
    """The vanilla VMamba mixer (forward type 'v0'), channels-last `[B, H, W, C]` in and out.

    `in_proj` -> (x, z); x: depthwise conv -> act -> four-direction selective scan -> LayerNorm;
    `out_proj(y * act(z))`. The per-direction projections are stacked parameters
    (`x_proj_weight` `[4, dt_rank + 2 * d_state, d_inner]`, `dt_projs_weight` `[4, d_inner, dt_rank]`).
    """

    def __init__(
        self,
        d_model: int = 96,
        d_state: int = 16,
        ssm_ratio: float = 2.0,
        dt_rank: int | str = "auto",
        act_layer: type[nn.Module] = nn.SiLU,
        d_conv: int = 3,
        conv_bias: bool = True,
        dropout: float = 0.0,
        bias: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
    ):
        super().__init__()
        self.d_state = d_state
        self.d_inner = int(ssm_ratio * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        projections = self.dt_rank + 2 * d_state
        # the parameters first, then the layers: the official registration order
        self.x_proj_weight = nn.Parameter(torch.empty(NUM_DIRECTIONS, projections, self.d_inner))
        self.A_logs = nn.Parameter(torch.empty(NUM_DIRECTIONS * self.d_inner, d_state))
        self.Ds = nn.Parameter(torch.empty(NUM_DIRECTIONS * self.d_inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(NUM_DIRECTIONS, self.d_inner, self.dt_rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(NUM_DIRECTIONS, self.d_inner))

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.act = act_layer()
        self.conv2d = nn.Conv2d(
            self.d_inner,
            self.d_inner,
            kernel_size=d_conv,
            padding=(d_conv - 1) // 2,
            groups=self.d_inner,
            bias=conv_bias,
        )
        self.out_norm = nn.LayerNorm(self.d_inner)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0.0 else nn.Identity()

        with torch.no_grad():
            # nn.Linear's default init for the input projections, Mamba's for the step-size projections
            bound = self.d_inner**-0.5
            self.x_proj_weight.uniform_(-bound, bound)
            dt_std = dt_scale * self.dt_rank**-0.5
            self.dt_projs_weight.uniform_(-dt_std, dt_std)
        self._init_scan_parameters("v0", dt_min, dt_max, dt_init_floor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        x, z = self.in_proj(x).chunk(2, dim=-1)
        z = self.act(z)
        x = self.act(self.conv2d(x.permute(0, 3, 1, 2)))

        xs = cross_scan(x)  # [B, 4, d_inner, L]
        projected = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)
        dts, Bs, Cs = torch.split(projected, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)
        ys = self._scan(xs.flatten(1, 2), dts.flatten(1, 2).float(), Bs.float(), Cs.float())

        y = cross_merge(ys, height, width).transpose(1, 2)  # [B, L, d_inner]
        y = self.out_norm(y.to(self.out_norm.weight.dtype)).view(batch, height, width, -1)
        return self.dropout(self.out_proj(y * z))


class SS2D(_SS2DBase):
    """The later VMamba mixer (forward types 'v05' and 'v05_noz'), channels-first or channels-last.

    `in_proj` -> x (and a gate z unless `gate=False`); x: depthwise conv (if `d_conv > 1`) -> act ->
    four-direction selective scan -> LayerNorm; `out_proj(y)` or `out_proj(y * act(z))`. The
    per-direction projections are grouped linear layers (`x_proj`, `dt_projs`, 4 groups).
    """

    def __init__(
        self,
        d_model: int = 96,
        d_state: int = 16,
        ssm_ratio: float = 2.0,
        dt_rank: int | str = "auto",
        act_layer: type[nn.Module] = nn.SiLU,
        d_conv: int = 3,
        conv_bias: bool = True,
        dropout: float = 0.0,
        bias: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        initialize: str = "v0",
        gate: bool = True,
        channels_first: bool = False,
    ):
        super().__init__()
        self.d_state = d_state
        self.d_inner = int(ssm_ratio * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.gate = gate
        self.channels_first = channels_first
        linear = ChannelLinear if channels_first else nn.Linear
        # registered in the official order (parameters, then layers)
        self.A_logs = nn.Parameter(torch.empty(NUM_DIRECTIONS * self.d_inner, d_state))
        self.Ds = nn.Parameter(torch.empty(NUM_DIRECTIONS * self.d_inner))
        self.dt_projs_bias = nn.Parameter(torch.empty(NUM_DIRECTIONS, self.d_inner))
        self.out_norm = _layer_norm(self.d_inner, channels_first)
        self.in_proj = linear(d_model, self.d_inner * (2 if gate else 1), bias=bias)
        self.act = act_layer()
        self.conv2d = None
        if d_conv > 1:
            self.conv2d = nn.Conv2d(
                self.d_inner,
                self.d_inner,
                kernel_size=d_conv,
                padding=(d_conv - 1) // 2,
                groups=self.d_inner,
                bias=conv_bias,
            )
        projections = self.dt_rank + 2 * d_state
        self.x_proj = ChannelLinear(self.d_inner, NUM_DIRECTIONS * projections, bias=False, groups=NUM_DIRECTIONS)
        self.dt_projs = ChannelLinear(self.dt_rank, NUM_DIRECTIONS * self.d_inner, bias=False, groups=NUM_DIRECTIONS)
        self.out_proj = linear(self.d_inner, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0.0 else nn.Identity()
        with torch.no_grad():
            dt_std = dt_scale * self.dt_rank**-0.5
            self.dt_projs.weight.uniform_(-dt_std, dt_std)  # Mamba's; `VSSM` re-initialises it as the official model
        self._init_scan_parameters(initialize, dt_min, dt_max, dt_init_floor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_proj(x)
        z = None
        if self.gate:
            x, z = x.chunk(2, dim=1 if self.channels_first else -1)
            z = self.act(z)
        if not self.channels_first:
            x = x.permute(0, 3, 1, 2)
        if self.conv2d is not None:
            x = self.conv2d(x)
        x = self.act(x)

        batch, _, height, width = x.shape
        length = height * width
        xs = cross_scan(x).flatten(1, 2)  # [B, 4 * d_inner, L]
        projected = self.x_proj(xs).view(batch, NUM_DIRECTIONS, -1, length)
        dts, Bs, Cs = torch.split(projected, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = self.dt_projs(dts.reshape(batch, -1, length))
        ys = self._scan(xs, dts, Bs.contiguous(), Cs.contiguous())

        y = cross_merge(ys, height, width).view(batch, -1, height, width)
        if not self.channels_first:
            y = y.permute(0, 2, 3, 1)
        y = self.out_norm(y.to(self.out_norm.weight.dtype)).to(x.dtype)
        if z is not None:
            y = y * z
        return self.dropout(self.out_proj(y))


class VSSBlock(nn.Module):
    """`x + drop_path(op(norm(x)))`, then (with `mlp_ratio > 0`) `x + drop_path(mlp(norm2(x)))`.

    `op` is the SS2D mixer of `forward_type`; `ssm_ratio=0` leaves it out. Channels-first blocks
    take and return `[B, C, H, W]`, the others `[B, H, W, C]`.
    """

    def __init__(
        self,
        dim: int,
        drop_path: float = 0.0,
        channels_first: bool = False,
        ssm_d_state: int = 16,
        ssm_ratio: float = 2.0,
        ssm_dt_rank: int | str = "auto",
        ssm_act_layer: type[nn.Module] = nn.SiLU,
        ssm_conv: int = 3,
        ssm_conv_bias: bool = True,
        ssm_drop_rate: float = 0.0,
        ssm_init: str = "v0",
        forward_type: str = "v05",
        mlp_ratio: float = 4.0,
        mlp_act_layer: type[nn.Module] = nn.GELU,
        mlp_drop_rate: float = 0.0,
    ):
        super().__init__()
        if forward_type not in FORWARD_TYPES:
            raise ValueError(f"Unknown forward_type '{forward_type}', expected one of {', '.join(FORWARD_TYPES)}.")
        if forward_type == "v0" and channels_first:
            raise ValueError("forward_type 'v0' runs channels-last: use norm_layer='ln'.")
        self.ssm_branch = ssm_ratio > 0
        self.mlp_branch = mlp_ratio > 0
        if self.ssm_branch:
            self.norm = _layer_norm(dim, channels_first)
            ssm_args = dict(
                d_model=dim,
                d_state=ssm_d_state,
                ssm_ratio=ssm_ratio,
                dt_rank=ssm_dt_rank,
                act_layer=ssm_act_layer,
                d_conv=ssm_conv,
                conv_bias=ssm_conv_bias,
                dropout=ssm_drop_rate,
            )
            if forward_type == "v0":
                if ssm_init != "v0":
                    raise ValueError(
                        f"forward_type 'v0' has Mamba's initialisation only (ssm_init='v0'), got '{ssm_init}'."
                    )
                self.op = SS2Dv0(**ssm_args)
            else:
                gate = forward_type != "v05_noz"
                self.op = SS2D(**ssm_args, initialize=ssm_init, gate=gate, channels_first=channels_first)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        if self.mlp_branch:
            self.norm2 = _layer_norm(dim, channels_first)
            self.mlp = Mlp(dim, int(dim * mlp_ratio), mlp_act_layer, mlp_drop_rate, channels_first=channels_first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ssm_branch:
            x = x + self.drop_path(self.op(self.norm(x)))
        if self.mlp_branch:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class VSSLayer(nn.Module):
    """A stage: `blocks`, then `downsample` to the next stage's width and half the resolution (official order).

    The stage's output, for dense prediction, is that of `blocks`.
    """

    def __init__(self, blocks: Sequence[nn.Module], downsample: nn.Module):
        super().__init__()
        self.grad_checkpointing = False
        self.blocks = nn.Sequential(*blocks)
        self.downsample = downsample

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled() and not torch.jit.is_scripting():
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
            return x
        return self.blocks(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.forward_blocks(x))


class VSSMClassifier(nn.Module):
    """`norm -> global pool -> dropout -> head` on the last stage's features (the official `classifier`).

    The norm runs per position, before the pooling. With `pool_type=''` nothing is pooled and
    `head` maps the channels of each position (channels-last output).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int = 1000,
        pool_type: str = "avg",
        drop_rate: float = 0.0,
        channels_first: bool = False,
    ):
        super().__init__()
        self.in_features = self.num_features = in_features
        self.channels_first = channels_first
        self.pool_type = self._check_pool_type(pool_type)
        self.norm = _layer_norm(in_features, channels_first)
        self.drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    @staticmethod
    def _check_pool_type(pool_type: str) -> str:
        if pool_type not in ("", "avg", "max", "avgmax"):
            raise ValueError(f"Unknown global_pool '{pool_type}', expected 'avg', 'max', 'avgmax' or '' (none).")
        return pool_type

    def reset(self, num_classes: int, pool_type: str | None = None, reset_other: bool = False) -> None:
        """A freshly initialised `head` of `num_classes` outputs (none for 0); `reset_other` also drops the norm."""
        reference = next(self.parameters(), None)
        if pool_type is not None:
            self.pool_type = self._check_pool_type(pool_type)
        if reset_other:
            self.norm = nn.Identity()
        head = nn.Identity()
        if num_classes > 0:
            head = nn.Linear(self.in_features, num_classes)
            trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
            if reference is not None:
                head = head.to(device=reference.device, dtype=reference.dtype)
        self.head = head.train(self.training)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.norm(x)
        spatial = (2, 3) if self.channels_first else (1, 2)
        if self.pool_type == "avg":
            x = x.mean(spatial)
        elif self.pool_type == "max":
            x = x.amax(spatial)
        elif self.pool_type == "avgmax":
            x = 0.5 * (x.mean(spatial) + x.amax(spatial))
        elif self.channels_first:
            x = x.permute(0, 2, 3, 1)
        x = self.drop(x)
        return x if pre_logits else self.head(x)


def _patch_embed(
    in_chans: int,
    embed_dim: int,
    patch_size: int,
    patch_norm: bool,
    channels_first: bool,
    version: str,
) -> nn.Sequential:
    """The official stems, with the official layer indices: 'v1' one patchifying conv, 'v2' two stride-2 3x3 convs."""
    to_layout = nn.Identity() if channels_first else Permute(0, 2, 3, 1)
    norm = _layer_norm(embed_dim, channels_first) if patch_norm else nn.Identity()
    if version == "v1":
        return nn.Sequential(nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size), to_layout, norm)
    if version == "v2":
        stride = patch_size // 2
        return nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, kernel_size=stride + 1, stride=stride, padding=1),
            nn.Identity(),
            LayerNorm2d(embed_dim // 2, eps=1e-5) if patch_norm else nn.Identity(),
            nn.Identity(),
            nn.GELU(),
            nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=stride + 1, stride=stride, padding=1),
            to_layout,
            norm,
        )
    raise ValueError(f"Unknown patchembed_version '{version}', expected 'v1' or 'v2'.")


def _downsample(dim: int, out_dim: int, channels_first: bool, version: str) -> nn.Sequential:
    """The official downsampling layers, with their layer indices.

    'v1' Swin's patch merging -> norm -> linear; 'v2' a 2x2 stride-2 conv -> norm; 'v3' a 3x3
    stride-2 conv -> norm.
    """
    if version == "v1":
        linear = ChannelLinear if channels_first else nn.Linear
        return nn.Sequential(
            PatchMerge(channels_first), _layer_norm(4 * dim, channels_first), linear(4 * dim, out_dim, bias=False)
        )
    if version in ("v2", "v3"):
        conv_args = dict(kernel_size=2, stride=2) if version == "v2" else dict(kernel_size=3, stride=2, padding=1)
        return nn.Sequential(
            nn.Identity() if channels_first else Permute(0, 3, 1, 2),
            nn.Conv2d(dim, out_dim, **conv_args),
            nn.Identity() if channels_first else Permute(0, 2, 3, 1),
            _layer_norm(out_dim, channels_first),
        )
    raise ValueError(f"Unknown downsample_version '{version}', expected 'v1', 'v2' or 'v3'.")


class VSSM(nn.Module):
    """VMamba image classifier and multi-scale backbone.

    The arguments are the official `VSSM`'s (less `gmlp`, `posembed`, `imgsize` and
    `use_checkpoint`, which no published model uses; see `set_grad_checkpointing`), with timm's
    `global_pool` and `drop_rate` added.

    Args:
        patch_size: Stride of the stem.
        in_chans: Input image channels.
        num_classes: Classifier outputs; 0 leaves the head without a classifier.
        depths: Blocks per stage.
        dims: Channels per stage, or the first stage's (doubled at each stage).
        ssm_d_state: State size per channel (N).
        ssm_ratio: Width of the SS2D mixer relative to its input (0 leaves the mixer out).
        ssm_dt_rank: Rank of the step-size projection; 'auto' gives ceil(dim / 16).
        ssm_act_layer: Activation after the mixer's conv and of its gate ('silu', 'gelu', ... or a class).
        ssm_conv: Kernel size of the mixer's depthwise conv (below 2: no conv; 'v05' types only).
        ssm_conv_bias: Bias of that conv.
        ssm_drop_rate: Dropout after the mixer's output projection.
        ssm_init: Initialisation of `A_logs` and the step sizes: 'v0' (Mamba's), 'v1', 'v2'.
        forward_type: 'v0', 'v05' or 'v05_noz' (see the module docstring).
        mlp_ratio: Hidden width of the MLP after each mixer (0: no MLP).
        mlp_act_layer: Activation of the MLP.
        mlp_drop_rate: Dropout in the MLP.
        drop_path_rate: Stochastic depth rate of the last block, rising linearly from 0 over all blocks.
        patch_norm: Normalise the stem's output.
        norm_layer: 'ln' (blocks run channels-last `[B, H, W, C]`) or 'ln2d' (channels-first).
        downsample_version: 'v1' (patch merging), 'v2' (2x2 conv) or 'v3' (3x3 conv) between stages.
        patchembed_version: 'v1' (one conv) or 'v2' (two convs) as the stem.
        global_pool: Head pooling: 'avg', 'max', 'avgmax' or '' (none).
        drop_rate: Dropout before the classifier.
    """

    def __init__(
        self,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: Sequence[int] = (2, 2, 9, 2),
        dims: int | Sequence[int] = (96, 192, 384, 768),
        ssm_d_state: int = 16,
        ssm_ratio: float = 2.0,
        ssm_dt_rank: int | str = "auto",
        ssm_act_layer: LayerType = "silu",
        ssm_conv: int = 3,
        ssm_conv_bias: bool = True,
        ssm_drop_rate: float = 0.0,
        ssm_init: str = "v0",
        forward_type: str = "v05",
        mlp_ratio: float = 4.0,
        mlp_act_layer: LayerType = "gelu",
        mlp_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        patch_norm: bool = True,
        norm_layer: str = "ln",
        downsample_version: str = "v2",
        patchembed_version: str = "v1",
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ):
        super().__init__()
        depths = tuple(depths)
        dims = tuple(int(dims * 2**i) for i in range(len(depths))) if isinstance(dims, int) else tuple(dims)
        if len(depths) != len(dims):
            raise ValueError(f"depths {depths} and dims {dims} must have one entry per stage.")
        if norm_layer.lower() not in _NORM_LAYERS:
            raise ValueError(f"Unknown norm_layer '{norm_layer}', expected 'ln' (channels-last) or 'ln2d'.")
        channels_first = _NORM_LAYERS[norm_layer.lower()]
        self.channels_first = channels_first
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.dims = dims
        self.output_fmt = "NCHW" if channels_first else "NHWC"
        self.pretrained_cfg = self.default_cfg = _cfg()

        self.patch_embed = _patch_embed(in_chans, dims[0], patch_size, patch_norm, channels_first, patchembed_version)

        drop_path_rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(depths)
        block_args = dict(
            channels_first=channels_first,
            ssm_d_state=ssm_d_state,
            ssm_ratio=ssm_ratio,
            ssm_dt_rank=ssm_dt_rank,
            ssm_act_layer=get_act_layer(ssm_act_layer),
            ssm_conv=ssm_conv,
            ssm_conv_bias=ssm_conv_bias,
            ssm_drop_rate=ssm_drop_rate,
            ssm_init=ssm_init,
            forward_type=forward_type,
            mlp_ratio=mlp_ratio,
            mlp_act_layer=get_act_layer(mlp_act_layer),
            mlp_drop_rate=mlp_drop_rate,
        )
        self.layers = nn.ModuleList()
        self.feature_info = []
        for i, dim in enumerate(dims):
            last = i == len(depths) - 1
            downsample = nn.Identity() if last else _downsample(dim, dims[i + 1], channels_first, downsample_version)
            blocks = [VSSBlock(dim, drop_path=rate, **block_args) for rate in drop_path_rates[i].tolist()]
            self.layers.append(VSSLayer(blocks, downsample))
            self.feature_info.append(dict(num_chs=dim, reduction=patch_size * 2**i, module=f"layers.{i}.blocks"))
        self.num_features = self.head_hidden_size = dims[-1]

        self.classifier = VSSMClassifier(dims[-1], num_classes, global_pool, drop_rate, channels_first)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """The official init: truncated normal (std .02) for linear layers (the grouped projections too), zero biases."""
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def no_weight_decay(self) -> set[str]:
        """Names of the SSM's `A_logs` and `Ds`, kept out of weight decay."""
        return {name for name, _ in self.named_parameters() if name.rpartition(".")[2] in ("A_logs", "Ds")}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter-name patterns ordering the layers from input to output (for layer-wise lr decay)."""
        if coarse:
            return dict(stem=r"^patch_embed", blocks=r"^layers\.(\d+)")
        return dict(
            stem=r"^patch_embed",
            blocks=[
                (r"^layers\.(\d+)\.blocks\.(\d+)", None),
                (r"^layers\.(\d+)\.downsample", (99999,)),  # after the blocks of its stage
            ],
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass (training only) to save memory."""
        for layer in self.layers:
            layer.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.classifier.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None, reset_other: bool = False) -> None:
        """Replace the classifier with a freshly initialised one of `num_classes` outputs (none for 0).

        `reset_other=True` also removes the head's norm.
        """
        self.num_classes = num_classes
        self.classifier.reset(num_classes, global_pool, reset_other=reset_other)

    def _stage_indices(self, indices: int | Sequence[int] | None) -> list[int]:
        num_stages = len(self.layers)
        if indices is None:
            return list(range(num_stages))
        if isinstance(indices, int):
            if not 0 < indices <= num_stages:
                raise ValueError(f"Cannot take the last {indices} of {num_stages} stages.")
            return list(range(num_stages - indices, num_stages))
        resolved = [i + num_stages if i < 0 else i for i in indices]
        if not all(0 <= i < num_stages for i in resolved):
            raise ValueError(f"Stage indices {list(indices)} out of range for {num_stages} stages.")
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
        """Stage outputs (of each stage's blocks, before its downsampling) for dense prediction.

        Args:
            x: Images `[B, C, H, W]`.
            indices: Stages to return: all if None, the last n if an int, else these stage indices.
            norm: Accepted for timm compatibility; the stage outputs are returned without a norm
                (the official `Backbone_VSSM` adds one per stage, as the dense tasks do themselves).
            stop_early: Skip the stages after the last requested one.
            output_fmt: 'NCHW' or 'NHWC' for the intermediates.
            intermediates_only: Return only the intermediates.
        Returns:
            The intermediates, or `(final features in the model's layout, intermediates)`.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got '{output_fmt}'.")
        take_indices = self._stage_indices(indices)
        last_index = max(take_indices) if stop_early or intermediates_only else len(self.layers) - 1

        intermediates = []
        x = self.patch_embed(x)
        for i, layer in enumerate(self.layers[: last_index + 1]):
            x = layer.forward_blocks(x)
            if i in take_indices:
                intermediates.append(self._to_format(x, output_fmt))
            if i < last_index:
                x = layer.downsample(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def _to_format(self, x: torch.Tensor, output_fmt: str) -> torch.Tensor:
        if output_fmt != self.output_fmt:
            x = x.permute(0, 3, 1, 2) if output_fmt == "NCHW" else x.permute(0, 2, 3, 1)
        return x.contiguous()

    def prune_intermediate_layers(
        self,
        indices: int | Sequence[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the stages after the last of `indices` (and that stage's downsampling), and the head.

        The head, its norm included, is reduced to a pass-through (unless `prune_head=False` and all
        stages are kept); `feature_info` keeps describing all stages, as timm's. `prune_norm` is
        accepted for timm compatibility.
        """
        take_indices = self._stage_indices(indices)
        num_kept = max(take_indices) + 1
        prune_end = num_kept < len(self.layers)
        self.layers = self.layers[:num_kept]
        if prune_end:
            self.layers[-1].downsample = nn.Identity()
            self.num_features = self.head_hidden_size = self.dims[num_kept - 1]
            self.classifier.in_features = self.classifier.num_features = self.num_features
        if prune_head or prune_end:
            self.reset_classifier(0, "", reset_other=True)
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final-stage features, `[B, C, H/32, W/32]` for channels-first models, else `[B, H/32, W/32, C]`."""
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.classifier(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def checkpoint_filter_fn(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The state dict with older official key names renamed to this model's; see `checkpoint_filter_fn`."""
        return checkpoint_filter_fn(state_dict, self)


# Official key prefixes renamed in the official code when a checkpoint of an older version loads.
_RENAMED_PREFIXES = (
    (r"^patch_embed\.proj\.", "patch_embed.0."),
    (r"^patch_embed\.norm\.", "patch_embed.2."),
    (r"^(layers\.\d+\.blocks\.\d+)\.ln_1\.", r"\1.norm."),
    (r"^(layers\.\d+\.blocks\.\d+)\.self_attention\.", r"\1.op."),
    (r"^(layers\.\d+\.downsample)\.norm\.", r"\1.1."),
    (r"^(layers\.\d+\.downsample)\.reduction\.", r"\1.2."),
    (r"^norm\.", "classifier.norm."),
    (r"^head\.", "classifier.head."),
)
# Stacked per-direction projections of older checkpoints, and the grouped layers holding them now.
_STACKED_PROJECTIONS = {"x_proj_weight": "x_proj.weight", "dt_projs_weight": "dt_projs.weight"}


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename the keys of older official checkpoints to `model`'s, as the official loading hooks do.

    The released ImageNet weights were saved by earlier versions of the official code: Swin-style
    names (`patch_embed.proj`, `ln_1`, `self_attention`, `downsample.reduction`, `norm`, `head`) and,
    for the 'v05' models, the stacked `x_proj_weight` / `dt_projs_weight` where the model has grouped
    layers (`x_proj.weight`, `dt_projs.weight`, the same numbers reshaped). Weights with the model's
    own names pass unchanged, and so do the shapes of tensors with the same number of elements.
    """
    model_state = model.state_dict()
    converted = {}
    for key, value in state_dict.items():
        for pattern, replacement in _RENAMED_PREFIXES:
            key = re.sub(pattern, replacement, key)
        prefix, _, name = key.rpartition(".")
        if name in _STACKED_PROJECTIONS and key not in model_state:
            key = f"{prefix}.{_STACKED_PROJECTIONS[name]}"
        target = model_state.get(key)
        if target is not None and value.shape != target.shape and value.numel() == target.numel():
            value = value.reshape(target.shape)
        converted[key] = value
    return converted


PretrainedArg = str | os.PathLike | None


def _create_vssm(variant: str, pretrained: PretrainedArg = None, **kwargs: Any) -> nn.Module:
    """Build a variant with timm's model builder (pretrained cfg, `features_only=True`), loading `pretrained` first.

    `pretrained` is a weights file (the official `{"model": state_dict}` checkpoints included),
    export folder or `hf-hub:` repo (see `load_pretrained`).
    """
    build = pretrained_builder(VSSM, pretrained, f" (the official weights are at {_PRETRAINED_URLS[variant]})")

    return build_model_with_cfg(
        build,
        variant,
        pretrained=False,
        pretrained_cfg=_cfg(url=_PRETRAINED_URLS[variant]),
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **kwargs,
    )


_RELEASES = "https://github.com/MzeroMiko/VMamba/releases/download/"
_PRETRAINED_URLS = {
    "vanilla_vmamba_tiny": _RELEASES + "%23v0cls/vssmtiny_dp01_ckpt_epoch_292.pth",
    "vanilla_vmamba_small": _RELEASES + "%23v0cls/vssmsmall_dp03_ckpt_epoch_238.pth",
    "vanilla_vmamba_base": _RELEASES + "%23v0cls/vssmbase_dp06_ckpt_epoch_241.pth",
    "vmamba_tiny_s1l8": _RELEASES + "%23v2cls/vssm1_tiny_0230s_ckpt_epoch_264.pth",
    "vmamba_small_s2l15": _RELEASES + "%23v2cls/vssm_small_0229_ckpt_epoch_222.pth",
    "vmamba_base_s2l15": _RELEASES + "%23v2cls/vssm_base_0229_ckpt_epoch_237.pth",
}

# The arguments of the official model functions. Drop path: the official training configs
# (classification/configs/vssm/vmambav0_*.yaml, vmambav2v_tiny_224.yaml, vmambav2_{small,base}_224.yaml).
_V0_ARGS = dict(
    ssm_d_state=16,
    ssm_ratio=2.0,
    ssm_conv=3,
    ssm_conv_bias=True,
    forward_type="v0",
    mlp_ratio=0.0,
    norm_layer="ln",
    downsample_version="v1",
    patchembed_version="v1",
)
_V05_ARGS = dict(
    ssm_d_state=1,
    ssm_conv=3,
    ssm_conv_bias=False,
    forward_type="v05_noz",
    mlp_ratio=4.0,
    norm_layer="ln2d",
    downsample_version="v3",
    patchembed_version="v2",
)


@register_model
def vanilla_vmamba_tiny(pretrained: PretrainedArg = None, **kwargs: Any) -> nn.Module:
    """VMamba-T of the paper (forward type 'v0'), 22.9M params."""
    args = dict(depths=(2, 2, 9, 2), dims=96, drop_path_rate=0.2, **_V0_ARGS)
    return _create_vssm("vanilla_vmamba_tiny", pretrained, **dict(args, **kwargs))


@register_model
def vanilla_vmamba_small(pretrained: PretrainedArg = None, **kwargs: Any) -> nn.Module:
    """VMamba-S of the paper (forward type 'v0'), 44.4M params."""
    args = dict(depths=(2, 2, 27, 2), dims=96, drop_path_rate=0.3, **_V0_ARGS)
    return _create_vssm("vanilla_vmamba_small", pretrained, **dict(args, **kwargs))


@register_model
def vanilla_vmamba_base(pretrained: PretrainedArg = None, **kwargs: Any) -> nn.Module:
    """VMamba-B of the paper (forward type 'v0'), 76.3M params."""
    args = dict(depths=(2, 2, 27, 2), dims=128, drop_path_rate=0.5, **_V0_ARGS)
    return _create_vssm("vanilla_vmamba_base", pretrained, **dict(args, **kwargs))


@register_model
def vmamba_tiny_s1l8(pretrained: PretrainedArg = None, **kwargs: Any) -> nn.Module:
    """VMamba-T (v2, 'v05_noz': d_state 1, ssm_ratio 1, 8 blocks in stage 3), 30.2M params."""
    args = dict(depths=(2, 2, 8, 2), dims=96, ssm_ratio=1.0, drop_path_rate=0.2, **_V05_ARGS)
    return _create_vssm("vmamba_tiny_s1l8", pretrained, **dict(args, **kwargs))


@register_model
def vmamba_small_s2l15(pretrained: PretrainedArg = None, **kwargs: Any) -> nn.Module:
    """VMamba-S (v2, 'v05_noz': d_state 1, ssm_ratio 2, 15 blocks in stage 3), 50.1M params."""
    args = dict(depths=(2, 2, 15, 2), dims=96, ssm_ratio=2.0, drop_path_rate=0.3, **_V05_ARGS)
    return _create_vssm("vmamba_small_s2l15", pretrained, **dict(args, **kwargs))


@register_model
def vmamba_base_s2l15(pretrained: PretrainedArg = None, **kwargs: Any) -> nn.Module:
    """VMamba-B (v2, 'v05_noz': d_state 1, ssm_ratio 2, 15 blocks in stage 3), 88.6M params."""
    args = dict(depths=(2, 2, 15, 2), dims=128, ssm_ratio=2.0, drop_path_rate=0.6, **_V05_ARGS)
    return _create_vssm("vmamba_base_s2l15", pretrained, **dict(args, **kwargs))
