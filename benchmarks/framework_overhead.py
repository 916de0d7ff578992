"""Framework overhead: optimizer steps per second of `Trainer.fit` on our task against a plain loop.

Both sides do the same work on the same model, weights, batches (in memory), precision, loss
(cross-entropy with label smoothing), optimizer (timm's AdamW) and per-update schedule (timm's
cosine). The plain loop runs inside a callback between the Trainer's epochs, alternating which
goes first, so both see the same machine state. Only the training epoch is timed: no validation,
no checkpointing; the TensorBoard logger stays on, as in a user's run.
"""

import copy
import tempfile
import time

import torch
from common import Row, compare
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mambaout_pl.tasks import ClassificationTask


class InMemoryImages(Dataset):
    """Fixed random images and labels, as `{"image", "label"}` samples."""

    def __init__(self, count: int, image_size: int, num_classes: int):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(count, 3, image_size, image_size, generator=generator)
        self.labels = torch.randint(0, num_classes, (count,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[index], "label": self.labels[index]}


class PlainLoop:
    """The same training as `ClassificationTask` with `optimizer='adamw'` and a cosine schedule, in plain PyTorch."""

    def __init__(self, task: ClassificationTask, loader: DataLoader, total_updates: int, precision: str):
        hparams = task.hparams
        self.model = copy.deepcopy(task.model)
        self.loader = loader
        self.criterion = nn.CrossEntropyLoss(label_smoothing=hparams.label_smoothing)
        self.optimizer = create_optimizer_v2(
            self.model,
            opt="adamw",
            lr=hparams.lr,
            weight_decay=hparams.weight_decay,
            betas=tuple(hparams.betas),
            eps=hparams.eps,
        )
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer,
            sched="cosine",
            num_epochs=1,
            warmup_epochs=0,
            min_lr=hparams.min_lr,
            step_on_epochs=False,
            updates_per_epoch=total_updates,
        )
        self.autocast = precision == "bf16"
        self.updates = 0

    def epoch(self) -> float:
        """Runs one epoch; returns optimizer steps per second."""
        self.model.train()
        start = time.perf_counter()
        steps = 0
        for batch in self.loader:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
                loss = self.criterion(self.model(batch["image"]), batch["label"])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.updates += 1
            self.scheduler.step_update(self.updates)
            steps += 1
        return steps / (time.perf_counter() - start)


class InterleavedTiming(Callback):
    """Times each Trainer training epoch and runs a plain-loop epoch before or after it, alternately."""

    def __init__(self, plain: PlainLoop, warmup_epochs: int):
        self.plain = plain
        self.warmup_epochs = warmup_epochs
        self.rates: dict[str, list[float]] = {"ours": [], "reference": []}
        self._start = 0.0
        self._steps_at_start = 0

    def _timed(self, epoch: int) -> bool:
        return epoch >= self.warmup_epochs

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch % 2 == 1:
            rate = self.plain.epoch()
            if self._timed(trainer.current_epoch):
                self.rates["reference"].append(rate)
        self._steps_at_start = trainer.global_step
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rate = (trainer.global_step - self._steps_at_start) / (time.perf_counter() - self._start)
        if self._timed(trainer.current_epoch):
            self.rates["ours"].append(rate)
        if trainer.current_epoch % 2 == 0:
            rate = self.plain.epoch()
            if self._timed(trainer.current_epoch):
                self.rates["reference"].append(rate)


def measure_overhead(
    image_size: int,
    batch_size: int,
    steps_per_epoch: int,
    rounds: int,
    warmup: int,
    precision: str,
    backbone: str = "mambaout_femto",
) -> Row:
    torch.manual_seed(0)
    num_classes = 10
    task = ClassificationTask(
        backbone=backbone,
        num_classes=num_classes,
        lr=1e-3,
        weight_decay=0.05,
        scheduler="cosine",
        warmup_epochs=0,
        min_lr=1e-5,
        label_smoothing=0.1,
    )
    dataset = InMemoryImages(steps_per_epoch * batch_size, image_size, num_classes)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    epochs = warmup + rounds
    timing = InterleavedTiming(PlainLoop(task, loader, epochs * steps_per_epoch, precision), warmup)
    with tempfile.TemporaryDirectory() as log_dir:
        trainer = Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=epochs,
            precision="bf16-mixed" if precision == "bf16" else "32-true",
            logger=TensorBoardLogger(log_dir),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            callbacks=[timing],
        )
        trainer.fit(task, train_dataloaders=loader)
    name = f"overhead/{backbone}/{image_size}px/b{batch_size}/{precision}"
    return compare(name, timing.rates, "steps/s")
