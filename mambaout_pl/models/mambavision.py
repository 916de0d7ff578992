"""MambaVision: convolutional early levels, then windowed Mamba and attention blocks.

Paper: Ali Hatamizadeh, Jan Kautz, "MambaVision: A Hybrid Mamba-Transformer Vision Backbone",
CVPR 2025, https://arxiv.org/abs/2407.08083

Module names, and so state-dict keys, follow NVIDIA's `mambavision` package: its checkpoints
(`{"state_dict": ...}`) load into these unchanged. The selective scan is this project's
`selective_scan`, so the model runs anywhere PyTorch runs and exports with `torch.export`.

Tensors are NCHW between levels. The last two levels cut the feature map into non-overlapping
windows and run their blocks on the window tokens; a map that is not a multiple of the window is
zero-padded at the bottom and right and cropped back afterwards, as the official classification,
detection and segmentation models do. The padding tokens are not masked: they take part in the
scan and the attention, as in the official code.
"""

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Attention, DropPath, Mlp, SelectAdaptivePool2d, trunc_normal_
from timm.models import build_model_with_cfg
from torch import nn
from torch.utils.checkpoint import checkpoint

from .mixers.ssm import selective_scan
from .registry import register_model
from .weights import pretrained_builder

__all__ = [
    "MambaVision",
    "PatchEmbed",
    "ConvBlock",
    "MambaVisionMixer",
    "Block",
    "Downsample",
    "MambaVisionLevel",
    "window_partition",
    "window_reverse",
]

_HUGGING_FACE = "https://huggingface.co/nvidia"


def _cfg(url: str = "", **overrides: Any) -> dict[str, Any]:
    """Pre-processing and head facts of a variant (those of the official weights)."""
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 1.0,
        "crop_mode": "center",
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.conv_down.0",
        "classifier": "head",
        "license": "nvidia-source-code-license-nc",
        **overrides,
    }


