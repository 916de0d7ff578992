"""Parameters and MACs of UperNet segmentors, counted as the MambaOut paper reports them (Table 4).

    python benchmarks/segmentation_complexity.py
    python benchmarks/segmentation_complexity.py --backbones mambaout_tiny mambaout_small --height 512 --width 2048

The network is built on PyTorch's meta device (no memory, no compute) and one whole-image forward
pass at the given size is counted with ``torch.utils.flop_counter.FlopCounterMode``; MACs are half
the counted FLOPs (convolutions and matrix products). mmsegmentation reports the 512x2048 input
with whole-image inference, without the auxiliary head's compute (it is not used at inference) but
with its parameters. Paper: UperNet-MambaOut-Tiny 54M parameters, 938 GMACs.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from mambaout_pl.models import UperNetSegmentor

PAPER = {"mambaout_tiny": (54, 938)}


def complexity(backbone: str, height: int, width: int, num_classes: int = 150) -> dict[str, float]:
    """Parameters (with and without the auxiliary head) and GMACs of one whole-image forward pass."""
    with torch.device("meta"):
        model = UperNetSegmentor(backbone, num_classes=num_classes).eval()
        images = torch.empty(1, 3, height, width)
    parameters = sum(p.numel() for p in model.parameters())
    auxiliary = sum(p.numel() for p in model.aux_head.parameters()) if model.aux_head is not None else 0
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images)
    per_module = counter.get_flop_counts()
    return {
        "backbone": backbone,
        "params_M": parameters / 1e6,
        "params_without_aux_M": (parameters - auxiliary) / 1e6,
        "GMACs": counter.get_total_flops() / 2e9,
        "backbone_GMACs": sum(per_module.get("UperNetSegmentor.backbone", {}).values()) / 2e9,
        "decode_head_GMACs": sum(per_module.get("UperNetSegmentor.decode_head", {}).values()) / 2e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["mambaout_tiny", "mambaout_small", "mambaout_base"])
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    rows = [complexity(backbone, args.height, args.width) for backbone in args.backbones]
    print(f"UperNet, 150 classes, {args.height}x{args.width}, whole image (paper figures in brackets)")
    for row in rows:
        paper_params, paper_gmacs = PAPER.get(row["backbone"], ("?", "?"))
        print(
            f"{row['backbone']:<16} params {row['params_M']:7.2f}M [{paper_params}M] "
            f"(without aux head {row['params_without_aux_M']:.2f}M)  GMACs {row['GMACs']:8.1f} [{paper_gmacs}] "
            f"(backbone {row['backbone_GMACs']:.1f}, decode head {row['decode_head_GMACs']:.1f})"
        )
    if args.json:
        with open(args.json, "w") as file:
            json.dump(rows, file, indent=2)


if __name__ == "__main__":
    main()
