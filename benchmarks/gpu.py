"""GPU end-to-end: optimizer steps per second of the ImageNet recipe's task on synthetic data.

MambaOut-Tiny with the recipe's settings (drop path 0.2, Mixup/CutMix, label smoothing, AdamW,
cosine per update, bf16-mixed, channels_last) through `Trainer.fit`, our model against timm's
(`backbone='timm.models.mambaout.mambaout_tiny'`, a dotted path, builds timm's model in the same task).
"""

import tempfile
import time

import torch
from common import Row, compare
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader, Dataset

from mambaout_pl.tasks import ClassificationTask


class SyntheticImageNet(Dataset):
    def __init__(self, count: int, image_size: int = 224):
        self.count = count
        self.image = torch.randn(3, image_size, image_size)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": self.image, "label": torch.tensor(index % 1000)}


class StepRate(Callback):
    def __init__(self, warmup: int):
        self.warmup = warmup
        self.start = None
        self.rate = float("nan")

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        if batch_idx == self.warmup:
            torch.cuda.synchronize()
            self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        torch.cuda.synchronize()
        self.rate = (trainer.global_step - self.warmup) / (time.perf_counter() - self.start)


def recipe_step_rate(backbone: str, batch_size: int, steps: int, warmup: int = 5) -> float:
    torch.manual_seed(0)
    task = ClassificationTask(
        backbone=backbone,
        num_classes=1000,
        drop_path_rate=0.2,
        lr=4e-3,
        weight_decay=0.05,
        warmup_epochs=0,
        mixup_alpha=0.8,
        cutmix_alpha=1.0,
        label_smoothing=0.1,
        channels_last=True,
    )
    loader = DataLoader(
        SyntheticImageNet((steps + warmup) * batch_size),
        batch_size=batch_size,
        num_workers=4,
        pin_memory=True,
        drop_last=True,
    )
    rate = StepRate(warmup)
    with tempfile.TemporaryDirectory() as root:
        trainer = Trainer(
            accelerator="gpu",
            devices=1,
            precision="bf16-mixed",
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            callbacks=[rate],
            default_root_dir=root,
        )
        trainer.fit(task, train_dataloaders=loader)
    return rate.rate


def end_to_end_step_rate(device: torch.device, batch_size: int, steps: int, rounds: int = 2) -> Row:
    rates: dict[str, list[float]] = {"ours": [], "reference": []}
    for round_index in range(rounds):
        for name in ("ours", "reference") if round_index % 2 == 0 else ("reference", "ours"):
            backbone = "mambaout_tiny" if name == "ours" else "timm.models.mambaout.mambaout_tiny"
            rates[name].append(recipe_step_rate(backbone, batch_size, steps))
    return compare(f"recipe/imagenet_mambaout_tiny/train/bf16-mixed/b{batch_size}", rates, "steps/s")
