"""SegmentationTask: mmsegmentation's scores against a hand computation, loss, schedule, evaluation, pictures, predict."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import Logger
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex
from torchmetrics.segmentation import MeanIoU

from mambaout_pl.data import SegmentationDataModule
from mambaout_pl.models import segment
from mambaout_pl.tasks import SegmentationTask
from mambaout_pl.tasks.segmentation_metrics import confusion_scores, segmentation_metrics
from mambaout_pl.tasks.segmentation_outputs import palette

SMALL = dict(backbone="mambaout_femto", decode_channels=16, aux_channels=8)

# Two 2x4 label maps with ignored pixels (255), and predictions. Class 3 is predicted but never
# labelled; class 4 appears in neither.
TARGETS = torch.tensor([[[0, 0, 1, 1], [255, 2, 2, 0]], [[2, 2, 255, 0], [1, 1, 1, 255]]])
PREDICTIONS = torch.tensor([[[0, 1, 1, 1], [3, 2, 0, 0]], [[2, 0, 1, 0], [1, 1, 3, 2]]])
# By hand, over the 13 labelled pixels of both images together:
#   label 0: 4 pixels, 3 predicted 0, 1 predicted 1    predicted 0: 5 pixels
#   label 1: 5 pixels, 4 predicted 1, 1 predicted 3    predicted 1: 5 pixels
#   label 2: 4 pixels, 2 predicted 2, 2 predicted 0    predicted 2: 2 pixels, predicted 3: 1 pixel
HAND_IOU = [3 / (4 + 5 - 3), 4 / (5 + 5 - 4), 2 / (4 + 2 - 2), 0 / (0 + 1 - 0), float("nan")]
HAND_ACC = [3 / 4, 4 / 5, 2 / 4, float("nan"), float("nan")]
HAND_MIOU = (HAND_IOU[0] + HAND_IOU[1] + HAND_IOU[2] + HAND_IOU[3]) / 4  # class 4: neither labelled nor predicted
HAND_MACC = (HAND_ACC[0] + HAND_ACC[1] + HAND_ACC[2]) / 3  # classes 3, 4: not labelled
HAND_AACC = (3 + 4 + 2) / 13


def one_hot_log_probabilities(predictions: torch.Tensor, num_classes: int = 5) -> list[torch.Tensor]:
    scores = nn.functional.one_hot(predictions, num_classes).permute(0, 3, 1, 2).float()
    return list((scores * 0.98 + 0.002).log())


def test_scores_match_a_hand_computed_confusion_matrix():
    metrics = segmentation_metrics(num_classes=5, ignore_index=255)
    for prediction, target in zip(PREDICTIONS, TARGETS):  # summed over images, not averaged per image
        metrics.update(prediction[None], target[None])
    results = metrics.compute()
    scores = confusion_scores(results["val/confusion"])
    assert results["val/confusion"].sum() == 13  # ignored pixels left out
    assert results["val/mIoU"].item() == pytest.approx(HAND_MIOU)
    assert scores["mIoU"].item() == pytest.approx(HAND_MIOU)
    assert scores["mAcc"].item() == pytest.approx(HAND_MACC)
    assert scores["aAcc"].item() == pytest.approx(HAND_AACC)
    np.testing.assert_allclose(scores["IoU"].numpy(), HAND_IOU)
    np.testing.assert_allclose(scores["Acc"].numpy(), HAND_ACC)


def test_which_torchmetrics_give_mmsegmentation_scores():
    jaccard = MulticlassJaccardIndex(5, ignore_index=255, average="macro")
    micro = MulticlassAccuracy(5, ignore_index=255, average="micro")
    macro = MulticlassAccuracy(5, ignore_index=255, average="macro")
    per_image = MeanIoU(num_classes=5, input_format="index")
    for prediction, target in zip(PREDICTIONS, TARGETS):
        for metric in (jaccard, micro, macro):
            metric.update(prediction[None], target[None])
        per_image.update(prediction[None], target[None].clamp(max=4))  # no ignore index: 255 must go somewhere
    assert jaccard.compute().item() == pytest.approx(HAND_MIOU)  # mIoU: matches
    assert micro.compute().item() == pytest.approx(HAND_AACC)  # aAcc: matches
    assert macro.compute().item() == pytest.approx((0.75 + 0.8 + 0.5 + 0.0) / 4)  # counts class 3: not mAcc
    assert per_image.compute().item() != pytest.approx(HAND_MIOU, abs=1e-3)  # per image: not mIoU


class FixedPredictions(SegmentationTask):
    """A task whose evaluation predictions are given, so that its logging can be checked."""

    predictions: torch.Tensor = PREDICTIONS

    def predict_log_probabilities(self, batch):
        return one_hot_log_probabilities(self.predictions[batch["index"]], self.hparams.num_classes)


def trainer(tmp_path, **kwargs) -> Trainer:
    defaults = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return Trainer(**{**defaults, **kwargs})


def test_validation_logs_dataset_level_scores_and_per_class_iou(tmp_path, capsys):
    task = FixedPredictions(**SMALL, num_classes=5, label_names=["a", "b", "c", "d", "e"], num_val_images=0)
    batches = [
        {"index": torch.tensor([i]), "mask": TARGETS[i : i + 1], "image": torch.zeros(1, 3, 2, 4)} for i in (0, 1)
    ]
    metrics = trainer(tmp_path).validate(task, DataLoader(batches, batch_size=None), verbose=False)[0]
    assert metrics["val/mIoU"] == pytest.approx(HAND_MIOU)
    assert metrics["val/mAcc"] == pytest.approx(HAND_MACC)
    assert metrics["val/aAcc"] == pytest.approx(HAND_AACC)
    assert metrics["val/IoU/b"] == pytest.approx(HAND_IOU[1]) and metrics["val/IoU/d"] == 0.0
    assert "val/IoU/e" not in metrics  # neither labelled nor predicted: no score
    table = capsys.readouterr().out
    assert table.count("Per-class val scores:") == 1
    assert "b      0.6667  0.8000" in table  # the per-class table, with the class names, in fractions as mIoU


def test_training_loss_is_decode_plus_weighted_auxiliary_cross_entropy():
    torch.manual_seed(0)
    task = SegmentationTask(**SMALL, num_classes=4, aux_weight=0.4).eval()  # eval: no dropout
    images = torch.randn(2, 3, 32, 32)
    masks = torch.randint(0, 4, (2, 32, 32))
    masks[:, :8] = 255
    loss = task.training_step({"image": images, "mask": masks}, 0)
    logits, aux_logits = task.model.forward_heads(images)

    def cross_entropy(scores):
        scores = nn.functional.interpolate(scores, size=(32, 32), mode="bilinear", align_corners=False)
        log_p = scores.log_softmax(dim=1)
        labelled = masks != 255
        return -log_p.gather(1, masks.clamp(max=3)[:, None])[:, 0][labelled].mean()

    assert loss.item() == pytest.approx((cross_entropy(logits) + 0.4 * cross_entropy(aux_logits)).item(), rel=1e-5)
    without_aux = SegmentationTask(**SMALL, num_classes=4, aux_head=False).eval()
    assert without_aux.model.aux_head is None
    all_ignored = torch.full_like(masks, 255)
    assert task.training_step({"image": images, "mask": all_ignored}, 0).item() == 0.0


class RandomScenes(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(index)
        return {
            "image": torch.randn(3, 32, 32, generator=generator),
            "mask": torch.randint(0, 3, (32, 32), generator=generator),
        }


class LearningRateRecorder(Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_schedule_warms_up_per_update_then_decays_polynomially_over_max_steps(tmp_path):
    lr, warmup_lr, warmup_steps, max_steps = 1e-3, 1e-6, 4, 12
    task = SegmentationTask(
        **SMALL,
        num_classes=3,
        decode_head="fcn",
        aux_head=False,
        lr=lr,
        warmup_lr=warmup_lr,
        warmup_steps=warmup_steps,
        poly_power=1.0,
        min_lr=0.0,
    )
    recorder = LearningRateRecorder()
    trainer(tmp_path, max_steps=max_steps, max_epochs=-1, callbacks=[recorder], limit_val_batches=0).fit(
        task, DataLoader(RandomScenes(), batch_size=2)
    )
    assert len(recorder.lrs) == max_steps  # 3 passes over 4 batches: the schedule spans all of them
    for step, observed in enumerate(recorder.lrs):
        if step < warmup_steps:
            expected = warmup_lr + step * (lr - warmup_lr) / warmup_steps
        else:
            expected = lr * (1 - step / max_steps) ** 1.0
        assert observed == pytest.approx(expected, rel=1e-6), step
    optimizer = task.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert {group["weight_decay"] for group in optimizer.param_groups} == {0.0, 0.01}


def test_evaluation_scores_each_image_at_its_original_size(ade20k_folder, tmp_path):
    torch.manual_seed(0)
    dm = SegmentationDataModule(
        path="ade20k",
        data_dir=str(ade20k_folder),
        reduce_zero_label=True,
        resize_scale=(64, 32),
        eval_batch_size=2,
        num_workers=0,
    )
    task = SegmentationTask(
        **SMALL, num_classes=dm.num_classes, inference="slide", slide_crop_size=(24, 24), slide_stride=(16, 16)
    ).eval()
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        scores = task.predict_log_probabilities(batch)
        for index, (height, width) in enumerate(batch["image_size"].tolist()):
            image = batch["image"][index : index + 1, :, :height, :width]  # without the batch padding
            original = tuple(batch["original_size"][index].tolist())
            assert scores[index].shape == (150, *original)
            expected = segment(task.model, image, original, mode="slide", crop_size=(24, 24), stride=(16, 16))[0]
            torch.testing.assert_close(scores[index], expected)


class ImageRecorder(Logger):
    """A logger whose experiment takes images, as TensorBoard's SummaryWriter does."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[tuple[str, torch.Tensor]] = []

    name = "recorder"
    version = 0

    @property
    def experiment(self) -> ImageRecorder:
        return self

    def add_image(self, tag, image, global_step=0, dataformats="CHW") -> None:
        self.images.append((tag, image))

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def test_validation_sends_image_truth_prediction_pictures_to_the_logger(ade20k_folder, tmp_path):
    dm = SegmentationDataModule(
        path="ade20k",
        data_dir=str(ade20k_folder),
        reduce_zero_label=True,
        crop_size=32,
        resize_scale=(64, 32),
        batch_size=2,
        num_workers=0,
    )
    task = SegmentationTask(**SMALL, num_classes=dm.num_classes, num_val_images=2)
    recorder = ImageRecorder()
    trainer(tmp_path, logger=recorder, max_epochs=1, limit_train_batches=1, num_sanity_val_steps=1).fit(task, dm)
    assert [tag for tag, _ in recorder.images] == ["val/examples/0", "val/examples/1"]  # not from the sanity check
    _, panel = recorder.images[0]
    assert panel.shape == (3, 48, 3 * 40)  # the first validation label map is 40x48, three pictures side by side
    assert 0.0 <= panel.min() and panel.max() <= 1.0
    image, truth = panel[:, :, :40], panel[:, :, 40:80]
    ignored = torch.zeros(48, 40, dtype=torch.bool)
    ignored[:4] = True  # ADE label 0 ("other"): shown without colour
    assert torch.equal(truth[:, ignored], image[:, ignored])
    wall = torch.tensor(palette(1)[0] / 255.0, dtype=torch.float32)  # class 0 ("wall") is black in the palette
    torch.testing.assert_close(truth[:, 10, 5], 0.5 * image[:, 10, 5] + 0.5 * wall)


