"""Parameters and MACs of Mask R-CNN detectors, counted as the MambaOut paper reports them (Table 2).

    python benchmarks/detection_complexity.py
    python benchmarks/detection_complexity.py --backbones mambaout_tiny --height 800 --width 1280

The detector is built on PyTorch's meta device (no memory, no compute) and each part is counted with
``torch.utils.flop_counter.FlopCounterMode``; MACs are half the counted FLOPs (convolutions and
matrix products). The paper counted with mmcv's complexity tool (fvcore-style, MACs of
convolutions and linear layers): the backbone, FPN and RPN head on one 800x1280 image, the box
head on 1000 RoIs (the proposals kept at test time) and the mask head on 100 RoIs (the detections
kept per image); RoIAlign, NMS and the LayerNorms' elementwise work are not counted by either tool.
Paper, Table 2: Mask R-CNN with MambaOut-Tiny 43M / 262G, Small 65M / 354G, Base 100M / 495G.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from mambaout_pl.models import RCNNDetector

PAPER = {"mambaout_tiny": (43, 262), "mambaout_small": (65, 354), "mambaout_base": (100, 495)}


def _gmacs(function, *args) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        function(*args)
    return counter.get_total_flops() / 2e9


def complexity(
    backbone: str,
    height: int,
    width: int,
    num_classes: int = 80,
    box_rois: int = 1000,
    mask_rois: int = 100,
) -> dict[str, float]:
    """Parameters and GMACs (backbone + FPN, RPN head, box head, mask head) of one Mask R-CNN forward pass."""
    with torch.device("meta"):
        model = RCNNDetector(backbone, num_classes=num_classes, masks=True).eval()
        images = torch.empty(1, 3, height, width)
        box_features = torch.empty(box_rois, model.backbone.out_channels, 7, 7)
        mask_features = torch.empty(mask_rois, model.backbone.out_channels, 14, 14)
    with torch.no_grad():
        features = list(model.backbone(images).values())
    heads = model.roi_heads
    body_gmacs = _gmacs(model.backbone.body, images)
    parts = {
        "backbone_GMACs": body_gmacs,
        "neck_GMACs": _gmacs(model.backbone, images) - body_gmacs,
        "rpn_GMACs": _gmacs(model.rpn.head, features),
        "box_head_GMACs": _gmacs(lambda x: heads.box_predictor(heads.box_head(x)), box_features),
        "mask_head_GMACs": _gmacs(lambda x: heads.mask_predictor(heads.mask_head(x)), mask_features),
    }
    return {
        "backbone": backbone,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "GMACs": sum(parts.values()),
        **parts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["mambaout_tiny", "mambaout_small", "mambaout_base"])
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    rows = [complexity(backbone, args.height, args.width) for backbone in args.backbones]
    print(f"Mask R-CNN, 80 classes, {args.height}x{args.width}, 1000 box / 100 mask RoIs (paper figures in brackets)")
    for row in rows:
        paper_params, paper_gmacs = PAPER.get(row["backbone"], ("?", "?"))
        print(
            f"{row['backbone']:<16} params {row['params_M']:7.2f}M [{paper_params}M]  "
            f"GMACs {row['GMACs']:7.1f} [{paper_gmacs}] (backbone {row['backbone_GMACs']:.1f}, "
            f"FPN {row['neck_GMACs']:.1f}, RPN {row['rpn_GMACs']:.1f}, box head {row['box_head_GMACs']:.1f}, "
            f"mask head {row['mask_head_GMACs']:.1f})"
        )
    if args.json:
        with open(args.json, "w") as file:
            json.dump(rows, file, indent=2)


if __name__ == "__main__":
    main()
