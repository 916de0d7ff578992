"""Token mixers a Gated CNN block can hold on its `c` branch: gated conv (MambaOut), SSM (Mamba), attention.

Every mixer maps channels-last tokens `[B, H, W, C]` to `[B, H, W, C]`:

- `gated_conv` (`DepthwiseConvMixer`, gated_conv.py): MambaOut's depthwise k x k convolution.
- `ssm` (`SelectiveScanMixer`, ssm.py): the Mamba block's mixer, the convolution then an activation
  and a selective state-space scan (S6) over the H*W tokens, in one of the `SCANS` orders.
- `attention` (`AttentionMixer`, attention.py): multi-head self-attention over the H*W tokens,
  causal or fully visible, optionally within windows.

factory.py turns a name and its arguments into a layer factory (`MixerSpec`) that the block calls
with its channel count, and resolves a model's per-stage choice (`stage_mixers`).
"""

from .attention import AttentionMixer
from .factory import TOKEN_MIXERS, MixerLayer, MixerSpec, create_mixer, mixer_arguments, mixer_layer, stage_mixers
from .gated_conv import DepthwiseConvMixer
from .ssm import (
    SCANS,
    SelectiveScanMixer,
    chunked_selective_scan,
    selective_scan,
    selective_scan_fn,
    selective_scan_macs,
)

__all__ = [
    "DepthwiseConvMixer",
    "SelectiveScanMixer",
    "AttentionMixer",
    "TOKEN_MIXERS",
    "SCANS",
    "MixerLayer",
    "MixerSpec",
    "selective_scan",
    "chunked_selective_scan",
    "selective_scan_macs",
    "selective_scan_fn",
    "create_mixer",
    "mixer_layer",
    "mixer_arguments",
    "stage_mixers",
]
