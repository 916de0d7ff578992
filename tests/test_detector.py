"""Detection networks: Mask / Faster R-CNN over our and timm's backbones, mmdetection's heads, rebuild, size."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss, maskrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import MultiScaleRoIAlign, roi_align

from mambaout_pl.data.coco import decode_coco_example, load_coco_split
from mambaout_pl.data.detection_transforms import create_detection_transforms
from mambaout_pl.data.embedded_detection import write_digit_detection
from mambaout_pl.models import RCNNDetector, create_model, from_pretrained
from mambaout_pl.models.detector import (
    AlignedMultiScaleRoIAlign,
    L1RegionProposalNetwork,
    MMDetRoIHeads,
    binary_mask_loss,
    binary_mask_targets,
    l1_fastrcnn_loss,
)

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SMALL = dict(
    num_classes=3,
    min_size=64,
    max_size=96,
    anchor_sizes=(8, 16, 32, 64, 128),
    fpn_channels=32,
    box_detections_per_img=10,
)
LOSSES = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}


def small_detector(backbone: str = "mambaout_femto", **kwargs) -> RCNNDetector:
    torch.manual_seed(0)
    return RCNNDetector(backbone, **{**SMALL, **kwargs})


def batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Two images of different sizes with 1 and 2 boxes, each box's mask filling its box."""
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 80, generator=generator), torch.rand(3, 72, 64, generator=generator)]
    boxes = [torch.tensor([[8.0, 6.0, 40.0, 44.0]]), torch.tensor([[2.0, 4.0, 30.0, 28.0], [30.0, 30.0, 60.0, 70.0]])]
    targets = []
    for image, image_boxes, labels in zip(images, boxes, ([2], [1, 3])):
        masks = torch.zeros(len(image_boxes), *image.shape[1:], dtype=torch.uint8)
        for mask, (x1, y1, x2, y2) in zip(masks, image_boxes.int().tolist()):
            mask[y1:y2, x1:x2] = 1
        targets.append({"boxes": image_boxes, "labels": torch.tensor(labels), "masks": masks})
    return images, targets


@pytest.mark.parametrize(
    ("backbone", "masks", "head_style"),
    [("mambaout_femto", True, "mmdet"), ("resnet18", True, "torchvision"), ("mambaout_femto", False, "mmdet")],
)
def test_detector_trains_and_predicts(one_thread, backbone, masks, head_style):
    detector = small_detector(backbone, masks=masks, head_style=head_style).train()
    images, targets = batch()
    losses = detector(images, targets)
    assert set(losses) == LOSSES | ({"loss_mask"} if masks else set())
    assert all(math.isfinite(loss.item()) and loss.item() > 0 for loss in losses.values())
    sum(losses.values()).backward()
    assert next(detector.backbone.body.parameters()).grad.abs().sum() > 0  # the losses reach the backbone's stem

    detector.eval()
    with torch.no_grad():
        outputs = detector(images)
    assert len(outputs) == 2
    for output, image in zip(outputs, images):
        count = len(output["boxes"])
        assert count > 0
        assert output["boxes"].shape == (count, 4) and output["scores"].shape == (count,)
        assert output["labels"].min() >= 1 and output["labels"].max() <= 3
        # boxes come back in the coordinates of the given image, not the internal resize
        assert output["boxes"][:, 2].max() <= image.shape[2] and output["boxes"][:, 3].max() <= image.shape[1]
        if masks:
            assert output["masks"].shape == (count, 1, *image.shape[1:])
            assert 0 <= output["masks"].min() and output["masks"].max() <= 1
        else:
            assert "masks" not in output