def test_predict_writes_palette_pngs_of_the_predictions(ade20k_folder, tmp_path):
    dm = SegmentationDataModule(
        path="ade20k",
        data_dir=str(ade20k_folder),
        reduce_zero_label=True,
        resize_scale=(64, 32),
        predict_split="validation",
        num_workers=0,
    )
    out = tmp_path / "predictions"
    task = SegmentationTask(**SMALL, num_classes=dm.num_classes, predict_dir=str(out))
    predictions = trainer(tmp_path).predict(task, datamodule=dm)
    written = sorted(path.name for path in out.iterdir())
    assert written == ["ADE_validation_00000000.png", "ADE_validation_00000001.png", "legend.csv"]
    first = predictions[0]["prediction"][0]
    assert first.shape == (48, 40) and first.dtype == torch.uint8  # the original size
    png = Image.open(out / "ADE_validation_00000000.png")
    assert png.mode == "P" and png.getpalette()[3:6] == palette(2)[1].tolist()
    assert np.array_equal(np.asarray(png), first.numpy())


def test_export_spec_is_the_segmentors_config_and_rebuilds_the_network():
    from mambaout_pl.models import create_model

    task = SegmentationTask(**SMALL, num_classes=6, backbone_args={"kernel_size": 5}, pool_scales=(1, 3)).eval()
    config = task.model.config
    spec = task.export_spec({"crop_size": 48, "path": "ade20k"})
    assert (spec.model_name, spec.model_args) == (config["model_name"], config["model_args"])
    assert spec.model_name == "mambaout_pl.models.segmentor.UperNetSegmentor"
    assert spec.preprocessing["input_size"] == (3, 48, 48) and spec.dataset == "ade20k"
    assert config["model_args"]["channels"] == 16 and config["model_args"]["pool_scales"] == [1, 3]
    assert config["model_args"]["backbone_args"] == {"kernel_size": 5} and "pretrained" not in config["model_args"]
    rebuilt = create_model(config["model_name"], **config["model_args"]).eval()
    rebuilt.load_state_dict(task.model.state_dict())
    images = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(rebuilt(images), task(images))


def test_network_config_and_network_args_are_deprecated_for_the_models_config():
    task = SegmentationTask(**SMALL, num_classes=6)
    with pytest.warns(FutureWarning, match=r"network_config\(\) is deprecated; use task.export_spec\(\)"):
        assert task.network_config() == task.model.config
    with pytest.warns(FutureWarning, match=r'network_args\(\) is deprecated; use task.model.config\["model_args"\]'):
        assert task.network_args() == task.model.config["model_args"]