DEFAULT_CFGS = {
    "mamba_vision_T": _cfg(f"{_HUGGING_FACE}/MambaVision-T-1K/resolve/main/mambavision_tiny_1k.pth.tar"),
    "mamba_vision_T2": _cfg(
        f"{_HUGGING_FACE}/MambaVision-T2-1K/resolve/main/mambavision_tiny2_1k.pth.tar", crop_pct=0.98
    ),
    "mamba_vision_S": _cfg(
        f"{_HUGGING_FACE}/MambaVision-S-1K/resolve/main/mambavision_small_1k.pth.tar", crop_pct=0.93
    ),
    "mamba_vision_B": _cfg(f"{_HUGGING_FACE}/MambaVision-B-1K/resolve/main/mambavision_base_1k.pth.tar"),
    "mamba_vision_B_21k": _cfg(f"{_HUGGING_FACE}/MambaVision-B-21K/resolve/main/mambavision_base_21k.pth.tar"),
    "mamba_vision_L": _cfg(f"{_HUGGING_FACE}/MambaVision-L-1K/resolve/main/mambavision_large_1k.pth.tar"),
    "mamba_vision_L_21k": _cfg(f"{_HUGGING_FACE}/MambaVision-L-21K/resolve/main/mambavision_large_21k.pth.tar"),
    "mamba_vision_L2": _cfg(f"{_HUGGING_FACE}/MambaVision-L2-1K/resolve/main/mambavision_large2_1k.pth.tar"),
    "mamba_vision_L2_512_21k": _cfg(
        f"{_HUGGING_FACE}/MambaVision-L2-512-21K/resolve/main/mambavision_L2_21k_240m_512.pth.tar",
        input_size=(3, 512, 512),
        pool_size=(16, 16),
        crop_pct=0.93,
        crop_mode="squash",
    ),
    "mamba_vision_L3_256_21k": _cfg(
        f"{_HUGGING_FACE}/MambaVision-L3-256-21K/resolve/main/mambavision_L3_21k_740m_256.pth.tar",
        input_size=(3, 256, 256),
        pool_size=(8, 8),
    ),
    "mamba_vision_L3_512_21k": _cfg(
        f"{_HUGGING_FACE}/MambaVision-L3-512-21K/resolve/main/mambavision_L3_21k_740m_512.pth.tar",
        input_size=(3, 512, 512),
        pool_size=(16, 16),
        crop_pct=0.93,
        crop_mode="squash",
    ),
}


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """`[B, C, H, W]` (H and W multiples of `window_size`) to window tokens `[B * windows, window_size**2, C]`.

    Windows are ordered row by row, and so are the tokens inside each window.
    """
    batch, channels, height, width = x.shape
    grid_h, grid_w = height // window_size, width // window_size
    x = x.view(batch, channels, grid_h, window_size, grid_w, window_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(batch * grid_h * grid_w, window_size * window_size, channels)


def window_reverse(windows: torch.Tensor, window_size: int, height: int, width: int) -> torch.Tensor:
    """Window tokens back to `[B, C, height, width]`, the inverse of `window_partition`."""
    grid_h, grid_w = height // window_size, width // window_size
    channels = windows.shape[-1]
    x = windows.view(-1, grid_h, grid_w, window_size, window_size, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(-1, channels, height, width)


class PatchEmbed(nn.Module):
    """Two stride-2 3x3 convs, each followed by batch norm and ReLU: stride 4 in all."""

    def __init__(self, in_chans: int = 3, in_dim: int = 64, dim: int = 96):
        super().__init__()
        self.proj = nn.Identity()
        self.conv_down = nn.Sequential(
            nn.Conv2d(in_chans, in_dim, kernel_size=3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(in_dim, eps=1e-4),
            nn.ReLU(),
            nn.Conv2d(in_dim, dim, kernel_size=3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(dim, eps=1e-4),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_down(self.proj(x))


class ConvBlock(nn.Module):
    """Residual block of the convolutional levels: `x + drop_path(gamma * bn(conv(gelu(bn(conv(x))))))`.

    The GELU is the tanh approximation, as in the official model.
    """

    def __init__(
        self,
        dim: int,
        drop_path: float = 0.0,
        layer_scale: float | None = None,
        kernel_size: int = 3,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=kernel_size, stride=1, padding=kernel_size // 2)
        self.norm1 = nn.BatchNorm2d(dim, eps=1e-5)
        self.act1 = nn.GELU(approximate="tanh")
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=kernel_size, stride=1, padding=kernel_size // 2)
        self.norm2 = nn.BatchNorm2d(dim, eps=1e-5)
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale))) if layer_scale is not None else None
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        if self.gamma is not None:
            x = x * self.gamma.view(1, -1, 1, 1)
        return shortcut + self.drop_path(x)


class MambaVisionMixer(nn.Module):
    """MambaVision's token mixer: a selective scan on half of the channels, a plain conv branch on the other half.

    `in_proj` maps the tokens to `expand * d_model` channels split into `x` and `z`. Both go
    through their own depthwise conv (non-causal, 'same' padding) and SiLU; `x` then goes through
    the selective scan (S6) over the token sequence, while `z` skips it. The two halves are
    concatenated (no gating) and projected back by `out_proj`.

    As in the official model, the step sizes get `dt_proj`'s bias twice: once in `dt_proj` itself,
    once as the scan's `delta_bias`. The official weights were trained so, and load here unchanged.

    Args:
        d_model: Channels in and out.
        d_state: State size per channel (N).
        d_conv: Kernel size of the depthwise convs.
        expand: Inner width relative to `d_model` (half of it is scanned).
        dt_rank: Rank of the step-size projection; None gives ceil(d_model / 16).
        dt_min: Smallest initial step size.
        dt_max: Largest initial step size.
        dt_init_floor: Lower bound of the initial step sizes.
        bias: Bias in `in_proj` and `out_proj`.
        conv_bias: Bias in the depthwise convs (the official model has none).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 8,
        d_conv: int = 3,
        expand: float = 1.0,
        dt_rank: int | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        bias: bool = False,
        conv_bias: bool = False,
    ):
        super().__init__()
        d_inner = int(expand * d_model)
        if d_inner < 2 or d_inner % 2:
            raise ValueError(
                f"MambaVisionMixer splits expand * d_model = {d_inner} channels into two halves: choose d_model "
                f"({d_model}) and expand ({expand}) giving an even width of at least 2."
            )
        if d_state < 1:
            raise ValueError(f"d_state={d_state} must be a positive state size.")
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = d_inner
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        half = d_inner // 2

        self.in_proj = nn.Linear(d_model, d_inner, bias=bias)
        self.x_proj = nn.Linear(half, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, half, bias=True)
        # Mamba's step-size initialisation: log-uniform in [dt_min, dt_max], stored through softplus's inverse.
        nn.init.uniform_(self.dt_proj.weight, -(self.dt_rank**-0.5), self.dt_rank**-0.5)
        dt = torch.exp(torch.rand(half) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(half, 1))
        self.D = nn.Parameter(torch.ones(half))
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)
        self.conv1d_x = nn.Conv1d(half, half, kernel_size=d_conv, padding="same", groups=half, bias=conv_bias)
        self.conv1d_z = nn.Conv1d(half, half, kernel_size=d_conv, padding="same", groups=half, bias=conv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens `[B, L, d_model]` to `[B, L, d_model]`."""
        x, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # each [B, d_inner / 2, L]
        x = F.silu(self.conv1d_x(x))
        z = F.silu(self.conv1d_z(z))
        dt, B, C = torch.split(self.x_proj(x.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        y = selective_scan(
            u=x,
            delta=self.dt_proj(dt).transpose(1, 2),
            A=-torch.exp(self.A_log.float()),
            B=B.transpose(1, 2),
            C=C.transpose(1, 2),
            D=self.D,
            delta_bias=self.dt_proj.bias,
            delta_softplus=True,
        )
        return self.out_proj(torch.cat([y, z], dim=1).transpose(1, 2))


class Block(nn.Module):
    """Pre-norm residual block of the windowed levels: a token mixer (Mamba or attention), then an MLP.

    `x = x + drop_path(gamma_1 * mixer(norm1(x)))`, `x = x + drop_path(gamma_2 * mlp(norm2(x)))`
    on window tokens `[B * windows, tokens, C]`; the gammas exist only with `layer_scale`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        use_attention: bool,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        layer_scale: float | None = None,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        if use_attention:
            self.mixer = Attention(
                dim,
                num_heads=num_heads,
                qkv_bias=qkv_bias,
                qk_norm=qk_norm,
                attn_drop=attn_drop,
                proj_drop=drop,
                norm_layer=nn.LayerNorm,
            )
        else:
            self.mixer = MambaVisionMixer(d_model=dim, d_state=8, d_conv=3, expand=1)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale))) if layer_scale is not None else None
        self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale))) if layer_scale is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = self.mixer(self.norm1(x))
        x = x + self.drop_path(mixed if self.gamma_1 is None else self.gamma_1 * mixed)
        mlp = self.mlp(self.norm2(x))
        return x + self.drop_path(mlp if self.gamma_2 is None else self.gamma_2 * mlp)


class Downsample(nn.Module):
    """Stride-2 3x3 conv without bias that doubles the channels (or keeps them, `keep_dim=True`)."""

    def __init__(self, dim: int, keep_dim: bool = False):
        super().__init__()
        dim_out = dim if keep_dim else 2 * dim
        self.reduction = nn.Sequential(nn.Conv2d(dim, dim_out, kernel_size=3, stride=2, padding=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduction(x)


def attention_block_indices(depth: int) -> list[int]:
    """The blocks of a windowed level that attend: the last `depth // 2`; the ones before them scan."""
    return list(range(depth - depth // 2, depth))


class MambaVisionLevel(nn.Module):
    """One level: `depth` conv blocks, or windowed Mamba blocks followed by windowed attention blocks.

    `forward` returns the level's output, NCHW at the level's stride (the feature map dense heads
    take). The downsampling conv that leads to the next level is held here, where the official
    model keeps it, and is run by `MambaVision` after the output is taken (None on the last level).

    Args:
        dim: Channels.
        depth: Blocks.
        num_heads: Attention heads of the attention blocks.
        window_size: Side of the square windows of a windowed level.
        conv: A convolutional level (`ConvBlock`s, no windows).
        downsample: Hold a `Downsample` to the next level.
        mlp_ratio: MLP hidden width relative to `dim`.
        qkv_bias: Bias in the attention's query/key/value projection.
        qk_norm: Normalise queries and keys (the official `qk_scale`).
        drop: Dropout after the attention projection and in the MLP.
        attn_drop: Dropout of the attention weights.
        drop_path: Drop-path rate per block, or one rate for all.
        layer_scale: Initial layer scale of the windowed blocks; None for none.
        layer_scale_conv: Initial layer scale of the conv blocks; None for none.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        conv: bool = False,
        downsample: bool = True,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float | Sequence[float] = 0.0,
        layer_scale: float | None = None,
        layer_scale_conv: float | None = None,
    ):
        super().__init__()
        rates = list(drop_path) if isinstance(drop_path, Sequence) else [drop_path] * depth
        if len(rates) != depth:
            raise ValueError(f"Got {len(rates)} drop path rates for {depth} blocks.")
        self.conv = conv
        self.window_size = window_size
        self.grad_checkpointing = False
        if conv:
            self.blocks = nn.ModuleList(
                [ConvBlock(dim, drop_path=rate, layer_scale=layer_scale_conv) for rate in rates]
            )
        else:
            attention_blocks = attention_block_indices(depth)
            self.blocks = nn.ModuleList(
                [
                    Block(
                        dim,
                        num_heads=num_heads,
                        use_attention=i in attention_blocks,
                        mlp_ratio=mlp_ratio,
                        qkv_bias=qkv_bias,
                        qk_norm=qk_norm,
                        drop=drop,
                        attn_drop=attn_drop,
                        drop_path=rate,
                        layer_scale=layer_scale,
                    )
                    for i, rate in enumerate(rates)
                ]
            )
        self.downsample = Downsample(dim) if downsample else None

    def _run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled() and not torch.jit.is_scripting():
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
        else:
            for block in self.blocks:
                x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv:
            return self._run_blocks(x)
        height, width = x.shape[-2:]
        size = self.window_size
        x = F.pad(x, (0, -width % size, 0, -height % size))
        padded_h, padded_w = x.shape[-2:]
        x = self._run_blocks(window_partition(x, size))
        return window_reverse(x, size, padded_h, padded_w)[:, :, :height, :width].contiguous()


class MambaVision(nn.Module):
    """MambaVision image classifier and multi-scale backbone.

    Two convolutional levels, then levels whose first blocks scan their window tokens with
    `MambaVisionMixer` and whose last `depth // 2` blocks attend within the windows. Each level
    but the last ends with a stride-2 conv; the stage outputs (`forward_intermediates`,
    `feature_info`) are the levels' outputs before that conv, at strides 4, 8, 16 and 32, as the
    official detection and segmentation backbones take them.

    The arguments up to `layer_scale_conv` are the official model's (its `qk_scale` is `qk_norm`).

    Args:
        dim: Channels of the first level; each next level doubles them.
        in_dim: Channels of the stem's first conv.
        depths: Blocks per level.
        window_size: Window side per level (used by the windowed levels).
        mlp_ratio: MLP hidden width relative to the level width.
        num_heads: Attention heads per level (used by the windowed levels).
        drop_path_rate: Stochastic depth rate of the last block, rising linearly from 0 over all blocks.
        in_chans: Input image channels.
        num_classes: Classifier outputs; 0 leaves the model without a classifier.
        qkv_bias: Bias in the attention's query/key/value projections.
        qk_norm: Normalise queries and keys in the attention.
        drop_rate: Dropout after the attention projections and in the MLPs.
        attn_drop_rate: Dropout of the attention weights.
        layer_scale: Initial layer scale of the windowed blocks; None for none.
        layer_scale_conv: Initial layer scale of the conv blocks; None for none.
        global_pool: Pooling before the classifier: 'avg', 'max', 'avgmax' or '' (none; only with
            num_classes=0).
        num_conv_levels: Leading levels built of conv blocks.
    """

    def __init__(
        self,
        dim: int = 80,
        in_dim: int = 32,
        depths: Sequence[int] = (1, 3, 8, 4),
        window_size: Sequence[int] = (8, 8, 14, 7),
        mlp_ratio: float = 4.0,
        num_heads: Sequence[int] = (2, 4, 8, 16),
        drop_path_rate: float = 0.2,
        in_chans: int = 3,
        num_classes: int = 1000,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        layer_scale: float | None = None,
        layer_scale_conv: float | None = None,
        global_pool: str = "avg",
        num_conv_levels: int = 2,
    ):
        super().__init__()
        num_levels = len(depths)
        if num_levels == 0 or len(window_size) != num_levels or len(num_heads) != num_levels:
            raise ValueError(
                f"depths, window_size and num_heads need one entry per level, got {len(depths)}, "
                f"{len(window_size)} and {len(num_heads)}."
            )
        dims = [int(dim * 2**i) for i in range(num_levels)]
        for i in range(num_conv_levels, num_levels):
            if window_size[i] < 1:
                raise ValueError(f"window_size[{i}]={window_size[i]} must be a positive number of tokens.")
            if num_heads[i] < 1 or dims[i] % num_heads[i]:
                raise ValueError(
                    f"Level {i} has {dims[i]} channels, which num_heads[{i}]={num_heads[i]} does not divide: "
                    "choose head counts that divide dim * 2**level."
                )
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.output_fmt = "NCHW"
        self.pretrained_cfg = self.default_cfg = _cfg()

        self.patch_embed = PatchEmbed(in_chans=in_chans, in_dim=in_dim, dim=dim)
        drop_path_rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))
        self.levels = nn.ModuleList()
        self.feature_info = []
        for i in range(num_levels):
            self.levels.append(
                MambaVisionLevel(
                    dim=dims[i],
                    depth=depths[i],
                    num_heads=num_heads[i],
                    window_size=window_size[i],
                    conv=i < num_conv_levels,
                    downsample=i < num_levels - 1,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_norm=qk_norm,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=drop_path_rates[i].tolist(),
                    layer_scale=layer_scale,
                    layer_scale_conv=layer_scale_conv,
                )
            )
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2**i, module=f"levels.{i}"))
        self.num_features = self.head_hidden_size = dims[-1]
        self.norm = nn.BatchNorm2d(self.num_features)
        self.global_pool = self._pool(global_pool, num_classes)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # As the official model: every Linear, `dt_proj` included, is re-initialised (its bias to 0).
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @staticmethod
    def _pool(pool_type: str, num_classes: int) -> SelectAdaptivePool2d:
        if pool_type not in ("", "avg", "max", "avgmax"):
            raise ValueError(f"Unknown global_pool '{pool_type}', expected 'avg', 'max', 'avgmax' or '' (none).")
        if pool_type == "" and num_classes > 0:
            raise ValueError(
                f"global_pool='' leaves the features unpooled, which a classifier cannot take: give num_classes=0 "
                f"with it (got num_classes={num_classes}), or pool with 'avg'."
            )
        return SelectAdaptivePool2d(pool_type=pool_type, flatten=bool(pool_type))

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters kept out of weight decay beyond norms and biases: the scans' `A_log` and `D`."""
        return {name for name, _ in self.named_parameters() if name.rpartition(".")[2] in ("A_log", "D")}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter-name patterns ordering the layers from input to output (for layer-wise lr decay)."""
        if coarse:
            return dict(stem=r"^patch_embed", blocks=[(r"^levels\.(\d+)", None), (r"^norm", (99999,))])
        return dict(
            stem=r"^patch_embed",
            blocks=[
                (r"^levels\.(\d+)\.blocks\.(\d+)", None),
                (r"^levels\.(\d+)\.downsample", (99999,)),  # with the last block of its level
                (r"^norm", (99999,)),
            ],
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass (training only) to save memory."""
        for level in self.levels:
            level.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a freshly initialised one of `num_classes` outputs (0: none)."""
        pool_type = self.global_pool.pool_type if global_pool is None else global_pool
        self.global_pool = self._pool(pool_type, num_classes)
        self.num_classes = num_classes
        if num_classes > 0:
            reference = (
                self.norm.weight if isinstance(self.norm, nn.BatchNorm2d) else self.patch_embed.conv_down[0].weight
            )
            head = nn.Linear(self.num_features, num_classes, device=reference.device, dtype=reference.dtype)
            self._init_weights(head)
            self.head = head.train(self.training)
        else:
            self.head = nn.Identity()

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs for dense prediction: each level's output before its downsampling conv.

        Args:
            x: Images `[B, C, H, W]`.
            indices: Levels to return: all if None, the last n if an int, else these level indices.
            norm: Pass the last level's output through the final norm, as `forward_features` does.
            stop_early: Skip the levels after the last requested one.
            output_fmt: 'NCHW' or 'NHWC' for the intermediates.
            intermediates_only: Return only the intermediates.
        Returns:
            The intermediates, or `(final features, intermediates)`; the final features are
            `forward_features(x)` when every level ran, else the last level run's output.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got '{output_fmt}'.")
        take_indices = self._level_indices(indices)
        num_levels = len(self.levels)
        last_index = max(take_indices) if stop_early or intermediates_only else num_levels - 1

        intermediates = []
        x = self.patch_embed(x)
        for i, level in enumerate(self.levels[: last_index + 1]):
            x = level(x)
            if i in take_indices:
                feature = self.norm(x) if norm and i == num_levels - 1 else x
                intermediates.append(feature.permute(0, 2, 3, 1) if output_fmt == "NHWC" else feature)
            if i < last_index and level.downsample is not None:
                x = level.downsample(x)

        if intermediates_only:
            return intermediates
        if last_index == num_levels - 1:
            x = self.norm(x)
        return x, intermediates

    def _level_indices(self, indices: int | Sequence[int] | None) -> list[int]:
        num_levels = len(self.levels)
        if indices is None:
            return list(range(num_levels))
        if isinstance(indices, int):
            if not 0 < indices <= num_levels:
                raise ValueError(f"Cannot take the last {indices} of {num_levels} levels.")
            return list(range(num_levels - indices, num_levels))
        resolved = [i + num_levels if i < 0 else i for i in indices]
        if not resolved or not all(0 <= i < num_levels for i in resolved):
            raise ValueError(f"Level indices {list(indices)} out of range for {num_levels} levels.")
        return resolved

    def prune_intermediate_layers(
        self,
        indices: int | Sequence[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the levels after the last of `indices` (and that level's downsampling conv); returns the kept indices.

        The final norm goes with `prune_norm` or with the last level (it is sized for it); the
        classifier goes with `prune_head` or with the last level. `feature_info` keeps describing
        all levels, as timm's.
        """
        take_indices = self._level_indices(indices)
        num_kept = max(take_indices) + 1
        prune_end = num_kept < len(self.levels)
        if prune_end:
            self.levels = self.levels[:num_kept]
            self.levels[-1].downsample = None
            self.num_features = self.head_hidden_size = self.feature_info[num_kept - 1]["num_chs"]
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final-level features after the final norm, `[B, num_features, H/32, W/32]`."""
        x = self.patch_embed(x)
        for level in self.levels:
            x = level(x)
            if level.downsample is not None:
                x = level.downsample(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


PretrainedArg = str | os.PathLike | None


def _create_mambavision(variant: str, pretrained: PretrainedArg = None, **kwargs: Any) -> MambaVision:
    """Build a variant with timm's model builder (its cfg and `features_only` wrapper), loading `pretrained` first.

    `pretrained` is an official checkpoint file (`{"state_dict": ...}`), a state dict, an export
    folder or an `hf-hub:` repo with safetensors weights (see `load_pretrained`).
    """
    build = pretrained_builder(MambaVision, pretrained)

    return build_model_with_cfg(
        build,
        variant,
        pretrained=False,
        pretrained_cfg=DEFAULT_CFGS[variant],
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **kwargs,
    )


_TINY = dict(dim=80, in_dim=32, num_heads=(2, 4, 8, 16), window_size=(8, 8, 14, 7), mlp_ratio=4, drop_path_rate=0.2)
_BASE = dict(
    dim=128,
    in_dim=64,
    num_heads=(2, 4, 8, 16),
    window_size=(8, 8, 14, 7),
    mlp_ratio=4,
    drop_path_rate=0.3,
    layer_scale=1e-5,
)
_LARGE = dict(
    dim=196,
    in_dim=64,
    num_heads=(4, 8, 16, 32),
    window_size=(8, 8, 14, 7),
    mlp_ratio=4,
    drop_path_rate=0.3,
    layer_scale=1e-5,
)
_LARGE3 = dict(dim=256, in_dim=64, num_heads=(4, 8, 16, 32), mlp_ratio=4, drop_path_rate=0.5, layer_scale=1e-5)


def _variant(variant: str, pretrained: PretrainedArg, args: dict[str, Any], kwargs: dict[str, Any]) -> MambaVision:
    return _create_mambavision(variant, pretrained, **dict(args, **kwargs))


@register_model
def mamba_vision_T(pretrained: PretrainedArg = None, **kwargs: Any) -> MambaVision:
    """MambaVision-T, 31.8M params."""
    return _variant("mamba_vision_T", pretrained, dict(_TINY, depths=(1, 3, 8, 4)), kwargs)


@register_model
def mamba_vision_T2(pretrained: PretrainedArg = None, **kwargs: Any) -> MambaVision:
    """MambaVision-T2, 35.1M params."""
    return _variant("mamba_vision_T2", pretrained, dict(_TINY, depths=(1, 3, 11, 4)), kwargs)


@register_model
def mamba_vision_S(pretrained: PretrainedArg = None, **kwargs: Any) -> MambaVision:
    """MambaVision-S, 50.1M params."""
    args = dict(_TINY, dim=96, in_dim=64, depths=(3, 3, 7, 5))
    return _variant("mamba_vision_S", pretrained, args, kwargs)


@register_model
def mamba_vision_B(pretrained: PretrainedArg = None, **kwargs: Any) -> MambaVision:
    """MambaVision-B, 97.7M params."""
    return _variant("mamba_vision_B", pretrained, dict(_BASE, depths=(3, 3, 10, 5)), kwargs)


@register_model
def mamba_vision_B_21k(pretrained: PretrainedArg = None, **kwargs: Any) -> MambaVision:
    """MambaVision-B, the ImageNet-21k pre-trained weights' variant."""
    return _variant("mamba_vision_B_21k", pretrained, dict(_BASE, depths=(3, 3, 10, 5)), kwargs)