def test_stage_outputs_are_layer_normalised_before_the_fpn(one_thread):
    detector = small_detector(masks=False).eval()
    images = torch.rand(1, 3, 64, 64)
    stages = detector.backbone.body(images)
    normalised = [norm(stage) for norm, stage in zip(detector.backbone.stage_norms, stages)]
    for stage, output in zip(stages, normalised):
        expected = F.layer_norm(stage.permute(0, 2, 3, 1), stage.shape[1:2], eps=1e-6).permute(0, 3, 1, 2)
        torch.testing.assert_close(output, expected)
    levels = detector.backbone(images)
    assert list(levels) == ["0", "1", "2", "3", "pool"]
    assert [level.shape[-1] for level in levels.values()] == [16, 8, 4, 2, 1]  # P2..P5, P6 = max-pooled P5
    torch.testing.assert_close(levels["pool"], levels["3"][..., ::2, ::2])


def test_head_styles_differ_as_documented():
    mmdet, torchvision_style = small_detector(head_style="mmdet"), small_detector(head_style="torchvision")
    assert type(mmdet.rpn) is L1RegionProposalNetwork and type(mmdet.roi_heads) is MMDetRoIHeads
    assert type(torchvision_style.rpn) is RegionProposalNetwork and type(torchvision_style.roi_heads) is RoIHeads
    for pool in (mmdet.roi_heads.box_roi_pool, mmdet.roi_heads.mask_roi_pool):
        assert type(pool) is AlignedMultiScaleRoIAlign and pool.sampling_ratio == 0
    for pool in (torchvision_style.roi_heads.box_roi_pool, torchvision_style.roi_heads.mask_roi_pool):
        assert type(pool) is MultiScaleRoIAlign and pool.sampling_ratio == 2
    assert mmdet.rpn._post_nms_top_n == {"training": 1000, "testing": 1000}
    assert torchvision_style.rpn._post_nms_top_n == {"training": 2000, "testing": 1000}
    assert mmdet.rpn._pre_nms_top_n == torchvision_style.rpn._pre_nms_top_n == {"training": 2000, "testing": 1000}
    assert mmdet.roi_heads.fg_bg_sampler.batch_size_per_image == 512
    assert small_detector(box_batch_size_per_image=64).roi_heads.fg_bg_sampler.batch_size_per_image == 64
    with pytest.raises(ValueError, match="head_style='detectron'"):
        RCNNDetector("mambaout_femto", head_style="detectron")


def test_rpn_top_n_settings_bound_the_proposals_in_training_and_at_inference():
    detector = small_detector(
        rpn_pre_nms_top_n_train=300,
        rpn_pre_nms_top_n_test=50,
        rpn_post_nms_top_n_train=40,
        rpn_post_nms_top_n_test=7,
    )
    assert detector.rpn._pre_nms_top_n == {"training": 300, "testing": 50}
    assert detector.rpn._post_nms_top_n == {"training": 40, "testing": 7}
    assert detector.config["model_args"]["rpn_post_nms_top_n_test"] == 7
    rebuilt = create_model(detector.config["model_name"], **detector.config["model_args"])
    assert rebuilt.rpn._post_nms_top_n == {"training": 40, "testing": 7}
    images, targets = batch()
    for training, count in ((True, 40), (False, 7)):
        detector.train(training)
        with torch.no_grad():
            image_list, resized = detector.transform(images, targets if training else None)
            proposals, _ = detector.rpn(image_list, detector.backbone(image_list.tensors), resized)
        assert [len(boxes) for boxes in proposals] == [count, count]
    with pytest.raises(ValueError, match="rpn_post_nms_top_n_test=0"):
        small_detector(rpn_post_nms_top_n_test=0)


