"""MambaOut: Gated CNN blocks (Mamba blocks without the SSM) in a four-stage hierarchy.

Paper: Weihao Yu, Xinchao Wang, "MambaOut: Do We Really Need Mamba for Vision?", CVPR 2025,
https://arxiv.org/abs/2405.07992

Module names, and so state-dict keys, follow timm's `mambaout.py`: a state dict saved from timm's
models loads into these unchanged, and the reverse. Inside the network tensors are channels-last
`[B, H, W, C]`; images come in and intermediate features go out as `[B, C, H, W]`.
"""

import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm, LayerScale, get_act_layer, is_exportable, is_scriptable, trunc_normal_
from timm.models import build_model_with_cfg
from torch import nn
from torch.utils.checkpoint import checkpoint

from .fused_gated_conv import fused_gated_conv_weights, supports_fused_activation
from .mixers import TOKEN_MIXERS, DepthwiseConvMixer, MixerLayer, mixer_arguments, mixer_layer, stage_mixers
from .registry import register_model
from .weights import pretrained_builder

__all__ = [
    "MambaOut",
    "Stem",
    "Downsample",
    "DepthwiseConvMixer",
    "GatedCNNBlock",
    "MambaOutStage",
    "MlpHead",
]

LayerType = str | Callable[..., nn.Module]


def _cfg(**overrides: Any) -> dict[str, Any]:
    """Pre-processing and head facts for a variant (the ImageNet-1k set-up of the reference weights)."""
    return {
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "test_input_size": (3, 288, 288),
        "pool_size": (7, 7),
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv1",
        "classifier": "head.fc",
        "license": "apache-2.0",
        **overrides,
    }


