"""The submodules a sharded run gathers one at a time: a network's blocks and heads.

Fully sharded data parallel training (PyTorch's FSDP2, ``fully_shard``) keeps each weight split
across the processes and gathers a unit's weights only while that unit computes. The units are
the repeated blocks of a backbone and the heads on top of it; what is left (stems, downsampling
layers, norms, a classifier) stays with the root.
"""

from __future__ import annotations

import re

from torch import nn
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import FeaturePyramidNetwork

from .upernet import FCNHead, UperNetHead

__all__ = ["HEAD_TYPES", "shard_units"]

#: Heads that are one unit each: UperNet's decode and auxiliary heads, torchvision's detection parts.
HEAD_TYPES: tuple[type[nn.Module], ...] = (UperNetHead, FCNHead, FeaturePyramidNetwork, RegionProposalNetwork, RoIHeads)

# The containers whose entries are blocks: `blocks` (MambaOut's and timm's `stages[i].blocks[j]`,
# a ViT's `blocks[i]`) and ResNet's `layer1` ... `layer4`.
_BLOCK_CONTAINER = re.compile(r"blocks|layer\d+")


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The submodules of ``model`` to shard one by one, each before any unit that holds it.

    A model that defines ``shard_units()`` gives its own list. Otherwise: every entry of a block
    container (a ``blocks`` or ``layer<N>`` ``nn.Sequential`` / ``nn.ModuleList``) and every
    :data:`HEAD_TYPES` module, leaving out those without parameters.
    """
    own = getattr(model, "shard_units", None)
    if callable(own):
        return list(own())
    units = []
    for name, module in model.named_modules():
        parent, _, _ = name.rpartition(".")
        container = model.get_submodule(parent) if name else None
        in_blocks = isinstance(container, (nn.Sequential, nn.ModuleList)) and bool(
            _BLOCK_CONTAINER.fullmatch(parent.rpartition(".")[2])
        )
        if (in_blocks or isinstance(module, HEAD_TYPES)) and any(True for _ in module.parameters()):
            units.append(module)
    return units[::-1]  # named_modules lists parents first
