"""Detection tasks: training on a fixed batch, COCO scores and pictures in validation, COCO results from predict, schedule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from detection_helpers import SMALL_TASK, square_batch, write_coco_ground_truth
from lightning.pytorch import Callback, LightningDataModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from pycocotools.coco import COCO
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader
from torchmetrics.detection import MeanAveragePrecision

from mambaout_pl.errors import NonFiniteLossError
from mambaout_pl.models import create_model
from mambaout_pl.tasks import InstanceSegmentationTask, ObjectDetectionTask
from mambaout_pl.tasks.detection_metrics import COCO_SCORES

LOSSES = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}


def batches(*batches: dict) -> DataLoader:
    """A loader yielding the given ``DetectionBatch`` dicts as they are."""
    return DataLoader(list(batches), batch_size=None)


class TrainLosses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())


def small_trainer(root: Path, **kwargs) -> Trainer:
    return Trainer(
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


@pytest.mark.parametrize("task_class", [InstanceSegmentationTask, ObjectDetectionTask])
def test_loss_drops_on_a_fixed_batch_and_validation_logs_coco_scores_and_pictures(one_thread, tmp_path, task_class):
    torch.manual_seed(0)
    task = task_class(**SMALL_TASK, lr=1e-3, warmup_steps=None, label_names=["red", "green", "blue"])
    batch = square_batch(seed=0, images=2)
    losses = TrainLosses()
    trainer = small_trainer(
        tmp_path, max_steps=12, logger=TensorBoardLogger(tmp_path, name="logs"), callbacks=[losses], log_every_n_steps=1
    )
    trainer.fit(task, batches(*[batch] * 12), batches(square_batch(seed=1, images=2, first_id=100)))

    assert len(losses.losses) == 12 and all(math.isfinite(loss) for loss in losses.losses)
    assert sum(losses.losses[-3:]) / 3 < 0.7 * sum(losses.losses[:3]) / 3
    metrics = trainer.callback_metrics
    parts = LOSSES | ({"loss_mask"} if task_class.masks else set())
    assert {f"train/{part}" for part in parts} <= set(metrics)
    kinds = ("bbox", "segm") if task_class.masks else ("bbox",)
    expected = {f"val/{kind}_{name}" for kind in kinds for name in COCO_SCORES.values()}
    assert {name for name in metrics if name.startswith("val/")} == expected
    assert all(-1.0 <= metrics[name].item() <= 1.0 for name in expected)
    assert task_class.monitor in expected and task_class.mode == "max"
    (run,) = (tmp_path / "logs").iterdir()
    events = EventAccumulator(str(run), size_guidance={"images": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["val/examples/0", "val/examples/1"]  # num_val_images=2
    picture = events.Images("val/examples/0")[0]
    assert picture.width == 2 * picture.height  # truth | prediction


def test_validation_scores_a_perfect_detector_as_one(one_thread, tmp_path):
    """Detections equal to the ground truth score mAP 1 (small objects only: the other ranges are undefined, -1)."""
    batch = square_batch(seed=3, images=2)
    task = InstanceSegmentationTask(**SMALL_TASK)
    outputs = [
        {**target, "scores": torch.ones(len(target["boxes"])), "masks": target["masks"][:, None].float()}
        for target in batch["targets"]
    ]
    task.model.forward = lambda images, targets=None: outputs  # the network's outputs, replaced by the truth
    trainer = small_trainer(tmp_path, logger=False)
    (scores,) = trainer.validate(task, batches(batch), verbose=False)
    for kind in ("bbox", "segm"):
        assert scores[f"val/{kind}_mAP"] == pytest.approx(1.0)
        assert scores[f"val/{kind}_mAP_small"] == pytest.approx(1.0)
        assert scores[f"val/{kind}_mAP_large"] == -1.0


class CategoryData(LightningDataModule):
    """Predict batches of a dataset whose category ids are not 1..K."""

    category_ids = [11, 22, 33]

    def predict_dataloader(self) -> DataLoader:
        return batches(square_batch(seed=5, images=2, first_id=7), square_batch(seed=6, images=2, first_id=9))


def test_predict_writes_coco_results_and_pictures(one_thread, tmp_path):
    torch.manual_seed(0)
    task = InstanceSegmentationTask(**SMALL_TASK, label_names=["red", "green", "blue"], num_predict_pictures=3)
    trainer = small_trainer(tmp_path, logger=False)
    trainer.predict(task, datamodule=CategoryData(), return_predictions=False)

    folder = tmp_path / "predict"
    results = json.loads((folder / "results.json").read_text())
    assert results and {result["image_id"] for result in results} == {7, 8, 9, 10}
    assert {result["category_id"] for result in results} <= {11, 22, 33}
    assert all(result["score"] >= 0.05 for result in results)
    targets = [target for seed, first in ((5, 7), (6, 9)) for target in square_batch(seed, 2, first)["targets"]]
    ground_truth = write_coco_ground_truth(tmp_path / "gt.json", targets, [(64, 64)] * 4, category_ids=(11, 22, 33))
    coco = COCO(str(ground_truth))
    loaded = coco.loadRes(str(folder / "results.json"))  # the official reader takes the file
    assert len(loaded.getAnnIds()) == len(results)
    first = loaded.anns[1]
    assert len(first["bbox"]) == 4 and first["area"] > 0 and first["segmentation"]["size"] == [64, 64]
    assert sorted(path.name for path in (folder / "pictures").iterdir()) == ["7.png", "8.png", "9.png"]


def test_default_schedule_is_the_papers_1x(one_thread):
    """AdamW 1e-4, weight decay 0.05 (none on norms), warm-up over 1000 updates from 1e-7, x0.1 after epochs 8 and 11."""
    task = ObjectDetectionTask(**SMALL_TASK)
    task._schedule_length = lambda: (1000, 12)  # 1000 updates per epoch, 12 epochs
    configured = task.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    assert type(optimizer).__name__ == "AdamW"
    decays = {group["weight_decay"] for group in optimizer.param_groups}
    assert decays == {0.0, 0.05}
    norm_weight = task.model.backbone.stage_norms[0].weight
    (norm_group,) = [group for group in optimizer.param_groups if any(p is norm_weight for p in group["params"])]
    assert norm_group["weight_decay"] == 0.0

    def lr_at(update: int) -> float:
        scheduler.step_update(num_updates=update)
        return optimizer.param_groups[0]["lr"]

    assert lr_at(0) == pytest.approx(1e-7)
    assert lr_at(500) == pytest.approx(1e-7 + 0.5 * (1e-4 - 1e-7))
    assert lr_at(1000) == pytest.approx(1e-4)
    assert lr_at(7998) == pytest.approx(1e-4)
    assert lr_at(8000) == pytest.approx(1e-5)
    assert lr_at(10998) == pytest.approx(1e-5)
    assert lr_at(11000) == pytest.approx(1e-6)


def test_nonfinite_loss_raises_naming_the_batch(one_thread):
    task = InstanceSegmentationTask(**SMALL_TASK)
    batch = square_batch(seed=0, images=1)
    batch["images"][0][:, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="batch 4"):
        task.training_step(batch, 4)


def test_crowd_regions_are_left_out_of_training():
    task = InstanceSegmentationTask(**SMALL_TASK)
    target = square_batch(seed=0, images=1)["targets"][0]
    target["iscrowd"] = torch.tensor([1, 0])
    trained = task._training_target(target)
    assert set(trained) == {"boxes", "labels", "masks"}
    assert torch.equal(trained["boxes"], target["boxes"][1:]) and torch.equal(trained["masks"], target["masks"][1:])


def test_any_token_mixer_or_timm_backbone_and_export_rebuilds_the_network():
    task = InstanceSegmentationTask(**{**SMALL_TASK, "backbone_args": {"token_mixer": "ssm", "scan": "raster"}})
    spec = task.export_spec({"path": "builtin:digit_detection"})
    assert spec.pipeline_tag == "image-segmentation" and spec.dataset == "builtin:digit_detection"
    assert spec.model_args["backbone_args"] == {"token_mixer": "ssm", "scan": "raster"} and spec.model_args["masks"]
    rebuilt = create_model(spec.model_name, **spec.model_args)
    assert rebuilt.state_dict().keys() == task.model.state_dict().keys()

    boxes_only = ObjectDetectionTask(**{**SMALL_TASK, "backbone": "resnet18", "head_style": "torchvision"})
    assert boxes_only.export_spec().pipeline_tag == "object-detection"
    assert not boxes_only.model.masks and boxes_only.model.head_style == "torchvision"


def test_export_spec_is_the_detectors_config_and_network_args_is_deprecated():
    task = ObjectDetectionTask(**SMALL_TASK)
    spec = task.export_spec()
    assert {"model_name": spec.model_name, "model_args": spec.model_args} == task.model.config
    assert spec.model_args["rpn_post_nms_top_n_train"] == 1000 and not spec.model_args["masks"]
    with pytest.warns(FutureWarning, match=r"ObjectDetectionTask.network_args\(\) is deprecated"):
        assert task.network_args() == task.model.config["model_args"]


def test_subclasses_override_one_part():
    class AP50Scores(ObjectDetectionTask):
        def configure_metrics(self) -> None:
            super().configure_metrics()
            self.val_metrics = MeanAveragePrecision(iou_type="bbox", iou_thresholds=[0.5])

    task = AP50Scores(**SMALL_TASK)
    assert task.val_metrics.iou_thresholds == [0.5] and len(task.test_metrics.iou_thresholds) == 10


def test_instance_segmentation_without_masks_in_the_data_says_what_to_do():
    task = InstanceSegmentationTask(**SMALL_TASK)
    batch = square_batch(seed=0, images=1)
    del batch["targets"][0]["masks"]
    with pytest.raises(ValueError, match="Set `data.masks: true`, or train boxes only with .*ObjectDetectionTask"):
        task.training_step(batch, 0)
    boxes_only = ObjectDetectionTask(**SMALL_TASK)
    assert set(boxes_only._training_target(batch["targets"][0])) == {"boxes", "labels"}


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="label_names has 2 names but num_classes is 3"):
        ObjectDetectionTask(**SMALL_TASK, label_names=["a", "b"])
    with pytest.raises(ValueError, match="map_backend='cocoapi'"):
        ObjectDetectionTask(**SMALL_TASK, map_backend="cocoapi")