class Stem(nn.Module):
    """Two stride-2 3x3 convs (stride 4 in all): NCHW image in, NHWC features out."""

    def __init__(
        self,
        in_chans: int = 3,
        out_chs: int = 96,
        mid_norm: bool = True,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = LayerNorm,
    ):
        super().__init__()
        mid_chs = out_chs // 2
        self.conv1 = nn.Conv2d(in_chans, mid_chs, kernel_size=3, stride=2, padding=1)
        self.norm1 = norm_layer(mid_chs) if mid_norm else None
        self.act = act_layer()
        self.conv2 = nn.Conv2d(mid_chs, out_chs, kernel_size=3, stride=2, padding=1)
        self.norm2 = norm_layer(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.norm1 is not None:
            x = self.norm1(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = self.act(x)
        x = self.conv2(x)
        return self.norm2(x.permute(0, 2, 3, 1))


class Downsample(nn.Module):
    """Stride-2 3x3 conv between stages, NHWC in and out.

    The paper's models normalise after the conv; `norm_first=True` normalises the input instead
    (timm's `DownsampleNormFirst`). The layers are registered in the order they run, so the
    parameter order, and an optimizer state saved from timm's model, is timm's.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        norm_first: bool = False,
        norm_layer: type[nn.Module] = LayerNorm,
    ):
        super().__init__()
        self.norm_first = norm_first
        if norm_first:
            self.norm = norm_layer(in_chs)
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=2, padding=1)
        if not norm_first:
            self.norm = norm_layer(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_first:
            x = self.norm(x)
        x = self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        if not self.norm_first:
            x = self.norm(x)
        return x


class GatedCNNBlock(nn.Module):
    """Gated CNN block, channels-last.

    `norm -> fc1` expands to a gate `g` and a value split into an identity part `i` and a mixed
    part `c` (`conv_ratio * dim` channels, mixed over the tokens by `conv`);
    `out = x + drop_path(ls(fc2(act(g) * cat(i, conv(c)))))`.

    `conv` holds the token mixer `token_mixer(conv_chs)` builds (see `mixers/`): MambaOut's
    depthwise conv by default, or an SSM (which makes this a Mamba block) or attention. A mixer
    name or `MixerSpec` that leaves `kernel_size` unset takes the block's. The attribute keeps
    timm's name, so the default block's state dict is timm's.

    `fused=True` runs the depthwise-conv mixing as one autograd function (`fused_gated_conv`);
    TorchScript and models built under timm's `set_scriptable(True)` or `set_exportable(True)`
    run the plain module code, which computes the same function.
    """

    def __init__(
        self,
        dim: int,
        expansion_ratio: float = 8 / 3,
        kernel_size: int = 7,
        conv_ratio: float = 1.0,
        ls_init_value: float | None = None,
        norm_layer: type[nn.Module] = LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        drop_path: float = 0.0,
        token_mixer: MixerLayer = "gated_conv",
        fused: bool = True,
    ):
        super().__init__()
        hidden = int(expansion_ratio * dim)
        conv_chs = int(conv_ratio * dim)
        if not 0 < conv_chs <= hidden:
            raise ValueError(
                f"conv_ratio={conv_ratio} gives {conv_chs} conv channels; it must be in (0, {hidden}] "
                f"for dim={dim} and expansion_ratio={expansion_ratio}."
            )
        self.split_sizes = (hidden, hidden - conv_chs, conv_chs)
        self.norm = norm_layer(dim)
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.act = act_layer()
        self.conv = mixer_layer(token_mixer, kernel_size=kernel_size)(conv_chs)
        self.fc2 = nn.Linear(hidden, dim)
        self.ls = LayerScale(dim, init_values=ls_init_value) if ls_init_value is not None else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.fused_activation = None
        fusable = fused and not is_scriptable() and not is_exportable()
        if fusable and type(self.conv) is DepthwiseConvMixer and not self.conv.causal:
            self.fused_activation = supports_fused_activation(self.act)

    @torch.jit.unused
    def _fused_mix(self, x: torch.Tensor, activation: str) -> torch.Tensor:
        return fused_gated_conv_weights(
            x,
            self.fc1.weight,
            self.fc1.bias,
            self.conv.weight,
            self.conv.bias,
            self.fc2.weight,
            self.fc2.bias,
            self.split_sizes[0],
            self.conv.padding[0],
            activation,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        activation = self.fused_activation
        if activation is not None and not torch.jit.is_scripting():
            x = self._fused_mix(self.norm(x), activation)
        else:
            g, i, c = torch.split(self.fc1(self.norm(x)), self.split_sizes, dim=-1)
            c = self.conv(c)
            x = self.fc2(self.act(g) * torch.cat((i, c), dim=-1))
        return shortcut + self.drop_path(self.ls(x))


class MambaOutStage(nn.Module):
    """An optional downsampling layer followed by `depth` Gated CNN blocks, NHWC in and out.

    `token_mixer` is the mixer layer of every block of the stage (see `GatedCNNBlock`).
    """

    def __init__(
        self,
        dim: int,
        dim_out: int | None = None,
        depth: int = 4,
        expansion_ratio: float = 8 / 3,
        kernel_size: int = 7,
        conv_ratio: float = 1.0,
        downsample: str = "",
        ls_init_value: float | None = None,
        norm_layer: type[nn.Module] = LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        drop_path: float | Sequence[float] = 0.0,
        token_mixer: MixerLayer = "gated_conv",
        fused: bool = True,
    ):
        super().__init__()
        dim_out = dim_out or dim
        self.grad_checkpointing = False
        if downsample in ("conv", "conv_nf"):
            self.downsample = Downsample(dim, dim_out, norm_first=downsample == "conv_nf", norm_layer=norm_layer)
        elif downsample == "":
            if dim != dim_out:
                raise ValueError(f"A stage without downsampling keeps its width, got dim={dim}, dim_out={dim_out}.")
            self.downsample = nn.Identity()
        else:
            raise ValueError(f"Unknown downsample '{downsample}', expected 'conv', 'conv_nf' or ''.")

        drop_path_rates = list(drop_path) if isinstance(drop_path, Sequence) else [drop_path] * depth
        if len(drop_path_rates) != depth:
            raise ValueError(f"Got {len(drop_path_rates)} drop path rates for {depth} blocks.")
        self.blocks = nn.Sequential(
            *[
                GatedCNNBlock(
                    dim=dim_out,
                    expansion_ratio=expansion_ratio,
                    kernel_size=kernel_size,
                    conv_ratio=conv_ratio,
                    ls_init_value=ls_init_value,
                    norm_layer=norm_layer,
                    act_layer=act_layer,
                    drop_path=rate,
                    token_mixer=token_mixer,
                    fused=fused,
                )
                for rate in drop_path_rates
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and self.training and torch.is_grad_enabled() and not torch.jit.is_scripting():
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
        else:
            x = self.blocks(x)
        return x


class MlpHead(nn.Module):
    """Classifier head on NHWC features: `pool -> norm -> [fc -> act -> (norm)] -> dropout -> fc`.

    `hidden_norm=True` is the paper's head (a norm after the hidden activation); `False` is timm's
    'norm_mlp' head. `hidden_size=None` (or 0) drops the hidden layer.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int = 1000,
        hidden_size: int | None = None,
        hidden_norm: bool = True,
        pool_type: str = "avg",
        norm_layer: type[nn.Module] = LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        self.pool_type = self._check_pool_type(pool_type)
        self.in_features = in_features
        self.norm = norm_layer(in_features)
        if hidden_size:
            layers = [("fc", nn.Linear(in_features, hidden_size)), ("act", act_layer())]
            if hidden_norm:
                layers.append(("norm", norm_layer(hidden_size)))
            self.pre_logits = nn.Sequential(OrderedDict(layers))
            self.num_features = hidden_size
        else:
            self.pre_logits = nn.Identity()
            self.num_features = in_features
        self.head_dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    @staticmethod
    def _check_pool_type(pool_type: str) -> str:
        if pool_type not in ("", "avg", "max", "avgmax"):
            raise ValueError(f"Unknown global_pool '{pool_type}', expected 'avg', 'max', 'avgmax' or '' (none).")
        return pool_type

    def _classifier(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        fc = nn.Linear(self.num_features, num_classes)
        trunc_normal_(fc.weight, std=0.02)
        nn.init.zeros_(fc.bias)
        return fc

    def reset(
        self,
        num_classes: int,
        pool_type: str | None = None,
        reset_other: bool = False,
        in_features: int | None = None,
    ) -> None:
        """Replace the final classifier (freshly initialised) and optionally the pooling.

        `reset_other=True` also removes the norm and the hidden layer (timm's `reset_other`), so the
        head pools and classifies its input directly; only then may `in_features` change.
        """
        reference = next(self.parameters(), None)
        if pool_type is not None:
            self.pool_type = self._check_pool_type(pool_type)
        if reset_other:
            self.norm = nn.Identity().train(self.training)
            self.pre_logits = nn.Identity().train(self.training)
            self.num_features = self.in_features
        if in_features is not None and in_features != self.in_features:
            if not isinstance(self.norm, nn.Identity):
                raise ValueError(
                    f"The head input width can change ({self.in_features} -> {in_features}) only with "
                    "reset_other=True, which removes the norm sized for it."
                )
            self.in_features = in_features
            if isinstance(self.pre_logits, nn.Identity):
                self.num_features = in_features
        fc = self._classifier(num_classes)
        if reference is not None:
            fc = fc.to(device=reference.device, dtype=reference.dtype)
        self.fc = fc.train(self.training)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.pool_type == "avg":
            x = x.mean(dim=(1, 2))
        elif self.pool_type == "max":
            x = x.amax(dim=(1, 2))
        elif self.pool_type == "avgmax":
            x = 0.5 * (x.mean(dim=(1, 2)) + x.amax(dim=(1, 2)))
        x = self.pre_logits(self.norm(x))
        x = self.head_dropout(x)
        return x if pre_logits else self.fc(x)


class MambaOut(nn.Module):
    """MambaOut image classifier and multi-scale backbone.

    The arguments up to `head_fn` are timm's, in timm's order; the rest are this project's.

    Args:
        in_chans: Input image channels.
        num_classes: Classifier outputs; 0 leaves the head without a final classifier.
        global_pool: Head pooling: 'avg', 'max', 'avgmax' or '' (none).
        depths: Blocks per stage.
        dims: Channels per stage.
        norm_layer: Normalisation over the channel (last) dim.
        act_layer: Activation of the stem and blocks (class or timm name such as 'gelu', 'silu').
        conv_ratio: Share of the input width that goes through the depthwise conv.
        expansion_ratio: Hidden width of a block relative to its input width.
        kernel_size: Size of the depthwise conv of each block.
        stem_mid_norm: Normalise between the two stem convs.
        ls_init_value: Initial layer-scale value (timm's block starts at 1e-5 whatever the value);
            None disables layer scale.
        downsample: 'conv' (conv then norm) or 'conv_nf' (norm then conv) between stages.
        drop_path_rate: Stochastic depth rate of the last block, rising linearly from 0 over all blocks.
        drop_rate: Dropout before the final classifier.
        head_fn: 'default' (the paper's MLP head, with a norm after the hidden activation) or
            'norm_mlp' (no hidden norm).
        head_hidden_size: Hidden width of the head MLP; defaults to 4 x dims[-1], 0 disables it.
        head_act_layer: Activation of the head MLP (GELU in every variant, SiLU ones included).
        token_mixer: Mixer layer of the blocks, one for all stages or a list with one per stage:
            'gated_conv' (MambaOut's depthwise conv), 'ssm' (Mamba's conv + selective scan),
            'attention' (multi-head self-attention), a `MixerSpec`, or any callable
            `(dim) -> nn.Module`. See `mixers/`.
        mixer_args: Arguments of the named mixers, e.g. {'scan': 'cross'} or {'causal': True}.
        fused_blocks: Run the depthwise-conv blocks' mixing as one fused function (the default; same
            outputs, faster); False runs the plain module code, as TorchScript does.
        **kwargs: Mixer arguments by name, as in `mixer_args`:
            scan: 'ssm' token order: 'raster' (the default; causal, as Mamba), 'bidirectional' (as
                Vision Mamba) or 'cross' (four directions, as VMamba).
            causal: 'attention' and 'gated_conv': each token sees only the tokens at or before it
                in raster order (default False).
            num_heads, head_dim (default 32), window_size (None: the whole stage), max_tokens:
                'attention'; d_state (default 16), dt_rank, chunk_size: 'ssm'.

        Each mixer argument is one value, or a list with one entry per stage (None: the mixer's
        default). An argument no named mixer takes is an error.
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 576),
        norm_layer: type[nn.Module] = LayerNorm,
        act_layer: LayerType = nn.GELU,
        conv_ratio: float = 1.0,
        expansion_ratio: float = 8 / 3,
        kernel_size: int = 7,
        stem_mid_norm: bool = True,
        ls_init_value: float | None = None,
        downsample: str = "conv",
        drop_path_rate: float = 0.0,
        drop_rate: float = 0.0,
        head_fn: str = "default",
        head_hidden_size: int | None = None,
        head_act_layer: LayerType = nn.GELU,
        token_mixer: MixerLayer | Sequence[MixerLayer] = "gated_conv",
        mixer_args: dict[str, Any] | None = None,
        fused_blocks: bool = True,
        **kwargs: Any,
    ):
        super().__init__()
        depths, dims = tuple(depths), tuple(dims)
        if len(depths) != len(dims):
            raise ValueError(f"depths {depths} and dims {dims} must have one entry per stage.")
        if head_fn not in ("default", "norm_mlp"):
            raise ValueError(f"Unknown head_fn '{head_fn}', expected 'default' or 'norm_mlp'.")
        mixers = stage_mixers(len(depths), token_mixer, _mixer_kwargs(mixer_args, kwargs))
        act_layer = get_act_layer(act_layer)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.output_fmt = "NHWC"
        self.pretrained_cfg = self.default_cfg = _cfg()

        self.stem = Stem(in_chans, dims[0], mid_norm=stem_mid_norm, act_layer=act_layer, norm_layer=norm_layer)

        drop_path_rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(depths)
        self.stages = nn.Sequential()
        self.feature_info = []
        prev_dim, reduction = dims[0], 4
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            if i > 0:
                reduction *= 2
            self.stages.append(
                MambaOutStage(
                    dim=prev_dim,
                    dim_out=dim,
                    depth=depth,
                    downsample=downsample if i > 0 else "",
                    expansion_ratio=expansion_ratio,
                    kernel_size=kernel_size,
                    conv_ratio=conv_ratio,
                    ls_init_value=ls_init_value,
                    norm_layer=norm_layer,
                    act_layer=act_layer,
                    drop_path=drop_path_rates[i].tolist(),
                    token_mixer=mixers[i],
                    fused=fused_blocks,
                )
            )
            self.feature_info.append(dict(num_chs=dim, reduction=reduction, module=f"stages.{i}"))
            prev_dim = dim
        self.num_features = prev_dim

        self.head = MlpHead(
            prev_dim,
            num_classes,
            hidden_size=4 * prev_dim if head_hidden_size is None else head_hidden_size,
            hidden_norm=head_fn == "default",
            pool_type=global_pool,
            norm_layer=norm_layer,
            act_layer=get_act_layer(head_act_layer),
            drop_rate=drop_rate,
        )
        self.head_hidden_size = self.head.num_features

        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def no_weight_decay(self) -> set[str]:
        """Names of parameters kept out of weight decay beyond norms and biases (the SSM's `A_log`)."""
        return {name for name, _ in self.named_parameters() if name.rpartition(".")[2] == "A_log"}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter-name patterns ordering the layers from input to output (for layer-wise lr decay)."""
        if coarse:
            return dict(stem=r"^stem", blocks=r"^stages\.(\d+)")
        return dict(
            stem=r"^stem",
            blocks=[
                (r"^stages\.(\d+)\.downsample", (0,)),  # grouped with the first block of its stage
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
            ],
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass (training only) to save memory."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None, reset_other: bool = False) -> None:
        """Replace the final classifier with a freshly initialised one of `num_classes` outputs.

        `reset_other=True` also drops the head's norm and hidden layer (as timm's), leaving pooling
        and the classifier on the final-stage features.
        """
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, reset_other=reset_other, in_features=self.num_features)
        self.head_hidden_size = self.head.num_features

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs for dense prediction.

        Args:
            x: Images `[B, C, H, W]`.
            indices: Stages to return: all if None, the last n if an int, else these stage indices.
            norm: Accepted for timm compatibility; MambaOut has no norm on its stage outputs.
            stop_early: Skip the stages after the last requested one.
            output_fmt: 'NCHW' or 'NHWC' for the intermediates.
            intermediates_only: Return only the intermediates.
        Returns:
            The intermediates, or `(final NHWC features, intermediates)`.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got '{output_fmt}'.")
        take_indices = self._stage_indices(indices)
        last_index = max(take_indices) if stop_early or intermediates_only else len(self.stages) - 1

        intermediates = []
        x = self.stem(x)
        for i, stage in enumerate(self.stages[: last_index + 1]):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else x)

        if intermediates_only:
            return intermediates
        return x, intermediates

    def _stage_indices(self, indices: int | Sequence[int] | None) -> list[int]:
        num_stages = len(self.stages)
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

    def prune_intermediate_layers(
        self,
        indices: int | Sequence[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the stages after the last of `indices`, and the head; returns the kept stage indices.

        The head is reduced to a pass-through (unless `prune_head=False` and all stages are kept);
        `feature_info` keeps describing all stages, as timm's. `prune_norm` is accepted for timm
        compatibility (MambaOut has no norm on its stage outputs).
        """
        take_indices = self._stage_indices(indices)
        num_kept = max(take_indices) + 1
        prune_end = num_kept < len(self.stages)
        self.stages = self.stages[:num_kept]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[num_kept - 1]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "", reset_other=True)
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final-stage features, channels-last `[B, H/32, W/32, C]`."""
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _mixer_kwargs(mixer_args: dict[str, Any] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`mixer_args` and the mixer arguments given by name, refusing unknown and repeated keys."""
    known = {name for mixer in TOKEN_MIXERS for name in mixer_arguments(mixer)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(
            f"MambaOut got unexpected keyword argument {', '.join(repr(k) for k in unknown)}; besides its own "
            f"arguments it takes the token mixers' ({', '.join(sorted(known))})."
        )
    repeated = sorted(set(kwargs) & set(mixer_args or {}))
    if repeated:
        raise ValueError(f"{', '.join(repeated)} given both by name and inside mixer_args: give each once.")
    return {**(mixer_args or {}), **kwargs}


PretrainedArg = str | os.PathLike | None
PretrainedCfgArg = str | dict[str, Any] | None


def _create_mambaout(
    variant: str,
    pretrained: PretrainedArg | bool = None,
    pretrained_cfg: PretrainedCfgArg = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a variant with timm's model builder: its pretrained cfg, defaults and feature wrappers.

    `pretrained_cfg` is a pretrained tag of timm's table (`'sw_e150_in12k'`) or a cfg dict; the
    tag's cfg gives the defaults (`num_classes`, `in_chans`) and `model.pretrained_cfg`.
    `pretrained` is a weights file, export folder or `hf-hub:` repo loaded (see `load_pretrained`)
    before a `features_only=True` model is wrapped, as timm loads its weights.
    """
    if isinstance(pretrained_cfg, str):
        tags = [name.split(".", 1)[1] for name in timm.list_pretrained(f"{variant}.*")]
        if pretrained_cfg not in tags:
            raise ValueError(
                f"Unknown pretrained tag '{pretrained_cfg}' for {variant}; its tags are {', '.join(tags)} "
                f"(name a model as '{variant}.<tag>')."
            )
    build = pretrained_builder(MambaOut, pretrained)

    return build_model_with_cfg(
        build,
        variant,
        pretrained=False,
        pretrained_cfg=pretrained_cfg,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **kwargs,
    )


# The paper's models.


@register_model
def mambaout_femto(
    pretrained: PretrainedArg = None,
    pretrained_cfg: PretrainedCfgArg = None,
    **kwargs: Any,
) -> nn.Module:
    """MambaOut-Femto, 7.3M params."""
    args = dict(depths=(3, 3, 9, 3), dims=(48, 96, 192, 288))
    return _create_mambaout("mambaout_femto", pretrained, pretrained_cfg, **dict(args, **kwargs))


@register_model
def mambaout_kobe(
    pretrained: PretrainedArg = None,
    pretrained_cfg: PretrainedCfgArg = None,
    **kwargs: Any,
) -> nn.Module:
    """MambaOut-Kobe (24 blocks, in memory of Kobe Bryant), 9.1M params."""
    args = dict(depths=(3, 3, 15, 3), dims=(48, 96, 192, 288))
    return _create_mambaout("mambaout_kobe", pretrained, pretrained_cfg, **dict(args, **kwargs))


@register_model
def mambaout_tiny(
    pretrained: PretrainedArg = None,
    pretrained_cfg: PretrainedCfgArg = None,
    **kwargs: Any,
) -> nn.Module:
    """MambaOut-Tiny, 26.5M params."""
    args = dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 576))
    return _create_mambaout("mambaout_tiny", pretrained, pretrained_cfg, **dict(args, **kwargs))


@register_model
def mambaout_small(
    pretrained: PretrainedArg = None,
    pretrained_cfg: PretrainedCfgArg = None,
    **kwargs: Any,
) -> nn.Module:
    """MambaOut-Small, 48.5M params."""
    args = dict(depths=(3, 4, 27, 3), dims=(96, 192, 384, 576))
    return _create_mambaout("mambaout_small", pretrained, pretrained_cfg, **dict(args, **kwargs))


@register_model
def mambaout_base(
    pretrained: PretrainedArg = None,
    pretrained_cfg: PretrainedCfgArg = None,
    **kwargs: Any,
) -> nn.Module:
    """MambaOut-Base, 84.8M params."""
    args = dict(depths=(3, 4, 27, 3), dims=(128, 256, 512, 768))
    return _create_mambaout("mambaout_base", pretrained, pretrained_cfg, **dict(args, **kwargs))


# timm's variants: layer scale, norm-first downsampling, no stem mid-norm, 'norm_mlp' head.

# timm declares ls_init_value=1e-6 for these, but its block builds `LayerScale(dim)`, which starts at
# LayerScale's default 1e-5; 1e-5 here gives the same initial model as timm's.
_RW_ARGS = dict(stem_mid_norm=False, downsample="conv_nf", ls_init_value=1e-5, head_fn="norm_mlp")


@register_model
def mambaout_small_rw(
    pretrained: PretrainedArg = None,
    pretrained_cfg: PretrainedCfgArg = None,
    **kwargs: Any,
) -> nn.Module:
    """MambaOut-Small, timm's training variant."""
    args = dict(depths=(3, 4, 27, 3), dims=(96, 192, 384, 576), **_RW_ARGS)
    return _create_mambaout("mambaout_small_rw", pretrained, pretrained_cfg, **dict(args, **kwargs))


@register_model
def mambaout_base_short_rw(
    pretrained: PretrainedArg = None,
    pretrained_cfg: PretrainedCfgArg = None,
    **kwargs: Any,
) -> nn.Module:
    """MambaOut-Base with fewer, wider blocks (timm)."""
    args = dict(depths=(3, 3, 25, 3), dims=(128, 256, 512, 768), expansion_ratio=3.0, conv_ratio=1.25, **_RW_ARGS)
    return _create_mambaout("mambaout_base_short_rw", pretrained, pretrained_cfg, **dict(args, **kwargs))


@register_model
def mambaout_base_tall_rw(
    pretrained: PretrainedArg = None,
    pretrained_cfg: PretrainedCfgArg = None,
    **kwargs: Any,
) -> nn.Module:
    """MambaOut-Base with more, narrower blocks (timm)."""
    args = dict(depths=(3, 4, 30, 3), dims=(128, 256, 512, 768), expansion_ratio=2.5, conv_ratio=1.25, **_RW_ARGS)
    return _create_mambaout("mambaout_base_tall_rw", pretrained, pretrained_cfg, **dict(args, **kwargs))


@register_model
def mambaout_base_wide_rw(
    pretrained: PretrainedArg = None,
    pretrained_cfg: PretrainedCfgArg = None,
    **kwargs: Any,
) -> nn.Module:
    """MambaOut-Base with wider blocks and SiLU (timm)."""
    args = dict(
        depths=(3, 4, 27, 3),
        dims=(128, 256, 512, 768),
        expansion_ratio=3.0,
        conv_ratio=1.5,
        act_layer="silu",
        **_RW_ARGS,
    )
    return _create_mambaout("mambaout_base_wide_rw", pretrained, pretrained_cfg, **dict(args, **kwargs))


@register_model
def mambaout_base_plus_rw(
    pretrained: PretrainedArg = None,
    pretrained_cfg: PretrainedCfgArg = None,
    **kwargs: Any,
) -> nn.Module:
    """MambaOut-Base with more, wider blocks and SiLU (timm)."""
    args = dict(
        depths=(3, 4, 30, 3),
        dims=(128, 256, 512, 768),
        expansion_ratio=3.0,
        conv_ratio=1.5,
        act_layer="silu",
        **_RW_ARGS,
    )
    return _create_mambaout("mambaout_base_plus_rw", pretrained, pretrained_cfg, **dict(args, **kwargs))
