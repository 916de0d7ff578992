"""RCNNDetector: Mask R-CNN or Faster R-CNN (torchvision) over any multi-scale backbone, with a LayerNorm per stage.

The MambaOut paper's COCO set-up (Table 2; its code was never released): Mask R-CNN with an FPN of
256 channels on P2-P6 (P6 by max-pooling P5) over the four backbone stage outputs, each normalised
by a LayerNorm, trained with mmdetection. The network is assembled from torchvision's detection
parts (`GeneralizedRCNN`, `RegionProposalNetwork`, `RoIHeads`, `FeaturePyramidNetwork`); only the
losses and the RoI pooling change between the two `head_style` settings.

`head_style="mmdet"` reproduces the four ways mmdetection's Mask R-CNN differs from torchvision's
defaults, worth about a point of COCO AP:

1. RoIAlign with `aligned=True` (pixel centres at +0.5, torchvision pools with `aligned=False`) and
   adaptive sampling (`sampling_ratio=0`, torchvision samples 2x2 points per bin), for boxes and masks.
2. 1000 RPN proposals kept per image after NMS in training (torchvision keeps 2000); 2000 before
   NMS per level in training, 1000 in testing, as both do.
3. L1 losses on the box deltas of the RPN and of the box head (torchvision: smooth-L1, beta 1/9),
   with torchvision's normalisation (sum over positives / sampled anchors or RoIs).
4. Binary mask targets: the ground-truth mask is cropped to each positive RoI with aligned RoIAlign
   and thresholded at 0.5 (torchvision trains on the soft, unaligned RoIAlign values).

Saved and rebuilt like the segmentor: `save_pretrained` / `from_pretrained`
(`huggingface_hub.PyTorchModelHubMixin`), and `config` gives the `model_name` / `model_args` pair
with which `mambaout_pl.models.create_model` (and so an export folder) rebuilds the network.
"""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm2d
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign, roi_align
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales

from .backbones import FeatureBackbone
from .registry import untrusted_source

__all__ = [
    "AlignedMultiScaleRoIAlign",
    "FPNBackbone",
    "L1RegionProposalNetwork",
    "MMDetRoIHeads",
    "RCNNDetector",
    "binary_mask_loss",
    "l1_fastrcnn_loss",
]