def test_aligned_roi_align_pools_each_box_from_its_fpn_level_with_aligned_sampling():
    generator = torch.Generator().manual_seed(0)
    features = {name: torch.randn(1, 2, 64 // 2**i, 64 // 2**i, generator=generator) for i, name in enumerate("0123")}
    small_box, large_box = torch.tensor([[3.3, 5.1, 40.7, 50.2]]), torch.tensor([[0.0, 0.0, 250.0, 240.0]])
    boxes = [torch.cat([small_box, large_box])]
    pool = AlignedMultiScaleRoIAlign(list("0123"), 3, 0)
    pooled = pool(features, boxes, [(256, 256)])
    # sqrt(area) 41 -> P2 (stride 4); 245 -> P4 (stride 16), as torchvision and mmdetection map levels
    expected_small = roi_align(features["0"], [small_box], 3, 1 / 4, 0, aligned=True)
    expected_large = roi_align(features["2"], [large_box], 3, 1 / 16, 0, aligned=True)
    torch.testing.assert_close(pooled, torch.cat([expected_small, expected_large]))
    unaligned = MultiScaleRoIAlign(list("0123"), 3, 0)(features, boxes, [(256, 256)])
    assert (unaligned - pooled).abs().max() > 1e-2


def test_l1_box_loss_on_a_hand_made_case():
    class_logits = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0]])
    box_regression = torch.zeros(2, 12)
    box_regression[0, 4:8] = torch.tensor([0.1, -0.2, 0.3, 0.05])  # class 1's deltas for the positive RoI
    labels, targets = [torch.tensor([1, 0])], [torch.zeros(2, 4)]
    classification, box = l1_fastrcnn_loss(class_logits, box_regression, labels, targets)
    assert box.item() == pytest.approx((0.1 + 0.2 + 0.3 + 0.05) / 2)
    assert classification.item() == pytest.approx(F.cross_entropy(class_logits, labels[0]).item())
    _, smooth = fastrcnn_loss(class_logits, box_regression, labels, targets)
    assert smooth.item() != pytest.approx(box.item())  # torchvision: smooth-L1 with beta 1/9

    rpn = small_detector(masks=False).rpn
    objectness = torch.tensor([[2.0], [-1.0], [0.5]])
    deltas = torch.tensor([[0.5, -0.5, 0.0, 1.0], [9.0, 9.0, 9.0, 9.0], [0.0, 0.0, 0.0, 0.0]])
    anchor_labels, anchor_targets = [torch.tensor([1.0, 0.0, -1.0])], [torch.zeros(3, 4)]  # -1: ignored
    objectness_loss, rpn_box = rpn.compute_loss(objectness, deltas, anchor_labels, anchor_targets)
    assert rpn_box.item() == pytest.approx(2.0 / 2)  # |deltas| of the one positive over 2 sampled anchors
    expected = F.binary_cross_entropy_with_logits(torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.0]))
    assert objectness_loss.item() == pytest.approx(expected.item())


def test_mask_targets_are_binarised_aligned_crops():
    gt_masks = torch.zeros(1, 8, 8, dtype=torch.uint8)
    gt_masks[0, :, :4] = 1  # left half
    boxes, matched = torch.tensor([[1.0, 0.0, 7.0, 8.0]]), torch.tensor([0])
    targets = binary_mask_targets(gt_masks, boxes, matched, 4)
    rois = torch.tensor([[0.0, 1.0, 0.0, 7.0, 8.0]])
    soft = roi_align(gt_masks[:, None].float(), rois, (4, 4), 1.0, 0, aligned=True)[:, 0]
    assert ((soft > 0) & (soft < 1)).any()  # the crop has soft values at the mask's edge
    torch.testing.assert_close(targets, (soft >= 0.5).float())
    assert targets[0, 0].tolist() == [1.0, 1.0, 0.0, 0.0]

    logits = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    loss = binary_mask_loss(logits, [boxes], [gt_masks], [torch.tensor([2])], [matched])
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(logits[:, 2], targets))


