"""ClassificationTask: image classification with any backbone ``create_model`` builds."""

from __future__ import annotations

from collections.abc import Mapping, Sized
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from mambaout_pl.data.batches import ClassificationBatch
from mambaout_pl.models import create_model
from mambaout_pl.tasks.arguments import check_drop_path_rate
from mambaout_pl.tasks.base import BaseTask, image_batch
from mambaout_pl.tasks.classification_outputs import PREDICTION_FORMATS, ClassificationPredictionWriter
from mambaout_pl.tasks.classification_pictures import ClassificationPictures
from mambaout_pl.tasks.export_spec import ExportSpec, preprocessing_config


class ClassificationTask(BaseTask):
    """Train and evaluate an image classifier.

    ``task(images)`` returns logits. Batches are ``{"image": [B,3,H,W], "label": [B]}`` dicts
    (or ``(images, labels)`` tuples). Logs ``train/loss``, ``val/loss``, ``val/top1``,
    ``val/top5`` and the same under ``test/``, and pictures of the first validation images with their
    true and predicted classes (``ClassificationPictures``) to the loggers and the run folder.

    Args:
        backbone: any name ``mambaout_pl.models.create_model`` accepts: ours, any timm model, or a
            dotted class path.
        num_classes: number of classes (linked from the data module by the CLI).
        label_names: class names, index-aligned (linked from the data module by the CLI).
        pretrained: weights to start from: a ``.pth``/``.safetensors`` file (official MambaOut or
            timm keys). The classifier is re-initialised when its class count differs.
        backbone_args: extra keyword arguments for ``create_model``.
        drop_path_rate: stochastic depth rate of the last block (rises linearly from 0).
        head_dropout: dropout before the classifier.
        mixup_alpha: Mixup alpha (0: off).
        cutmix_alpha: CutMix alpha (0: off).
        mixup_prob: probability of applying Mixup or CutMix to a batch.
        mixup_switch_prob: probability of CutMix instead of Mixup when both are on.
        label_smoothing: label smoothing of the training targets.
        channels_last: run the network in channels-last memory format.
        compile: compile the network with ``torch.compile``.
        predict_dir: folder where ``trainer.predict`` writes its predictions (one row per image: its row,
            its file, and its ``predict_top_k`` classes with their names and probabilities; see
            ``ClassificationPredictionWriter``); ``None``: ``<trainer.log_dir>/predict``, the run's folder.
        predict_top_k: classes written per image, most probable first (at most ``num_classes``).
        predict_format: ``"csv"`` (``predictions.csv``) or ``"jsonl"`` (``predictions.jsonl``, JSON Lines).
        **kwargs: the optimizer, schedule, EMA and non-finite-loss settings of :class:`BaseTask`,
            with its defaults.
    """

    monitor = "val/top1"
    mode = "max"
    output_settings = ("predict_dir", "predict_top_k", "predict_format")

    def __init__(
        self,
        backbone: str = "mambaout_femto",
        num_classes: int = 1000,
        label_names: list[str] | None = None,
        pretrained: str | None = None,
        backbone_args: dict[str, Any] | None = None,
        drop_path_rate: float = 0.0,
        head_dropout: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        label_smoothing: float = 0.0,
        channels_last: bool = False,
        compile: bool = False,
        predict_dir: str | None = None,
        predict_top_k: int = 5,
        predict_format: str = "csv",
        **kwargs: Any,
    ) -> None:
        check_drop_path_rate(drop_path_rate)
        check_prediction_output(predict_top_k, predict_format)
        if label_names is not None and len(label_names) != num_classes:
            raise ValueError(
                f"label_names has {len(label_names)} names but num_classes is {num_classes}; "
                "give one name per class or leave label_names unset."
            )
        super().__init__(**kwargs)

    def configure_models(self) -> None:
        hparams = self.hparams
        self.model = create_model(
            hparams.backbone,
            pretrained=hparams.pretrained,
            num_classes=hparams.num_classes,
            drop_path_rate=hparams.drop_path_rate,
            drop_rate=hparams.head_dropout,
            **(hparams.backbone_args or {}),
        )
        if hparams.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if hparams.compile:
            self.model.compile()

    def export_spec(self, data_hparams: Mapping[str, Any] | None = None) -> ExportSpec:
        """timm's format (the backbone name and class count rebuild the classifier), with the data module's input."""
        return ExportSpec(
            model_name=self.hparams.backbone,
            model_args={"num_classes": self.hparams.num_classes, **(self.hparams.backbone_args or {})},
            pipeline_tag="image-classification",
            metrics=("accuracy",),
            timm_format=True,
            label_names=self.hparams.label_names,
            preprocessing=preprocessing_config(data_hparams or {}, size_key="image_size"),
            dataset=(data_hparams or {}).get("path"),
        )

    def example_input(self, data_hparams: Mapping[str, Any]) -> torch.Tensor | None:
        """One image of the data's ``image_size`` (else the network's default input size)."""
        channels = (self.hparams.backbone_args or {}).get("in_chans", 3)
        size = data_hparams.get("image_size")
        if size is None:
            input_size = (getattr(self.model, "pretrained_cfg", None) or {}).get("input_size")
            size = None if input_size is None else tuple(input_size[-2:])
        return None if size is None else image_batch(size, channels)

    def configure_callbacks(self) -> list[Callback]:
        hparams = self.hparams
        writer = ClassificationPredictionWriter(
            hparams.predict_dir, hparams.predict_top_k, hparams.predict_format, hparams.label_names
        )
        return [*super().configure_callbacks(), writer, ClassificationPictures(label_names=hparams.label_names)]

    def setup(self, stage: str) -> None:
        """Refuse Mixup/CutMix with batches it cannot pair (odd sizes, or a smaller last batch)."""
        super().setup(stage)
        if stage == "fit" and self.mixup is not None:
            check_mixup_batches(getattr(self.trainer, "datamodule", None), self.trainer.world_size)

    def configure_losses(self) -> None:
        hparams = self.hparams
        self.mixup: Mixup | None = None
        if hparams.mixup_alpha > 0 or hparams.cutmix_alpha > 0:
            self.mixup = Mixup(
                mixup_alpha=hparams.mixup_alpha,
                cutmix_alpha=hparams.cutmix_alpha,
                prob=hparams.mixup_prob,
                switch_prob=hparams.mixup_switch_prob,
                label_smoothing=hparams.label_smoothing,
                num_classes=hparams.num_classes,
            )
            self.train_criterion: nn.Module = SoftTargetCrossEntropy()
        else:
            self.train_criterion = nn.CrossEntropyLoss(label_smoothing=hparams.label_smoothing)
        self.eval_criterion = nn.CrossEntropyLoss()

    def configure_metrics(self) -> None:
        num_classes = self.hparams.num_classes
        metrics = MetricCollection(
            {
                "top1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
                "top5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"),
            }
        )
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.model(images)

    def training_step(self, batch: ClassificationBatch, batch_idx: int) -> torch.Tensor:
        images, labels = self.unpack_batch(batch, "image", "label")
        targets = labels
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
        loss = self.train_criterion(self(images), targets)
        if not self.loss_is_usable(loss, batch_idx):
            return self.skipped_batch_loss()
        self.log("train/loss", loss, prog_bar=True, batch_size=images.shape[0])
        return loss

    def validation_step(self, batch: ClassificationBatch, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), prog_bar=True)
        self.val_metrics.reset()

    def test_step(self, batch: ClassificationBatch, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute())
        self.test_metrics.reset()

    def _evaluate(self, batch: ClassificationBatch, stage: str, metrics: MetricCollection) -> None:
        images, labels = self.unpack_batch(batch, "image", "label")
        logits = self(images)
        loss = self.eval_criterion(logits, labels)
        self.log_eval_loss(stage, loss, batch_size=images.shape[0])
        metrics.update(logits, labels)

    def predict_step(self, batch: ClassificationBatch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Class index, class probabilities and class name for each image."""
        images, _ = self.unpack_batch(batch, "image", "label")
        probabilities = F.softmax(self(images).float(), dim=-1)
        class_index = probabilities.argmax(dim=-1)
        names = self.hparams.label_names
        label_name = [names[i] if names else str(i) for i in class_index.tolist()]
        return {"class_index": class_index, "probabilities": probabilities, "label_name": label_name}


def check_prediction_output(top_k: int, file_format: str) -> None:
    """Raise naming ``predict_top_k`` or ``predict_format`` when the writer could not honour it."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"predict_top_k={top_k!r} must be a whole number of classes, at least 1.")
    if file_format not in PREDICTION_FORMATS:
        raise ValueError(
            f"predict_format={file_format!r} is not a predictions format: use one of {', '.join(PREDICTION_FORMATS)}."
        )


def check_mixup_batches(datamodule: Any, world_size: int = 1) -> None:
    """Raise unless ``datamodule`` gives even training batches (timm's ``Mixup`` pairs each image with its mirror).

    With ``drop_last=false`` the last batch of an epoch holds what is left; an odd remainder would
    stop training there.
    """
    hparams = getattr(datamodule, "hparams", None)
    if hparams is None or "batch_size" not in hparams:
        return
    batch_size, drop_last = hparams["batch_size"], hparams.get("drop_last", True)
    if batch_size % 2:
        raise ValueError(
            f"Mixup/CutMix (model.mixup_alpha / model.cutmix_alpha > 0) needs an even data.batch_size, got "
            f"{batch_size}: set data.batch_size to {batch_size + 1} or {batch_size - 1}, or turn Mixup and CutMix off."
        )
    if drop_last:
        return
    train = getattr(datamodule, "datasets", {}).get("train")
    if isinstance(train, Sized):
        per_device = -(-len(train) // world_size)
        remainder = per_device % batch_size
        if remainder % 2 == 0:
            return
        size = f"its last batch holds {remainder} of the {per_device} training examples per device"
    else:
        size = "the size of its last batch is unknown (streamed data)"
    raise ValueError(
        f"Mixup/CutMix (model.mixup_alpha / model.cutmix_alpha > 0) needs even batches, but with data.drop_last=false "
        f"{size}, and training would stop there. Set data.drop_last to true."
    )
