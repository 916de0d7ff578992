"""ObjectDetectionTask (Faster R-CNN) and InstanceSegmentationTask (Mask R-CNN) on any backbone ``RCNNDetector`` takes."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torchmetrics.detection import MeanAveragePrecision

from mambaout_pl.data.batches import DetectionBatch, DetectionTarget
from mambaout_pl.models.detector import RCNNDetector
from mambaout_pl.tasks.base import BaseTask, image_batch
from mambaout_pl.tasks.detection_metrics import coco_scores, detection_metric, metric_predictions, metric_targets
from mambaout_pl.tasks.detection_outputs import (
    DetectionResultsWriter,
    coco_results,
    dataset_category_ids,
    detection_panel,
    label_names_of,
)
from mambaout_pl.tasks.export_spec import ExportSpec
from mambaout_pl.tasks.validation_pictures import ValidationPictures

__all__ = ["InstanceSegmentationTask", "ObjectDetectionTask"]


class ObjectDetectionTask(ValidationPictures, BaseTask):
    """Train and evaluate an object detector: Faster R-CNN with an FPN over any backbone (``RCNNDetector``).

    Batches are ``DetectionBatch`` (``mambaout_pl.data.batches``): a list of float images in [0, 1]
    and one target per image with ``boxes`` (XYXY pixels) and ``labels`` (1..``num_classes``);
    evaluation targets also carry ``iscrowd`` and ``area``. ``task(images)`` returns the detector's
    outputs: per image ``boxes``, ``labels``, ``scores`` (and ``masks``). The training loss is the
    sum of the detector's losses, each logged as ``train/loss_<name>``. Validation and test log
    COCO's ``{stage}/bbox_mAP``, ``_mAP_50``, ``_mAP_75`` and ``_mAP_small|medium|large`` over the
    whole set once per epoch (see ``detection_metrics``), and pictures of the first
    ``num_val_images`` validation images (truth | prediction) to loggers that take images.
    ``trainer.predict`` writes COCO results json and pictures (see ``DetectionResultsWriter``).

    The defaults are the MambaOut paper's COCO schedule (mmdetection's 1x): AdamW, lr 1e-4, weight
    decay 0.05, a linear warm-up over 1000 updates from 0.001 x lr, and lr x 0.1 after epochs 8
    and 11 of 12 (``scheduler: multistep``).

    Args:
        backbone: any name ``FeatureBackbone`` takes: ours, a timm model with multi-scale
            features, or a dotted class path.
        num_classes: object classes, without the background (linked from the data module by the CLI).
        label_names: class names of labels 1..num_classes, in order (linked from the data module).
        pretrained: ImageNet weights for the backbone: a local ``.pth``/``.safetensors`` file
            (official MambaOut release or timm keys; a timm model's own file for timm backbones).
        backbone_args: extra keyword arguments for the backbone model (``token_mixer``, ...).
        drop_path_rate: stochastic depth rate of the backbone's last block.
        head_style: ``"mmdet"`` (mmdetection's RoIAlign, proposal count and losses) or
            ``"torchvision"`` (torchvision's defaults); see ``mambaout_pl.models.detector``.
        out_indices: backbone stages fed to the FPN.
        stage_norm: a LayerNorm on each stage output (the MambaOut authors' setting).
        fpn_channels: channels of the FPN, the RPN head and the mask head.
        anchor_sizes: anchor side of each FPN level, P2 first.
        min_size: shorter image side after the detector's own resize.
        max_size: upper bound of the longer side after that resize.
        box_batch_size_per_image: RoIs sampled per image to train the box (and mask) head.
        box_detections_per_img: detections kept per image at inference.
        rpn_pre_nms_top_n_train: RPN proposals kept per FPN level before NMS in training.
        rpn_pre_nms_top_n_test: RPN proposals kept per FPN level before NMS at inference.
        rpn_post_nms_top_n_train: RPN proposals kept per image after NMS in training (``None``:
            1000 with ``head_style="mmdet"``, 2000 with ``"torchvision"``).
        rpn_post_nms_top_n_test: RPN proposals kept per image after NMS at inference, the RoIs the
            box head scores (fewer validate faster on small images with few objects).
        map_backend: the COCO evaluation code: ``"faster_coco_eval"`` or ``"pycocotools"``.
        num_val_images: validation images shown as truth | prediction pictures (0: none).
        predict_dir: folder where ``trainer.predict`` writes ``results.json`` and ``pictures/``
            (``None``: ``<trainer.log_dir>/predict``, the run's folder).
        num_predict_pictures: images drawn with their detections by ``trainer.predict``.
        score_threshold: lowest score of a detection drawn in pictures (all are scored and written).
        lr: peak learning rate.
        weight_decay: weight decay (none on norms and biases).
        scheduler: any ``timm.scheduler`` schedule name, stepped per optimizer update.
        decay_milestones: epochs after which ``multistep`` multiplies the learning rate by 0.1.
        warmup_steps: linear warm-up length in optimizer updates (``None``: use ``warmup_epochs``).
        warmup_lr: learning rate at the start of warm-up (mmdetection: 0.001 x ``lr``).
        min_lr: learning rate at the end of the decay.
        **kwargs: the other optimizer, schedule, EMA and non-finite-loss settings of
            :class:`BaseTask`, with its defaults; the ones above differ from them.
    """

    monitor = "val/bbox_mAP"
    mode = "max"
    output_settings = ("predict_dir", "num_predict_pictures", "score_threshold")
    #: Train and evaluate instance masks (Mask R-CNN).
    masks: bool = False

    def __init__(
        self,
        backbone: str = "mambaout_tiny",
        num_classes: int = 80,
        label_names: list[str] | None = None,
        pretrained: str | None = None,
        backbone_args: dict[str, Any] | None = None,
        drop_path_rate: float = 0.0,
        head_style: str = "mmdet",
        out_indices: tuple[int, ...] = (-4, -3, -2, -1),
        stage_norm: bool = True,
        fpn_channels: int = 256,
        anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512),
        min_size: int = 800,
        max_size: int = 1333,
        box_batch_size_per_image: int = 512,
        box_detections_per_img: int = 100,
        rpn_pre_nms_top_n_train: int = 2000,
        rpn_pre_nms_top_n_test: int = 1000,
        rpn_post_nms_top_n_train: int | None = None,
        rpn_post_nms_top_n_test: int = 1000,
        map_backend: str = "faster_coco_eval",
        num_val_images: int = 4,
        predict_dir: str | None = None,
        num_predict_pictures: int = 8,
        score_threshold: float = 0.5,
        lr: float = 1e-4,
        weight_decay: float = 0.05,
        scheduler: str = "multistep",
        decay_milestones: tuple[float, ...] | None = (8, 11),
        warmup_steps: int | None = 1000,
        warmup_lr: float = 1e-7,
        min_lr: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if label_names is not None and len(label_names) != num_classes:
            raise ValueError(
                f"label_names has {len(label_names)} names but num_classes is {num_classes}; "
                "give one name per class (without the background) or leave label_names unset."
            )
        super().__init__(
            lr=lr,
            weight_decay=weight_decay,
            scheduler=scheduler,
            decay_milestones=decay_milestones,
            warmup_steps=warmup_steps,
            warmup_lr=warmup_lr,
            min_lr=min_lr,
            **kwargs,
        )
        self._pictures: list[torch.Tensor] = []  # validation pictures of the current epoch (rank 0)
        self._category_ids: list[int] | None = None  # the dataset's category id of each label, in predict

    # -- building -----------------------------------------------------------------------------

    def configure_models(self) -> None:
        hparams = self.hparams
        self.model = RCNNDetector(
            backbone=hparams.backbone,
            num_classes=hparams.num_classes,
            masks=self.masks,
            head_style=hparams.head_style,
            backbone_args=hparams.backbone_args,
            out_indices=hparams.out_indices,
            stage_norm=hparams.stage_norm,
            fpn_channels=hparams.fpn_channels,
            anchor_sizes=hparams.anchor_sizes,
            drop_path_rate=hparams.drop_path_rate,
            min_size=hparams.min_size,
            max_size=hparams.max_size,
            box_batch_size_per_image=hparams.box_batch_size_per_image,
            box_detections_per_img=hparams.box_detections_per_img,
            rpn_pre_nms_top_n_train=hparams.rpn_pre_nms_top_n_train,
            rpn_pre_nms_top_n_test=hparams.rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_train=hparams.rpn_post_nms_top_n_train,
            rpn_post_nms_top_n_test=hparams.rpn_post_nms_top_n_test,
            pretrained=hparams.pretrained,
        )

    def network_args(self) -> dict[str, Any]:
        """Deprecated: ``task.model.config["model_args"]``."""
        warnings.warn(
            f'{type(self).__name__}.network_args() is deprecated; use task.model.config["model_args"].',
            FutureWarning,
            stacklevel=2,
        )
        return self.model.config["model_args"]

    def configure_metrics(self) -> None:
        self.val_metrics = detection_metric(self.masks, self.hparams.map_backend)
        self.test_metrics = detection_metric(self.masks, self.hparams.map_backend)

    def configure_callbacks(self) -> list[Callback]:
        callbacks = super().configure_callbacks()
        hparams = self.hparams
        writer = DetectionResultsWriter(
            hparams.predict_dir, hparams.num_predict_pictures, hparams.label_names, hparams.score_threshold
        )
        return [*callbacks, writer]

    def example_input(self, data_hparams: Mapping[str, Any]) -> tuple[list[torch.Tensor]] | None:
        """One image as large as the detector's own resize leaves it: ``min_size`` x ``max_size``."""
        channels = (self.hparams.backbone_args or {}).get("in_chans", 3)
        return ([image_batch((self.hparams.min_size, self.hparams.max_size), channels)[0]],)

    def export_spec(self, data_hparams: Mapping[str, Any] | None = None) -> ExportSpec:
        """mambaout-pl's format: the ``RCNNDetector`` and the arguments of its ``config``."""
        config = self.model.config
        return ExportSpec(
            model_name=config["model_name"],
            model_args=config["model_args"],
            pipeline_tag="image-segmentation" if self.masks else "object-detection",
            metrics=("mean_average_precision",),
            label_names=self.hparams.label_names,
            dataset=(data_hparams or {}).get("path"),
        )

    # -- training -----------------------------------------------------------------------------

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return self.model(images)

    def training_step(self, batch: DetectionBatch, batch_idx: int) -> torch.Tensor:
        images = batch["images"]
        losses = self.model(images, [self._training_target(target) for target in batch["targets"]])
        loss = sum(losses.values())
        if not self.loss_is_usable(loss, batch_idx):
            return self.skipped_batch_loss()
        batch_size = len(images)
        self.log_dict({f"train/{name}": value for name, value in losses.items()}, batch_size=batch_size)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        return loss

    def _training_target(self, target: DetectionTarget) -> dict[str, torch.Tensor]:
        """What the detector trains on: boxes, labels (and masks), without crowd regions."""
        self._check_masks(target)
        keys = ("boxes", "labels", "masks") if self.masks else ("boxes", "labels")
        trained = {key: target[key].as_subclass(torch.Tensor) for key in keys}
        iscrowd = target.get("iscrowd")
        if iscrowd is not None and bool(iscrowd.any()):
            keep = iscrowd == 0
            trained = {key: value[keep] for key, value in trained.items()}
        return trained

    def _check_masks(self, target: DetectionTarget) -> None:
        if self.masks and "masks" not in target:
            raise ValueError(
                f"{type(self).__name__} trains and scores instance masks, but the batch's targets have none. "
                "Set `data.masks: true`, or train boxes only with mambaout_pl.tasks.ObjectDetectionTask."
            )

    # -- evaluation ---------------------------------------------------------------------------

    def validation_step(self, batch: DetectionBatch, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_metrics)

    def test_step(self, batch: DetectionBatch, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_metrics)

    def _evaluate(self, batch: DetectionBatch, stage: str, metric: MeanAveragePrecision) -> None:
        for target in batch["targets"]:
            self._check_masks(target)
        outputs = self.model(batch["images"])
        metric.update(metric_predictions(outputs, self.masks), metric_targets(batch["targets"], self.masks))
        if stage != "val":
            return
        for image, target, output in zip(batch["images"], batch["targets"], outputs, strict=True):
            if not self._wants_pictures():
                break
            names = label_names_of(self.hparams.label_names)
            self._pictures.append(detection_panel(image, target, output, names, self.hparams.score_threshold))

    def _log_scores(self, stage: str, metric: MeanAveragePrecision) -> None:
        if not metric.update_called:
            return
        scores = coco_scores(metric, prefix=f"{stage}/")
        metric.reset()
        main = f"{stage}/{'segm' if self.masks else 'bbox'}_mAP"
        self.log(main, scores.pop(main), prog_bar=True)
        self.log_dict(scores)

    def on_predict_epoch_start(self) -> None:
        self._category_ids = dataset_category_ids(self._trainer)

    def predict_step(self, batch: DetectionBatch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Per image: its ``image_id`` (from its target, else its position) and its detections as COCO
        results (see ``detection_outputs.coco_results``), with the data module's category ids when it has them."""
        images = batch["images"]
        targets = batch.get("targets") or [{} for _ in images]
        first = batch_idx * len(images)
        image_ids = [int(target.get("image_id", first + index)) for index, target in enumerate(targets)]
        outputs = self.model(images)
        results = [
            coco_results(image_id, output, self._category_ids)
            for image_id, output in zip(image_ids, outputs, strict=True)
        ]
        return {"image_id": image_ids, "results": results}


class InstanceSegmentationTask(ObjectDetectionTask):
    """Train and evaluate an instance segmentation network: Mask R-CNN with an FPN over any backbone.

    As :class:`ObjectDetectionTask`, with a mask per object: targets carry ``masks`` (uint8
    ``[N, H, W]``), outputs ``masks`` (``[N, 1, H, W]`` probabilities, thresholded at 0.5 for
    scoring), and ``{stage}/segm_mAP``, ``_mAP_50``, ... are logged beside the box scores; the best
    checkpoint follows ``val/segm_mAP``.
    """

    monitor = "val/segm_mAP"
    masks = True
