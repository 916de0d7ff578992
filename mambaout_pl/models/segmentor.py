"""UperNetSegmentor: backbone stage outputs -> optional LayerNorm per stage -> UperNet (+ auxiliary FCN head).

The MambaOut authors' segmentation set-up (never released; described in PAPER_FACTS.md): UperNet on
the four stage outputs of MambaOut, each normalised by a LayerNorm, with mmsegmentation's auxiliary
FCN head on the third stage. Saved and rebuilt with `save_pretrained` / `from_pretrained`
(`huggingface_hub.PyTorchModelHubMixin`, safetensors weights, a `config.json` of the constructor
arguments); `config` gives the `model_name` / `model_args` pair with which
`mambaout_pl.models.create_model` (and so an export folder) rebuilds the network.
"""

import copy
import os
from collections.abc import Sequence
from typing import Any

import torch
from huggingface_hub import PyTorchModelHubMixin
from timm.layers import LayerNorm2d
from torch import nn

from .backbones import FeatureBackbone
from .registry import untrusted_source
from .upernet import FCNHead, UperNetHead, resize

__all__ = ["UperNetSegmentor"]

DECODE_HEADS = ("upernet", "fcn")


class UperNetSegmentor(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="mambaout-pl",
    tags=["image-segmentation", "mambaout", "upernet"],
    pipeline_tag="image-segmentation",
    license="apache-2.0",
):
    """Semantic segmentation network: `segmentor(images)` gives logits `[B, num_classes, H, W]` at the image size.

    Args:
        backbone: Backbone name: ours (`mambaout_tiny`), a timm model, or a dotted class path.
        num_classes: Output classes.
        decode_head: 'upernet' (pyramid pooling + FPN over all stages) or 'fcn' (an FCN head on the
            last stage only, a light baseline).
        channels: Width of the decode head (512 in the paper's UperNet).
        pool_scales: Bin counts of UperNet's pyramid pooling.
        dropout: Dropout before each classifier.
        stage_norm: A LayerNorm on each backbone stage output (the MambaOut authors' setting).
        aux_head: Add the auxiliary FCN head (trained with a lower loss weight, unused at inference).
        aux_stage: Position, among the selected stages, of the auxiliary head's input (2: the third).
        aux_channels: Width of the auxiliary head.
        out_indices: Backbone stages to use (see `FeatureBackbone`).
        drop_path_rate: Stochastic depth rate of the backbone's last block.
        backbone_args: Further arguments of the backbone model.
        pretrained: A local checkpoint file of ImageNet weights for the backbone, read once here.
            It is left out of the saved config: `from_pretrained` builds with None and then loads
            the whole network's saved weights.
    """

    def __init__(
        self,
        backbone: str = "mambaout_tiny",
        num_classes: int = 150,
        decode_head: str = "upernet",
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        stage_norm: bool = True,
        aux_head: bool = True,
        aux_stage: int = 2,
        aux_channels: int = 256,
        out_indices: Sequence[int] = (-4, -3, -2, -1),
        drop_path_rate: float = 0.0,
        backbone_args: dict[str, Any] | None = None,
        pretrained: str | os.PathLike | None = None,
    ):
        super().__init__()
        if isinstance(self._hub_mixin_config, dict):
            self._hub_mixin_config.pop("pretrained", None)  # a local file: not part of the architecture
        if decode_head not in DECODE_HEADS:
            raise ValueError(f"decode_head='{decode_head}' is not one of {list(DECODE_HEADS)}.")
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be >= 1.")
        self.num_classes = num_classes
        self.backbone = FeatureBackbone(
            backbone,
            out_indices=out_indices,
            pretrained=pretrained,
            drop_path_rate=drop_path_rate,
            **(backbone_args or {}),
        )
        stage_channels = self.backbone.channels
        if aux_head and not -len(stage_channels) <= aux_stage < len(stage_channels):
            raise ValueError(f"aux_stage={aux_stage} is not one of the {len(stage_channels)} selected stages.")
        self.stage_norms = nn.ModuleList(
            [LayerNorm2d(chs, eps=1e-6) if stage_norm else nn.Identity() for chs in stage_channels]
        )
        if decode_head == "upernet":
            self.decode_head: nn.Module = UperNetHead(stage_channels, num_classes, channels, pool_scales, dropout)
        else:
            self.decode_head = FCNHead(stage_channels[-1], num_classes, channels, num_convs=2, dropout=dropout)
        self.decode_head_type = decode_head
        self.aux_stage = aux_stage
        self.aux_head = (
            FCNHead(stage_channels[aux_stage], num_classes, aux_channels, dropout=dropout) if aux_head else None
        )
        # named now: FSDP's `fully_shard` later swaps the class for a generated subclass
        self._model_name = f"{type(self).__module__}.{type(self).__qualname__}"
        self._model_args = {
            "backbone": backbone,
            "num_classes": num_classes,
            "decode_head": decode_head,
            "channels": channels,
            "pool_scales": [int(scale) for scale in pool_scales],
            "dropout": dropout,
            "stage_norm": stage_norm,
            "aux_head": aux_head,
            "aux_stage": aux_stage,
            "aux_channels": aux_channels,
            "out_indices": list(out_indices),
            "drop_path_rate": drop_path_rate,
            "backbone_args": dict(backbone_args or {}),
        }

    @property
    def config(self) -> dict[str, Any]:
        """`model_name` and JSON-serialisable `model_args` (without `pretrained`) that rebuild this network."""
        return {"model_name": self._model_name, "model_args": copy.deepcopy(self._model_args)}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> "UperNetSegmentor":
        """Rebuild a saved segmentor (a folder or Hub repo); the backbone name in its config.json resolves as
        a name from a file (see `mambaout_pl.models.untrusted_source`)."""
        with untrusted_source(f"the config.json of '{pretrained_model_name_or_path}'"):
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def forward_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Normalised NCHW stage outputs."""
        return [norm(feature) for norm, feature in zip(self.stage_norms, self.backbone(images))]

    def forward_heads(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decode-head logits and auxiliary logits (None without the auxiliary head) at their own resolution."""
        features = self.forward_features(images)
        if self.decode_head_type == "upernet":
            logits = self.decode_head(features)
        else:
            logits = self.decode_head(features[-1])
        aux_logits = self.aux_head(features[self.aux_stage]) if self.aux_head is not None else None
        return logits, aux_logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits `[B, num_classes, H, W]` at the size of `images` (bilinear)."""
        features = self.forward_features(images)
        if self.decode_head_type == "upernet":
            logits = self.decode_head(features)
        else:
            logits = self.decode_head(features[-1])
        return resize(logits, images.shape[-2:])