@register_model
def mamba_vision_L(pretrained: PretrainedArg = None, **kwargs: Any) -> MambaVision:
    """MambaVision-L, 228.0M params."""
    return _variant("mamba_vision_L", pretrained, dict(_LARGE, depths=(3, 3, 10, 5)), kwargs)


@register_model
def mamba_vision_L_21k(pretrained: PretrainedArg = None, **kwargs: Any) -> MambaVision:
    """MambaVision-L, the ImageNet-21k pre-trained weights' variant."""
    return _variant("mamba_vision_L_21k", pretrained, dict(_LARGE, depths=(3, 3, 10, 5)), kwargs)


@register_model
def mamba_vision_L2(pretrained: PretrainedArg = None, **kwargs: Any) -> MambaVision:
    """MambaVision-L2, 241.6M params."""
    return _variant("mamba_vision_L2", pretrained, dict(_LARGE, depths=(3, 3, 12, 5)), kwargs)


@register_model
def mamba_vision_L2_512_21k(pretrained: PretrainedArg = None, **kwargs: Any) -> MambaVision:
    """MambaVision-L2 at 512x512 (larger windows), ImageNet-21k pre-trained."""
    args = dict(_LARGE, depths=(3, 3, 12, 5), window_size=(8, 8, 32, 16))
    return _variant("mamba_vision_L2_512_21k", pretrained, args, kwargs)


@register_model
def mamba_vision_L3_256_21k(pretrained: PretrainedArg = None, **kwargs: Any) -> MambaVision:
    """MambaVision-L3 at 256x256, ImageNet-21k pre-trained."""
    args = dict(_LARGE3, depths=(3, 3, 20, 10), window_size=(8, 8, 16, 8))
    return _variant("mamba_vision_L3_256_21k", pretrained, args, kwargs)


@register_model
def mamba_vision_L3_512_21k(pretrained: PretrainedArg = None, **kwargs: Any) -> MambaVision:
    """MambaVision-L3 at 512x512 (larger windows), ImageNet-21k pre-trained."""
    args = dict(_LARGE3, depths=(3, 3, 20, 10), window_size=(8, 8, 32, 16))
    return _variant("mamba_vision_L3_512_21k", pretrained, args, kwargs)