HEAD_STYLES = ("mmdet", "torchvision")


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's `MultiScaleRoIAlign` (same FPN level mapping) pooling with `roi_align(aligned=True)`."""

    def forward(
        self,
        x: dict[str, torch.Tensor],
        boxes: list[torch.Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> torch.Tensor:
        features = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(
                features, image_shapes, self.canonical_scale, self.canonical_level
            )
        rois = _convert_to_roi_format(boxes)
        if len(features) == 1:
            return roi_align(features[0], rois, self.output_size, self.scales[0], self.sampling_ratio, aligned=True)
        levels = self.map_levels(boxes)
        result = features[0].new_zeros((len(rois), features[0].shape[1], *self.output_size))
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            index = torch.where(levels == level)[0]
            pooled = roi_align(feature, rois[index], self.output_size, scale, self.sampling_ratio, aligned=True)
            result[index] = pooled.to(result.dtype)
        return result


class L1RegionProposalNetwork(RegionProposalNetwork):
    """torchvision's RPN with an L1 loss on the anchor deltas (mmdetection's) instead of smooth-L1."""

    def compute_loss(
        self,
        objectness: torch.Tensor,
        pred_bbox_deltas: torch.Tensor,
        labels: list[torch.Tensor],
        regression_targets: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        positive, negative = self.fg_bg_sampler(labels)
        positive = torch.where(torch.cat(positive, dim=0))[0]
        negative = torch.where(torch.cat(negative, dim=0))[0]
        sampled = torch.cat([positive, negative], dim=0)
        labels = torch.cat(labels, dim=0)
        regression_targets = torch.cat(regression_targets, dim=0)
        box_loss = F.l1_loss(pred_bbox_deltas[positive], regression_targets[positive], reduction="sum")
        box_loss = box_loss / sampled.numel()
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels[sampled])
        return objectness_loss, box_loss


def l1_fastrcnn_loss(
    class_logits: torch.Tensor,
    box_regression: torch.Tensor,
    labels: list[torch.Tensor],
    regression_targets: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Box-head losses as torchvision's `fastrcnn_loss`, with L1 on the class-specific deltas of positive RoIs."""
    labels = torch.cat(labels, dim=0)
    regression_targets = torch.cat(regression_targets, dim=0)
    classification_loss = F.cross_entropy(class_logits, labels)
    positive = torch.where(labels > 0)[0]
    box_regression = box_regression.reshape(class_logits.shape[0], -1, 4)
    box_loss = (
        F.l1_loss(box_regression[positive, labels[positive]], regression_targets[positive], reduction="sum")
        / labels.numel()
    )
    return classification_loss, box_loss


def binary_mask_targets(
    gt_masks: torch.Tensor,
    boxes: torch.Tensor,
    matched_idxs: torch.Tensor,
    size: int,
) -> torch.Tensor:
    """Ground-truth masks cropped to `boxes` by aligned RoIAlign (adaptive sampling), thresholded at 0.5."""
    rois = torch.cat([matched_idxs.to(boxes)[:, None], boxes], dim=1)
    crops = roi_align(gt_masks[:, None].to(rois), rois, (size, size), 1.0, sampling_ratio=0, aligned=True)[:, 0]
    return (crops >= 0.5).to(crops.dtype)


def binary_mask_loss(
    mask_logits: torch.Tensor,
    proposals: list[torch.Tensor],
    gt_masks: list[torch.Tensor],
    gt_labels: list[torch.Tensor],
    mask_matched_idxs: list[torch.Tensor],
) -> torch.Tensor:
    """Mask loss as torchvision's `maskrcnn_loss`, on binary targets (see `binary_mask_targets`)."""
    size = mask_logits.shape[-1]
    labels = torch.cat([gt_label[idxs] for gt_label, idxs in zip(gt_labels, mask_matched_idxs)], dim=0)
    targets = torch.cat(
        [
            binary_mask_targets(masks, boxes, idxs, size)
            for masks, boxes, idxs in zip(gt_masks, proposals, mask_matched_idxs)
        ],
        dim=0,
    )
    if targets.numel() == 0:
        return mask_logits.sum() * 0
    logits = mask_logits[torch.arange(labels.shape[0], device=labels.device), labels]
    return F.binary_cross_entropy_with_logits(logits, targets)


class MMDetRoIHeads(RoIHeads):
    """torchvision's RoI heads trained with mmdetection's losses (`l1_fastrcnn_loss`, `binary_mask_loss`).

    Inference is torchvision's unchanged; keypoint heads are not supported.
    """

    def forward(
        self,
        features: dict[str, torch.Tensor],
        proposals: list[torch.Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, torch.Tensor]] | None = None,
    ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        if targets is None:
            raise ValueError("Training the RoI heads needs targets (boxes, labels and, for masks, masks).")
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        loss_classifier, loss_box_reg = l1_fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
        losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        if self.has_mask():
            positive = [torch.where(label > 0)[0] for label in labels]
            mask_proposals = [boxes[index] for boxes, index in zip(proposals, positive)]
            mask_matched_idxs = [matched[index] for matched, index in zip(matched_idxs, positive)]
            mask_features = self.mask_head(self.mask_roi_pool(features, mask_proposals, image_shapes))
            mask_logits = self.mask_predictor(mask_features)
            losses["loss_mask"] = binary_mask_loss(
                mask_logits,
                mask_proposals,
                [t["masks"] for t in targets],
                [t["labels"] for t in targets],
                mask_matched_idxs,
            )
        return [], losses


class FPNBackbone(nn.Module):
    """Backbone stage outputs -> LayerNorm per stage (optional) -> FPN, with the `out_channels` torchvision wants."""

    def __init__(self, body: FeatureBackbone, out_channels: int = 256, stage_norm: bool = True):
        super().__init__()
        self.body = body
        self.stage_norms = nn.ModuleList(
            [LayerNorm2d(channels, eps=1e-6) if stage_norm else nn.Identity() for channels in body.channels]
        )
        self.fpn = FeaturePyramidNetwork(body.channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels
        self.featmap_names = [str(index) for index in range(len(body.channels))]

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """FPN maps `{"0": P2, ..., "3": P5, "pool": P6}` for a stride-4..32 backbone."""
        stages = self.body(images)
        return self.fpn(
            OrderedDict((name, norm(stage)) for name, norm, stage in zip(self.featmap_names, self.stage_norms, stages))
        )


class RCNNDetector(
    GeneralizedRCNN,
    PyTorchModelHubMixin,
    library_name="mambaout-pl",
    tags=["object-detection", "mambaout", "mask-rcnn"],
    pipeline_tag="object-detection",
    license="apache-2.0",
):
    """Mask R-CNN (`masks=True`) or Faster R-CNN over an FPN on any backbone `FeatureBackbone` builds.

    Called as torchvision's detectors: `detector(images, targets)` with a list of float CHW images in
    [0, 1] gives the loss dict in training mode, and one dict of `boxes` (XYXY, image pixels),
    `labels` (1..num_classes), `scores` and, with masks, `masks` (`[N, 1, H, W]` probabilities) per
    image in eval mode. Images are resized and normalised inside (`GeneralizedRCNNTransform`).

    Args:
        backbone: Backbone name: ours (`mambaout_tiny`), a timm model with multi-scale features, or a
            dotted class path.
        num_classes: Object classes, without the background (labels run from 1 to num_classes).
        masks: Mask R-CNN (a mask head) if True, Faster R-CNN if False.
        head_style: "mmdet" (mmdetection's RoIAlign, proposal count and losses; see the module
            docstring) or "torchvision" (torchvision's defaults).
        backbone_args: Further arguments of the backbone model (`token_mixer`, ...).
        out_indices: Backbone stages fed to the FPN (see `FeatureBackbone`).
        stage_norm: A LayerNorm on each backbone stage output (the MambaOut authors' dense-task setting).
        fpn_channels: Channels of the FPN levels, the RPN head and the mask head's convolutions.
        anchor_sizes: Anchor side of each FPN level, P2 first (each with aspect ratios 0.5, 1 and 2).
        drop_path_rate: Stochastic depth rate of the backbone's last block.
        min_size: Shorter image side after the detector's own resize.
        max_size: Upper bound of the longer side after that resize.
        image_mean: Per-channel mean subtracted from [0, 1] images.
        image_std: Per-channel standard deviation images are divided by.
        box_batch_size_per_image: RoIs sampled per image to train the box and mask heads (a quarter
            of them positive at most); fewer train faster on small images.
        box_detections_per_img: Detections kept per image at inference.
        rpn_pre_nms_top_n_train: RPN proposals kept per FPN level before NMS in training.
        rpn_pre_nms_top_n_test: RPN proposals kept per FPN level before NMS at inference.
        rpn_post_nms_top_n_train: RPN proposals kept per image after NMS in training (None: 1000
            with the "mmdet" head style, 2000 with "torchvision").
        rpn_post_nms_top_n_test: RPN proposals kept per image after NMS at inference, the RoIs the
            box head scores; on small images with few objects 100-200 lose little and test faster.
        pretrained: A local checkpoint file of ImageNet weights for the backbone, read once here.
            It is left out of the saved config: `from_pretrained` builds with None and then loads
            the whole network's saved weights.
    """

    def __init__(
        self,
        backbone: str = "mambaout_tiny",
        num_classes: int = 80,
        masks: bool = True,
        head_style: str = "mmdet",
        backbone_args: dict[str, Any] | None = None,
        out_indices: Sequence[int] = (-4, -3, -2, -1),
        stage_norm: bool = True,
        fpn_channels: int = 256,
        anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
        drop_path_rate: float = 0.0,
        min_size: int = 800,
        max_size: int = 1333,
        image_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        image_std: Sequence[float] = IMAGENET_DEFAULT_STD,
        box_batch_size_per_image: int = 512,
        box_detections_per_img: int = 100,
        rpn_pre_nms_top_n_train: int = 2000,
        rpn_pre_nms_top_n_test: int = 1000,
        rpn_post_nms_top_n_train: int | None = None,
        rpn_post_nms_top_n_test: int = 1000,
        pretrained: str | os.PathLike | None = None,
    ):
        if head_style not in HEAD_STYLES:
            raise ValueError(f"head_style='{head_style}' is not one of {list(HEAD_STYLES)}.")
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be >= 1 (object classes, without the background).")
        mmdet = head_style == "mmdet"
        if rpn_post_nms_top_n_train is None:
            rpn_post_nms_top_n_train = 1000 if mmdet else 2000
        top_n = {
            "rpn_pre_nms_top_n_train": rpn_pre_nms_top_n_train,
            "rpn_pre_nms_top_n_test": rpn_pre_nms_top_n_test,
            "rpn_post_nms_top_n_train": rpn_post_nms_top_n_train,
            "rpn_post_nms_top_n_test": rpn_post_nms_top_n_test,
        }
        for name, value in top_n.items():
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1 (RPN proposals kept).")
        body = FeatureBackbone(
            backbone,
            out_indices=out_indices,
            pretrained=pretrained,
            drop_path_rate=drop_path_rate,
            **(backbone_args or {}),
        )
        fpn = FPNBackbone(body, fpn_channels, stage_norm)
        num_levels = len(fpn.featmap_names) + 1
        if len(anchor_sizes) != num_levels:
            raise ValueError(
                f"anchor_sizes={list(anchor_sizes)} must give one size per FPN level: {num_levels} for "
                f"{len(fpn.featmap_names)} backbone stages and the max-pooled top level."
            )
        anchor_generator = AnchorGenerator(
            tuple((int(size),) for size in anchor_sizes), ((0.5, 1.0, 2.0),) * num_levels
        )
        rpn_class = L1RegionProposalNetwork if mmdet else RegionProposalNetwork
        rpn = rpn_class(
            anchor_generator,
            RPNHead(fpn_channels, anchor_generator.num_anchors_per_location()[0]),
            fg_iou_thresh=0.7,
            bg_iou_thresh=0.3,
            batch_size_per_image=256,
            positive_fraction=0.5,
            pre_nms_top_n={"training": rpn_pre_nms_top_n_train, "testing": rpn_pre_nms_top_n_test},
            post_nms_top_n={"training": rpn_post_nms_top_n_train, "testing": rpn_post_nms_top_n_test},
            nms_thresh=0.7,
        )
        pool_class = AlignedMultiScaleRoIAlign if mmdet else MultiScaleRoIAlign
        sampling_ratio = 0 if mmdet else 2
        heads_class = MMDetRoIHeads if mmdet else RoIHeads
        roi_heads = heads_class(
            pool_class(fpn.featmap_names, 7, sampling_ratio),
            TwoMLPHead(fpn_channels * 7**2, 1024),
            FastRCNNPredictor(1024, num_classes + 1),
            fg_iou_thresh=0.5,
            bg_iou_thresh=0.5,
            batch_size_per_image=box_batch_size_per_image,
            positive_fraction=0.25,
            bbox_reg_weights=None,
            score_thresh=0.05,
            nms_thresh=0.5,
            detections_per_img=box_detections_per_img,
        )
        if masks:
            roi_heads.mask_roi_pool = pool_class(fpn.featmap_names, 14, sampling_ratio)
            roi_heads.mask_head = MaskRCNNHeads(fpn_channels, (fpn_channels,) * 4, 1)
            roi_heads.mask_predictor = MaskRCNNPredictor(fpn_channels, fpn_channels, num_classes + 1)
        transform = GeneralizedRCNNTransform(min_size, max_size, list(image_mean), list(image_std))
        super().__init__(fpn, rpn, roi_heads, transform)
        if isinstance(self._hub_mixin_config, dict):
            self._hub_mixin_config.pop("pretrained", None)  # a local file: not part of the architecture
        self.num_classes = num_classes
        self.masks = masks
        self.head_style = head_style
        # named now: FSDP's `fully_shard` later swaps the class for a generated subclass
        self._model_name = f"{type(self).__module__}.{type(self).__qualname__}"
        self._model_args = {
            "backbone": backbone,
            "num_classes": num_classes,
            "masks": masks,
            "head_style": head_style,
            "backbone_args": dict(backbone_args or {}),
            "out_indices": list(out_indices),
            "stage_norm": stage_norm,
            "fpn_channels": fpn_channels,
            "anchor_sizes": [int(size) for size in anchor_sizes],
            "drop_path_rate": drop_path_rate,
            "min_size": min_size,
            "max_size": max_size,
            "image_mean": [float(value) for value in image_mean],
            "image_std": [float(value) for value in image_std],
            "box_batch_size_per_image": box_batch_size_per_image,
            "box_detections_per_img": box_detections_per_img,
            **top_n,
        }

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> RCNNDetector:
        """Rebuild a saved detector (a folder or Hub repo); the backbone name in its config.json resolves as
        a name from a file (see `mambaout_pl.models.untrusted_source`)."""
        with untrusted_source(f"the config.json of '{pretrained_model_name_or_path}'"):
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def config(self) -> dict[str, Any]:
        """`model_name` and JSON-serialisable `model_args` (without `pretrained`) that rebuild this network."""
        return {"model_name": self._model_name, "model_args": copy.deepcopy(self._model_args)}
