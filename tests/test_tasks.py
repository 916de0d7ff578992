"""ClassificationTask: forward, optimizer groups, per-update schedule, Mixup, EMA, predict, subclassing."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mambaout_pl.tasks import ClassificationTask


class ColourDataset(Dataset):
    """Images whose colour encodes the class (one of 4 RGB sign patterns): small and learnable."""

    colours = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0], [1.0, 1.0, -1.0]])

    def __init__(self, size: int = 32, image_size: int = 32) -> None:
        generator = torch.Generator().manual_seed(0)
        self.labels = torch.arange(size) % len(self.colours)
        base = self.colours[self.labels].view(-1, 3, 1, 1)
        noise = 0.3 * torch.randn(size, 3, image_size, image_size, generator=generator)
        self.images = base + noise

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[index], "label": self.labels[index]}


def loader(batch_size: int = 4, **kwargs) -> DataLoader:
    return DataLoader(ColourDataset(**kwargs), batch_size=batch_size, drop_last=True)


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


class LearningRateRecorder(Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_forward_returns_logits_for_each_class() -> None:
    task = ClassificationTask(backbone="mambaout_femto", num_classes=7)
    logits = task(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 7)


def test_label_names_must_match_num_classes() -> None:
    with pytest.raises(ValueError, match="label_names has 2 names but num_classes is 3"):
        ClassificationTask(num_classes=3, label_names=["a", "b"])


def test_no_weight_decay_on_norms_and_biases(tmp_path) -> None:
    task = ClassificationTask(backbone="mambaout_femto", num_classes=4, weight_decay=0.05)
    task.trainer = trainer(tmp_path, max_epochs=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(task.trainer), "estimated_stepping_batches", property(lambda self: 10))
        optimizer = task.configure_optimizers()["optimizer"]
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    for name, parameter in task.model.named_parameters():
        expected = 0.0 if parameter.ndim <= 1 else 0.05
        assert decay_of[id(parameter)] == expected, name
    assert isinstance(optimizer, torch.optim.AdamW)


def test_schedule_warms_up_linearly_then_follows_cosine_per_update(tmp_path) -> None:
    lr, warmup_lr, min_lr, epochs, updates_per_epoch = 1e-3, 1e-5, 1e-4, 4, 8
    task = ClassificationTask(
        backbone="mambaout_femto", num_classes=4, lr=lr, warmup_lr=warmup_lr, min_lr=min_lr, warmup_epochs=1
    )
    recorder = LearningRateRecorder()
    trainer(tmp_path, max_epochs=epochs, callbacks=[recorder], limit_val_batches=0).fit(
        task, loader(batch_size=4, size=32)
    )
    total = epochs * updates_per_epoch
    assert len(recorder.lrs) == total
    for step, observed in enumerate(recorder.lrs):
        if step < updates_per_epoch:
            expected = warmup_lr + step * (lr - warmup_lr) / updates_per_epoch
        else:
            expected = min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * step / total))
        assert observed == pytest.approx(expected, rel=1e-6), step


def test_training_learns_and_logs_validation_metrics(tmp_path) -> None:
    torch.manual_seed(0)
    task = ClassificationTask(backbone="mambaout_femto", num_classes=4, lr=2e-3, warmup_epochs=0, min_lr=1e-4)
    fit_trainer = trainer(tmp_path, max_epochs=6)
    fit_trainer.fit(task, loader(batch_size=8), loader(batch_size=8))
    metrics = fit_trainer.callback_metrics
    assert {"train/loss", "val/loss", "val/top1", "val/top5"} <= set(metrics)
    assert metrics["val/top1"] == 1.0
    assert metrics["val/top5"] == 1.0  # top-k is capped at the class count
    results = fit_trainer.test(task, loader(batch_size=8), verbose=False)[0]
    assert results["test/top1"] == 1.0


def test_mixup_uses_soft_target_loss_on_mixed_batches(tmp_path) -> None:
    task = ClassificationTask(
        backbone="mambaout_femto", num_classes=4, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1
    )
    batch = next(iter(loader(batch_size=4)))
    seed_everything(0, verbose=False)
    mixed_images, soft_targets = task.mixup(batch["image"].clone(), batch["label"].clone())
    assert soft_targets.shape == (4, 4)
    assert torch.allclose(soft_targets.sum(dim=1), torch.ones(4))
    assert not torch.equal(mixed_images, batch["image"])
    seed_everything(0, verbose=False)
    task.eval()
    loss = task.training_step(batch, 0)
    expected = torch.sum(-soft_targets * torch.log_softmax(task(mixed_images), dim=-1), dim=-1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_ema_is_a_callback_outside_the_module_tree(tmp_path) -> None:
    task = ClassificationTask(backbone="mambaout_femto", num_classes=4, ema_decay=0.9)
    ema, _writer, _pictures = task.configure_callbacks()  # the EMA, the predictions writer, the pictures
    assert isinstance(ema, EMAWeightAveraging)
    assert not any("ema" in name or "average" in name for name, _ in task.named_modules())
    start = {k: v.clone() for k, v in task.model.state_dict().items()}
    trainer(tmp_path, max_epochs=1, limit_val_batches=0).fit(task, loader(batch_size=4))
    # After fit the task holds the averaged weights: 0.9-EMA of 8 updates stays near the start.
    averaged = task.model.stem.conv1.weight
    assert not torch.equal(averaged, start["stem.conv1.weight"])
    plain = ClassificationTask(backbone="mambaout_femto", num_classes=4)
    plain.load_state_dict({f"model.{k}": v for k, v in start.items()})
    trainer(tmp_path, max_epochs=1, limit_val_batches=0).fit(plain, loader(batch_size=4))
    assert not torch.allclose(averaged, plain.model.stem.conv1.weight)


def test_predict_returns_indices_probabilities_and_names(tmp_path) -> None:
    task = ClassificationTask(backbone="mambaout_femto", num_classes=4, label_names=["w", "x", "y", "z"])
    predictions = trainer(tmp_path).predict(task, loader(batch_size=4, size=8))
    first = predictions[0]
    assert first["probabilities"].shape == (4, 4)
    assert torch.allclose(first["probabilities"].sum(dim=1), torch.ones(4))
    assert torch.equal(first["class_index"], first["probabilities"].argmax(dim=1))
    assert first["label_name"] == [["w", "x", "y", "z"][i] for i in first["class_index"].tolist()]


class FocalLossTask(ClassificationTask):
    """The README's subclassing example: one overridden method swaps the training loss."""

    def configure_losses(self) -> None:
        super().configure_losses()
        self.train_criterion = FocalLoss(gamma=2.0)


