"""SegmentationTask: semantic segmentation with UperNet on any backbone ``FeatureBackbone`` takes."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torchmetrics import MetricCollection

from mambaout_pl.data.batches import SegmentationEvalBatch, SegmentationTrainBatch, unpadded_image, unpadded_mask
from mambaout_pl.models.inference import INFERENCE_MODES, segment
from mambaout_pl.models.segmentor import DECODE_HEADS, UperNetSegmentor
from mambaout_pl.models.upernet import resize
from mambaout_pl.tasks.arguments import check_drop_path_rate
from mambaout_pl.tasks.base import BaseTask, image_batch
from mambaout_pl.tasks.export_spec import ExportSpec, preprocessing_config
from mambaout_pl.tasks.segmentation_metrics import confusion_scores, segmentation_metrics
from mambaout_pl.tasks.segmentation_outputs import SegmentationMaskWriter, overlay_panel
from mambaout_pl.tasks.validation_pictures import ValidationPictures


class SegmentationTask(ValidationPictures, BaseTask):
    """Train and evaluate a semantic segmentation network (``UperNetSegmentor``).

    ``task(images)`` returns logits ``[B, num_classes, H, W]`` at the image size. Training batches
    are ``SegmentationTrainBatch``; evaluation batches are ``SegmentationEvalBatch`` (padded images
    with each image's ``image_size`` and ``original_size``, see ``mambaout_pl.data.batches``), and
    predictions are scored at the original label resolution. Logs ``train/loss`` (decode + ``aux_weight`` x
    auxiliary), ``val/loss``, ``val/mIoU``, ``val/mAcc``, ``val/aAcc`` and ``val/IoU/<class>``
    (mmsegmentation's dataset-level scores, see ``segmentation_metrics``), the same under
    ``test/``, and image | truth | prediction pictures to loggers that take images. The per-class table of
    the last validation is printed once, when ``fit`` (or ``validate``, ``test``) ends.

    Args:
        backbone: any name ``FeatureBackbone`` takes: ours, a timm model, or a dotted class path.
        num_classes: number of classes (linked from the data module by the CLI).
        label_names: class names, index-aligned (linked from the data module by the CLI).
        pretrained: ImageNet weights for the backbone: a local ``.pth``/``.safetensors`` file
            (official MambaOut release or timm keys; a timm model's own file for timm backbones).
        backbone_args: extra keyword arguments for the backbone model.
        drop_path_rate: stochastic depth rate of the backbone's last block.
        out_indices: backbone stages fed to the heads (default: the last four).
        stage_norm: a LayerNorm on each stage output (the MambaOut authors' setting).
        decode_head: ``"upernet"`` (pyramid pooling + FPN) or ``"fcn"`` (an FCN head on the last stage).
        decode_channels: width of the decode head.
        pool_scales: bin counts of UperNet's pyramid pooling.
        dropout: dropout before each classifier.
        aux_head: train an auxiliary FCN head on stage ``aux_stage`` (unused at inference).
        aux_stage: position among the selected stages of the auxiliary head's input (2: the third).
        aux_channels: width of the auxiliary head.
        aux_weight: weight of the auxiliary loss.
        ignore_index: label of pixels that are neither trained on nor scored.
        lr: peak learning rate.
        weight_decay: weight decay (none on norms and biases).
        scheduler: any ``timm.scheduler`` schedule name, stepped per optimizer update.
        poly_power: power of the ``poly`` schedule.
        warmup_steps: linear warm-up length in optimizer updates (``None``: use ``warmup_epochs``).
        warmup_lr: learning rate at the start of warm-up (mmsegmentation: ``lr`` x 1e-6).
        min_lr: learning rate at the end of the decay.
        inference: ``"whole"`` (the whole image at once) or ``"slide"`` (overlapping windows).
        slide_crop_size: sliding-window size ``(height, width)``.
        slide_stride: sliding-window stride ``(height, width)``.
        test_scales: rescale ratios of multi-scale testing (``[1.0]``: single scale), e.g.
            ``[0.5, 0.75, 1.0, 1.25, 1.5, 1.75]``; applied to the evaluation image, which the data
            module already rescaled to its evaluation scale.
        test_flip: also predict on horizontally flipped images and average.
        num_val_images: validation images shown as image | truth | prediction pictures (0: none).
        predict_dir: folder where ``trainer.predict`` writes one palette PNG per image, named after the
            image's file (pixel value = class index, at the image's size); ``None``:
            ``<trainer.log_dir>/predict``, the run's folder.
        **kwargs: the other optimizer, schedule, EMA and non-finite-loss settings of
            :class:`BaseTask`, with its defaults; the ones above differ from them.
    """

    monitor = "val/mIoU"
    mode = "max"
    _score_table_text: str | None = None  # the last evaluation's per-class table, until printed
    output_settings = ("predict_dir",)
    network_forward_methods = ("forward_heads",)

    def __init__(
        self,
        backbone: str = "mambaout_tiny",
        num_classes: int = 150,
        label_names: list[str] | None = None,
        pretrained: str | None = None,
        backbone_args: dict[str, Any] | None = None,
        drop_path_rate: float = 0.0,
        out_indices: tuple[int, ...] = (-4, -3, -2, -1),
        stage_norm: bool = True,
        decode_head: str = "upernet",
        decode_channels: int = 512,
        pool_scales: tuple[int, ...] = (1, 2, 3, 6),
        dropout: float = 0.1,
        aux_head: bool = True,
        aux_stage: int = 2,
        aux_channels: int = 256,
        aux_weight: float = 0.4,
        ignore_index: int = 255,
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        scheduler: str = "poly",
        poly_power: float = 1.0,
        warmup_steps: int | None = 1500,
        warmup_lr: float = 1e-10,
        min_lr: float = 0.0,
        inference: str = "whole",
        slide_crop_size: tuple[int, int] = (512, 512),
        slide_stride: tuple[int, int] = (341, 341),
        test_scales: tuple[float, ...] = (1.0,),
        test_flip: bool = False,
        num_val_images: int = 4,
        predict_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        check_drop_path_rate(drop_path_rate)
        if label_names is not None and len(label_names) != num_classes:
            raise ValueError(
                f"label_names has {len(label_names)} names but num_classes is {num_classes}; "
                "give one name per class or leave label_names unset."
            )
        if inference not in INFERENCE_MODES:
            raise ValueError(f"inference={inference!r} is not one of {list(INFERENCE_MODES)}.")
        if decode_head not in DECODE_HEADS:
            raise ValueError(f"decode_head={decode_head!r} is not one of {list(DECODE_HEADS)}.")
        if not test_scales or min(test_scales) <= 0:
            raise ValueError(f"test_scales={test_scales} must be positive ratios, e.g. [1.0] or [0.5, 1.0, 1.5].")
        super().__init__(
            lr=lr,
            weight_decay=weight_decay,
            scheduler=scheduler,
            poly_power=poly_power,
            warmup_steps=warmup_steps,
            warmup_lr=warmup_lr,
            min_lr=min_lr,
            **kwargs,
        )
        self._pictures: list[torch.Tensor] = []  # validation pictures of the current epoch (rank 0)

    # -- building -----------------------------------------------------------------------------

    def configure_models(self) -> None:
        hparams = self.hparams
        self.model = UperNetSegmentor(
            backbone=hparams.backbone,
            num_classes=hparams.num_classes,
            decode_head=hparams.decode_head,
            channels=hparams.decode_channels,
            pool_scales=hparams.pool_scales,
            dropout=hparams.dropout,
            stage_norm=hparams.stage_norm,
            aux_head=hparams.aux_head,
            aux_stage=hparams.aux_stage,
            aux_channels=hparams.aux_channels,
            out_indices=hparams.out_indices,
            drop_path_rate=hparams.drop_path_rate,
            backbone_args=hparams.backbone_args,
            pretrained=hparams.pretrained,
        )

    def export_spec(self, data_hparams: Mapping[str, Any] | None = None) -> ExportSpec:
        """mambaout-pl's format (the ``UperNetSegmentor``'s ``config``), with the data module's crop as input size."""
        config = self.model.config
        return ExportSpec(
            model_name=config["model_name"],
            model_args=config["model_args"],
            pipeline_tag="image-segmentation",
            metrics=("mean_iou",),
            label_names=self.hparams.label_names,
            preprocessing=preprocessing_config(data_hparams or {}, size_key="crop_size"),
            dataset=(data_hparams or {}).get("path"),
        )

    def network_args(self) -> dict[str, Any]:
        """Deprecated: ``task.model.config["model_args"]``."""
        warnings.warn(
            'SegmentationTask.network_args() is deprecated; use task.model.config["model_args"].',
            FutureWarning,
            stacklevel=2,
        )
        return self.model.config["model_args"]

    def configure_losses(self) -> None:
        self.criterion = nn.CrossEntropyLoss(ignore_index=self.hparams.ignore_index)

    def configure_metrics(self) -> None:
        num_classes, ignore_index = self.hparams.num_classes, self.hparams.ignore_index
        self.val_metrics = segmentation_metrics(num_classes, ignore_index, prefix="val/")
        self.test_metrics = segmentation_metrics(num_classes, ignore_index, prefix="test/")

    def configure_callbacks(self) -> list[Callback]:
        names = self.hparams.label_names or [str(index) for index in range(self.hparams.num_classes)]
        return [*super().configure_callbacks(), SegmentationMaskWriter(self.hparams.predict_dir, label_names=names)]

    def example_input(self, data_hparams: Mapping[str, Any]) -> torch.Tensor | None:
        """One image of the data's training ``crop_size``."""
        size = data_hparams.get("crop_size")
        channels = (self.hparams.backbone_args or {}).get("in_chans", 3)
        return None if size is None else image_batch(size, channels)

    # -- training -----------------------------------------------------------------------------

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch: SegmentationTrainBatch, batch_idx: int) -> torch.Tensor:
        images, masks = self.unpack_batch(batch, "image", "mask")
        logits, aux_logits = self.model.forward_heads(images)
        decode_loss = self._loss(logits, masks)
        loss, aux_loss = decode_loss, None
        batch_size = images.shape[0]
        if aux_logits is not None and self.hparams.aux_weight > 0:
            aux_loss = self._loss(aux_logits, masks)
            loss = decode_loss + self.hparams.aux_weight * aux_loss
        if not self.loss_is_usable(loss, batch_idx):
            return self.skipped_batch_loss()
        if aux_loss is not None:
            self.log("train/aux_loss", aux_loss, batch_size=batch_size)
        self.log("train/decode_loss", decode_loss, batch_size=batch_size)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        return loss

    def _loss(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of logits resized (bilinear) to the label maps, over the labelled pixels."""
        logits = resize(logits, masks.shape[-2:])
        if not (masks != self.hparams.ignore_index).any():
            return logits.sum() * 0.0  # nothing labelled: no gradient, and no NaN from 0 / 0
        return self.criterion(logits.float(), masks)

    # -- evaluation ---------------------------------------------------------------------------

    def predict_log_probabilities(self, batch: SegmentationEvalBatch) -> list[torch.Tensor]:
        """Log-probabilities ``[K, H, W]`` of each image at its original size, by the configured inference."""
        hparams = self.hparams
        options = dict(
            mode=hparams.inference,
            crop_size=tuple(hparams.slide_crop_size),
            stride=tuple(hparams.slide_stride),
            scales=tuple(hparams.test_scales),
            flip=hparams.test_flip,
        )
        images = batch["image"]
        image_sizes = batch.get("image_size")
        original_sizes = batch.get("original_size")
        if image_sizes is None:  # a plain batch of images: score at the image size
            return list(segment(self.model, images, tuple(images.shape[-2:]), **options))
        same_image_size = bool((image_sizes == torch.tensor(images.shape[-2:], device=image_sizes.device)).all())
        same_original_size = bool((original_sizes == original_sizes[0]).all())
        if same_image_size and same_original_size:
            return list(segment(self.model, images, tuple(original_sizes[0].tolist()), **options))
        outputs = []
        for index, original_size in enumerate(original_sizes.tolist()):
            outputs.append(segment(self.model, unpadded_image(batch, index)[None], tuple(original_size), **options)[0])
        return outputs

    def validation_step(self, batch: SegmentationEvalBatch, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_metrics)

    def test_step(self, batch: SegmentationEvalBatch, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_metrics)

    def _evaluate(self, batch: SegmentationEvalBatch, stage: str, metrics: MetricCollection) -> None:
        log_probabilities = self.predict_log_probabilities(batch)
        padded = "original_size" in batch  # a plain {"image", "mask"} batch is scored at the image size
        losses = []
        for index, scores in enumerate(log_probabilities):
            mask = unpadded_mask(batch, index) if padded else batch["mask"][index]
            prediction = scores.argmax(dim=0)
            metrics.update(prediction[None], mask[None])
            if (mask != self.hparams.ignore_index).any():
                losses.append(F.nll_loss(scores[None], mask[None], ignore_index=self.hparams.ignore_index))
            if stage == "val" and self._wants_pictures():
                image = unpadded_image(batch, index) if padded else batch["image"][index]
                self._pictures.append(overlay_panel(image, mask, prediction, ignore_index=self.hparams.ignore_index))
        if losses:
            self.log_eval_loss(stage, torch.stack(losses).mean(), batch_size=len(losses))

    def _log_scores(self, stage: str, metrics: MetricCollection) -> None:
        results = metrics.compute()
        metrics.reset()
        scores = confusion_scores(results[f"{stage}/confusion"])
        self.log_dict(
            {
                f"{stage}/mIoU": results[f"{stage}/mIoU"].float(),
                f"{stage}/mAcc": scores["mAcc"].float(),
                f"{stage}/aAcc": scores["aAcc"].float(),
            },
            prog_bar=True,
        )
        names = self.hparams.label_names or [str(index) for index in range(self.hparams.num_classes)]
        per_class = {
            f"{stage}/IoU/{name}": iou.float()
            for name, iou in zip(names, scores["IoU"], strict=True)
            if not torch.isnan(iou)
        }
        if per_class:
            self.log_dict(per_class)
        if self._trainer is not None and not self.trainer.sanity_checking:
            fitting = self.trainer.state.fn == TrainerFn.FITTING
            title = f"{stage} (epoch {self.current_epoch})" if fitting else stage
            self._score_table_text = self._score_table(title, names, scores)

    def on_train_end(self) -> None:
        self._print_score_table()  # the last validation's, once, after the progress bar

    def on_validation_end(self) -> None:
        super().on_validation_end()
        if self.trainer.state.fn == TrainerFn.VALIDATING:
            self._print_score_table()

    def on_test_end(self) -> None:
        super().on_test_end()
        self._print_score_table()

    def _print_score_table(self) -> None:
        text, self._score_table_text = self._score_table_text, None
        if text is not None and self.trainer.is_global_zero:
            print(text, flush=True)

    @staticmethod
    def _score_table(stage: str, names: list[str], scores: dict[str, torch.Tensor]) -> str:
        """Per-class IoU and accuracy as fractions, as the progress bar and the logs give ``mIoU``."""
        width = max(len("class"), *(len(name) for name in names))
        lines = [f"Per-class {stage} scores:", f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}"]
        for name, iou, accuracy in zip(names, scores["IoU"].tolist(), scores["Acc"].tolist(), strict=True):
            lines.append(f"{name:<{width}}  {iou:6.4f}  {accuracy:6.4f}")
        lines.append(
            f"{'mean':<{width}}  {scores['mIoU'].item():6.4f}  {scores['mAcc'].item():6.4f}"
            f"  (aAcc {scores['aAcc'].item():.4f})"
        )
        return "\n".join(lines)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Per image: the predicted label map at the original size (uint8, or int32 above 256 classes) and its name."""
        if not isinstance(batch, dict):
            images, _ = self.unpack_batch(batch, "image", "mask")
            batch = {"image": images}
        dtype = torch.uint8 if self.hparams.num_classes <= 256 else torch.int32
        predictions = [scores.argmax(dim=0).to(dtype) for scores in self.predict_log_probabilities(batch)]
        names = batch.get("name") or [f"{batch_idx:06d}_{index}" for index in range(len(predictions))]
        return {"prediction": predictions, "name": list(names)}
