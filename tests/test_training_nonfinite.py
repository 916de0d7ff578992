"""Non-finite training losses: stop naming the step and batch, or skip the batch leaving the weights untouched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from mambaout_pl.errors import NonFiniteLossError
from mambaout_pl.tasks import ClassificationTask

TINY_BACKBONE = {"depths": [1, 1, 1, 1], "dims": [8, 8, 16, 16]}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], where: str) -> None:
    assert set(a) == set(b), where
    for name in a:
        assert torch.equal(a[name], b[name]), f"{where}: {name}"


class PoisonedBatches(torch.utils.data.Dataset):
    """Colour-coded 16x16 images (4 classes); the images of batch ``poisoned`` hold a NaN."""

    def __init__(self, poisoned: int, batch_size: int = 4, batches: int = 3) -> None:
        generator = torch.Generator().manual_seed(0)
        self.labels = torch.arange(batch_size * batches) % 4
        self.images = torch.randn(len(self.labels), 3, 16, 16, generator=generator) + self.labels.view(-1, 1, 1, 1)
        self.images[poisoned * batch_size : (poisoned + 1) * batch_size, 0, 0, 0] = float("nan")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[index], "label": self.labels[index]}


def tiny_task(**kwargs: Any) -> ClassificationTask:
    return ClassificationTask(num_classes=4, backbone_args=dict(TINY_BACKBONE), lr=1e-2, **kwargs)


class WeightsAfterEachBatch(Callback):
    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.weights.append({name: tensor.clone() for name, tensor in pl_module.model.state_dict().items()})


def train(task: ClassificationTask, tmp_path: Path, poisoned: int, callbacks: list[Callback] = ()) -> Trainer:
    loader = torch.utils.data.DataLoader(PoisonedBatches(poisoned), batch_size=4)
    trainer = Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    trainer.fit(task, loader)
    return trainer


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_batch(tmp_path: Path) -> None:
    task = tiny_task()
    before = {name: tensor.clone() for name, tensor in task.state_dict().items()}
    with pytest.raises(
        NonFiniteLossError, match=r"is nan at epoch 0, global step 1, batch 1 of the epoch.*nonfinite_loss: skip"
    ):
        train(task, tmp_path, poisoned=1)
    after = task.state_dict()
    assert all(torch.isfinite(tensor).all() for tensor in after.values())  # stopped before the NaN reached the weights
    assert any(not torch.equal(before[name], after[name]) for name in before)  # batch 0 was trained on


def test_a_non_finite_loss_is_skipped_when_asked_and_leaves_the_weights_untouched(tmp_path: Path) -> None:
    task = tiny_task(nonfinite_loss="skip")
    recorder = WeightsAfterEachBatch()
    trainer = train(task, tmp_path, poisoned=1, callbacks=[recorder])
    assert task.skipped_batches == 1
    assert trainer.callback_metrics["train/skipped_batches"].item() == 1.0
    after_first, after_poisoned, after_third = recorder.weights
    assert_same_weights(after_poisoned, after_first, "weights after the skipped batch")
    assert any(not torch.equal(after_third[name], after_poisoned[name]) for name in after_third)  # training goes on
    assert all(torch.isfinite(tensor).all() for tensor in after_third.values())


def test_nonfinite_loss_setting_is_checked() -> None:
    with pytest.raises(ValueError, match="nonfinite_loss='ignore' is not one of"):
        tiny_task(nonfinite_loss="ignore")