class FocalLoss(nn.Module):
    def __init__(self, gamma: float) -> None:
        super().__init__()
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        log_p = torch.log_softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1)
        return (-((1 - log_p.exp()) ** self.gamma) * log_p).mean()


def test_subclass_overriding_one_configure_method_changes_the_loss() -> None:
    task = FocalLossTask(backbone="mambaout_femto", num_classes=4)
    task.eval()
    batch = next(iter(loader(batch_size=4)))
    loss = task.training_step(batch, 0)
    logits = task(batch["image"])
    probability = torch.softmax(logits, dim=-1)[torch.arange(4), batch["label"]]
    expected = (-((1 - probability) ** 2) * probability.log()).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() < nn.functional.cross_entropy(logits, batch["label"]).item()


def test_channels_last_gives_the_same_logits() -> None:
    torch.manual_seed(0)
    plain = ClassificationTask(backbone="mambaout_femto", num_classes=4).eval()
    channels_last = ClassificationTask(backbone="mambaout_femto", num_classes=4, channels_last=True).eval()
    channels_last.load_state_dict(plain.state_dict())
    assert channels_last.model.stem.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(channels_last(images), plain(images), atol=1e-4, rtol=1e-4)


SHARED_DEFAULTS = {
    "optimizer": "adamw",
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "layer_decay": None,
    "warmup_epochs": 0.0,
    "cooldown_epochs": 0,
    "ema_decay": None,
    "nonfinite_loss": "raise",
}


def test_optimizer_arguments_are_declared_on_base_task_with_each_task_defaults() -> None:
    from mambaout_pl.tasks import BaseTask, SegmentationTask

    declared = inspect.signature(BaseTask.__init__).parameters
    assert set(SHARED_DEFAULTS) | {
        "lr",
        "weight_decay",
        "scheduler",
        "warmup_steps",
        "warmup_lr",
        "min_lr",
        "poly_power",
    } <= set(declared)
    assert "optimizer" not in inspect.signature(ClassificationTask.__init__).parameters  # passed on, not re-declared
    classification = ClassificationTask(num_classes=3).hparams
    assert {name: classification[name] for name in SHARED_DEFAULTS} == SHARED_DEFAULTS
    assert (classification.lr, classification.weight_decay, classification.scheduler) == (1e-3, 0.05, "cosine")
    assert (
        classification.warmup_lr,
        classification.min_lr,
        classification.warmup_steps,
        classification.poly_power,
    ) == (1e-6, 1e-5, None, None)
    segmentation = SegmentationTask(
        backbone="mambaout_femto", num_classes=3, decode_channels=16, aux_channels=8
    ).hparams
    assert {name: segmentation[name] for name in SHARED_DEFAULTS} == SHARED_DEFAULTS
    assert (segmentation.lr, segmentation.weight_decay, segmentation.scheduler) == (1e-4, 0.01, "poly")
    assert (segmentation.warmup_lr, segmentation.min_lr, segmentation.warmup_steps, segmentation.poly_power) == (
        1e-10,
        0.0,
        1500,
        1.0,
    )
    with pytest.raises(TypeError, match="learning_rate"):
        ClassificationTask(num_classes=3, learning_rate=0.1)
