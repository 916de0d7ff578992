"""Data pipeline: the ImageNet train transform through our HF DataModule against torchvision's ImageFolder.

Both read the same folder of ImageNet-sized JPEGs (written here, `class_<k>/<i>.jpg`) with the same
transform object (the DataModule's: RandomResizedCrop 224, flip, RandAugment m9, random erasing)
and one loader worker, so the ratio is that of the pipelines: `datasets` decoding and our sample
maker against `ImageFolder`'s PIL loader. A second measurement trains MambaOut-Femto through
`Trainer.fit` from each loader and reports the share of the step time spent waiting for a batch.
"""

import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from common import Row, compare
from lightning.pytorch import Callback, LightningModule, Trainer
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from mambaout_pl.data import ImageClassificationDataModule
from mambaout_pl.tasks import ClassificationTask

IMAGENET_RECIPE_TRANSFORM = dict(
    image_size=224,
    crop_pct=1.0,
    interpolation="bicubic",
    train_interpolation="random",
    hflip=0.5,
    auto_augment="rand-m9-mstd0.5-inc1",
    re_prob=0.25,
    re_mode="pixel",
    re_count=1,
)


def write_jpeg_folder(folder: Path, count: int, classes: int = 4, seed: int = 0) -> Path:
    """`count` smooth random 500x375 JPEGs (quality 90, ImageNet's typical size) in `train/class_<k>/`,
    and one per class in `validation/class_<k>/`."""
    rng = np.random.default_rng(seed)
    for index in range(count + classes):
        split = "train" if index < count else "validation"
        coarse = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((500, 375), Image.Resampling.BICUBIC)
        noise = rng.normal(0, 12, size=(375, 500, 3))
        image = Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))
        target = folder / split / f"class_{index % classes}"
        target.mkdir(parents=True, exist_ok=True)
        image.save(target / f"{index:05d}.jpg", quality=90)
    return folder


def _loaders(folder: Path, batch_size: int, workers: int) -> dict[str, DataLoader]:
    data = ImageClassificationDataModule(
        path="imagefolder",
        data_dir=str(folder),
        batch_size=batch_size,
        num_workers=workers,
        **IMAGENET_RECIPE_TRANSFORM,
    )
    data.prepare_data()
    data.setup("fit")
    reference = DataLoader(
        ImageFolder(str(folder / "train"), transform=data.train_transform),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
    )
    return {"ours": data.train_dataloader(), "reference": reference}


def _images_per_second(loader: Iterable) -> float:
    start = time.perf_counter()
    images = 0
    for batch in loader:
        images += len(batch["image"] if isinstance(batch, dict) else batch[0])
    return images / (time.perf_counter() - start)


def measure_pipeline(folder: Path, batch_size: int, rounds: int) -> Row:
    loaders = _loaders(folder, batch_size, workers=1)
    rates: dict[str, list[float]] = {"ours": [], "reference": []}
    for round_index in range(rounds + 1):  # the first round warms the file cache
        for name in ("ours", "reference") if round_index % 2 == 0 else ("reference", "ours"):
            rate = _images_per_second(loaders[name])
            if round_index > 0:
                rates[name].append(rate)
    return compare(f"data/imagenet_train_transform/1_worker/b{batch_size}", rates, "img/s/worker")


class DataWait(Callback):
    """Seconds spent between one training step's end and the next one's start (the wait for a batch)."""

    def __init__(self, warmup: int = 2):
        self.warmup = warmup
        self.steps = 0
        self.wait = 0.0
        self.total = 0.0
        self._last_end = None
        self._step_start = 0.0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_end is not None and self.steps >= self.warmup:
            self.wait += now - self._last_end
            self.total += now - self._last_end
        self._step_start = now

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        self.steps += 1
        if self.steps > self.warmup:
            self.total += now - self._step_start
        self._last_end = now

    @property
    def share(self) -> float:
        return self.wait / self.total if self.total else float("nan")


def measure_loader_wait(folder: Path, batch_size: int, steps: int, workers: int) -> Row:
    """Share of training time `Trainer.fit` (MambaOut-Femto, 224², fp32) waits for each loader's batches."""
    shares = {}
    for name, loader in _loaders(folder, batch_size, workers).items():
        torch.manual_seed(0)
        task = ClassificationTask(backbone="mambaout_femto", num_classes=4, lr=1e-3, warmup_epochs=0)
        wait = DataWait()
        with tempfile.TemporaryDirectory() as log_dir:
            trainer = Trainer(
                accelerator="cpu",
                devices=1,
                max_steps=steps,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                limit_val_batches=0,
                num_sanity_val_steps=0,
                callbacks=[wait],
                default_root_dir=log_dir,
            )
            if name == "reference":
                trainer.fit(task, train_dataloaders=_as_dicts(loader))
            else:
                trainer.fit(task, train_dataloaders=loader)
        shares[name] = wait.share
    return Row(
        f"data/loader_wait_share/{workers}_workers/b{batch_size}",
        shares["ours"],
        shares["reference"],
        shares["ours"] / max(shares["reference"], 1e-9),
        "share of step time",
        "lower is better; 0 = the loader never stalls training",
    )


class _as_dicts:
    """ImageFolder's `(images, labels)` batches as the task's `{"image", "label"}` batches."""

    def __init__(self, loader: DataLoader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, labels in self.loader:
            yield {"image": images, "label": labels}


def jpeg_folder(count: int) -> tempfile.TemporaryDirectory:
    """A temporary directory holding `count` generated JPEGs (see `write_jpeg_folder`)."""
    directory = tempfile.TemporaryDirectory(prefix="mambaout-bench-jpegs-")
    write_jpeg_folder(Path(directory.name), count)
    return directory