def test_config_rebuilds_the_detector_through_create_model_and_an_export_folder(one_thread, tmp_path):
    detector = small_detector(backbone_args={"token_mixer": "gated_conv"}).eval()
    config = detector.config
    assert config["model_name"] == "mambaout_pl.models.detector.RCNNDetector"
    assert json.loads(json.dumps(config)) == config and "pretrained" not in config["model_args"]
    rebuilt = create_model(config["model_name"], **config["model_args"]).eval()
    rebuilt.load_state_dict(detector.state_dict(), strict=True)

    (tmp_path / "config.json").write_text(json.dumps(config))
    weights = {name: tensor.contiguous() for name, tensor in detector.state_dict().items()}
    save_file(weights, str(tmp_path / "model.safetensors"))
    loaded = from_pretrained(tmp_path)
    images, _ = batch()
    with torch.no_grad():
        expected, actual = detector(images), loaded(images)
    for wanted, got in zip(expected, actual):
        torch.testing.assert_close(got["boxes"], wanted["boxes"])
        torch.testing.assert_close(got["masks"], wanted["masks"])

    detector.save_pretrained(tmp_path / "hub")
    hub_loaded = RCNNDetector.from_pretrained(tmp_path / "hub")
    assert hub_loaded.config == config


def test_complexity_of_mask_rcnn_mambaout_tiny_matches_table_2(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module("detection_complexity")
    try:
        row = module.complexity("mambaout_tiny", 800, 1280)
    finally:
        sys.modules.pop("detection_complexity", None)
    assert row["params_M"] == pytest.approx(43.14, abs=0.01)  # paper: 43M
    assert row["GMACs"] == pytest.approx(262.1, abs=0.1)  # paper: 262G


def test_mmdet_roi_heads_train_on_the_l1_and_binary_mask_losses(one_thread):
    detector = small_detector().train()
    images, targets = batch()
    image_list, targets = detector.transform(images, targets)
    features = detector.backbone(image_list.tensors)
    proposals = [target["boxes"] + 3.0 for target in targets]
    heads = detector.roi_heads
    torch.manual_seed(1)
    _, losses = heads(features, proposals, image_list.image_sizes, targets)

    torch.manual_seed(1)  # the same RoI sampling
    sampled, matched_idxs, labels, regression_targets = heads.select_training_samples(proposals, targets)
    box_features = heads.box_roi_pool(features, sampled, image_list.image_sizes)
    class_logits, box_regression = heads.box_predictor(heads.box_head(box_features))
    _, box_loss = l1_fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
    positive = [torch.where(label > 0)[0] for label in labels]
    mask_boxes = [boxes[index] for boxes, index in zip(sampled, positive)]
    mask_matched = [matched[index] for matched, index in zip(matched_idxs, positive)]
    mask_features = heads.mask_roi_pool(features, mask_boxes, image_list.image_sizes)
    mask_logits = heads.mask_predictor(heads.mask_head(mask_features))
    gt_masks, gt_labels = [t["masks"] for t in targets], [t["labels"] for t in targets]
    torch.testing.assert_close(losses["loss_box_reg"], box_loss)
    mask_loss = binary_mask_loss(mask_logits, mask_boxes, gt_masks, gt_labels, mask_matched)
    torch.testing.assert_close(losses["loss_mask"], mask_loss)
    _, smooth_box_loss = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
    assert smooth_box_loss.item() != pytest.approx(box_loss.item())
    soft_mask_loss = maskrcnn_loss(mask_logits, mask_boxes, gt_masks, gt_labels, mask_matched)
    assert soft_mask_loss.item() != pytest.approx(losses["loss_mask"].item())


def test_a_train_step_on_decoded_and_transformed_coco_data(one_thread, tmp_path):
    root = write_digit_detection(tmp_path / "digits", counts={"train": 2})
    dataset, categories = load_coco_split(root, "train", skip_empty=True)
    label_of = {category["id"]: index + 1 for index, category in enumerate(categories)}
    transform = create_detection_transforms(train=True, min_size=64, max_size=96)
    images, targets = zip(*(transform(*decode_coco_example(row, label_of)) for row in dataset))
    detector = small_detector(num_classes=len(categories), box_batch_size_per_image=64).train()
    optimizer = torch.optim.SGD(detector.parameters(), lr=1e-3)
    losses = detector(list(images), list(targets))
    assert set(losses) == LOSSES | {"loss_mask"} and all(math.isfinite(loss.item()) for loss in losses.values())
    sum(losses.values()).backward()
    optimizer.step()
