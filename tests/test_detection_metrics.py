"""Detection scores: torchmetrics' COCO mAP as the task logs it equals the official COCO evaluation on json files."""

from __future__ import annotations

import json

import pytest
import torch
from detection_helpers import coco_eval_stats, evaluation_case, write_coco_ground_truth

from mambaout_pl.tasks.detection_metrics import (
    COCO_SCORES,
    coco_scores,
    detection_metric,
    metric_predictions,
    metric_targets,
)
from mambaout_pl.tasks.detection_outputs import coco_results

STATS = list(COCO_SCORES.values())  # COCOeval.stats[:6]: AP, AP50, AP75, AP small, medium, large


def logged_scores(backend: str, masks: bool = True, batch_size: int = 2) -> dict[str, float]:
    """The scores the task logs for :func:`evaluation_case`, fed in batches as validation steps do."""
    targets, outputs, _ = evaluation_case()
    metric = detection_metric(masks=masks, backend=backend)
    for start in range(0, len(targets), batch_size):
        metric.update(
            metric_predictions(outputs[start : start + batch_size], masks),
            metric_targets(targets[start : start + batch_size], masks),
        )
    return {name: value.item() for name, value in coco_scores(metric, prefix="val/").items()}


@pytest.fixture(scope="module")
def official(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[float]]:
    """COCOeval's stats on the case written as a ground-truth file and COCO results files (one per IoU type)."""
    folder = tmp_path_factory.mktemp("coco")
    targets, outputs, sizes = evaluation_case()
    ground_truth = write_coco_ground_truth(folder / "instances_val.json", targets, sizes)
    results = [
        result
        for target, output in zip(targets, outputs, strict=True)
        for result in coco_results(target["image_id"], output)
    ]
    # As the COCO server takes them: boxes for "bbox"; masks for "segm", whose area is then the mask's.
    (folder / "bbox.json").write_text(
        json.dumps([{k: v for k, v in r.items() if k != "segmentation"} for r in results])
    )
    (folder / "segm.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "bbox"} for r in results]))
    return {
        iou_type: coco_eval_stats(ground_truth, folder / f"{iou_type}.json", iou_type) for iou_type in ("bbox", "segm")
    }


def test_the_case_covers_every_score(official: dict[str, list[float]]) -> None:
    for stats in official.values():
        assert all(0.0 < value < 1.0 for value in stats), stats  # no score stuck at 0, 1 or undefined (-1)
    assert official["bbox"] != official["segm"]


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_logged_scores_equal_the_official_coco_evaluation(official: dict[str, list[float]], backend: str) -> None:
    scores = logged_scores(backend)
    for iou_type in ("bbox", "segm"):
        ours = [scores[f"val/{iou_type}_{name}"] for name in STATS]
        assert ours == pytest.approx(official[iou_type], abs=1e-4), iou_type


def test_box_only_scores_equal_the_official_box_evaluation(official: dict[str, list[float]]) -> None:
    scores = logged_scores("faster_coco_eval", masks=False)
    assert set(scores) == {f"val/bbox_{name}" for name in STATS}
    assert [scores[f"val/bbox_{name}"] for name in STATS] == pytest.approx(official["bbox"], abs=1e-4)


def test_backends_agree() -> None:
    assert logged_scores("faster_coco_eval", batch_size=1) == pytest.approx(logged_scores("pycocotools"), abs=1e-4)


def test_crowd_regions_and_areas_reach_the_metric() -> None:
    targets, _, _ = evaluation_case()
    converted = metric_targets(targets, masks=True)
    assert converted[1]["iscrowd"].tolist() == targets[1]["iscrowd"].tolist() and converted[1]["iscrowd"][-1] == 1
    assert torch.equal(converted[0]["area"], targets[0]["area"])
    assert converted[0]["masks"].dtype == torch.bool


def test_predicted_masks_are_thresholded_at_one_half() -> None:
    output = {
        "boxes": torch.tensor([[0.0, 0.0, 2.0, 2.0]]),
        "labels": torch.tensor([1]),
        "scores": torch.tensor([0.9]),
        "masks": torch.tensor([[[[0.2, 0.5], [0.51, 0.9]]]]),
    }
    (prediction,) = metric_predictions([output], masks=True)
    assert prediction["masks"].tolist() == [[[False, False], [True, True]]]


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="map_backend='coco'"):
        detection_metric(masks=True, backend="coco")
