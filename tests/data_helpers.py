"""Helpers of the data tests: small single-process data modules, images as datasets stores them."""

from __future__ import annotations

import io
from pathlib import Path

import datasets
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from mambaout_pl.data import (
    ImageClassificationDataModule,
    SegmentationDataModule,
)

IMAGE_FOLDER_CLASSES = ["cat", "dog", "fish"]  # the classes of the `image_folder` fixture (conftest.py)


MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)


STD = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)


def make_classification_module(tmp_path: Path, **kwargs) -> ImageClassificationDataModule:
    """A data module with small, fast, single-process defaults and a private cache."""
    defaults = dict(image_size=32, batch_size=4, num_workers=0, pin_memory=False, cache_dir=str(tmp_path / "hf_cache"))
    return ImageClassificationDataModule(**{**defaults, **kwargs})


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """Undo ImageNet normalisation: 0..255 pixel values of a [..., 3, H, W] batch."""
    return (images * STD + MEAN) * 255.0


def png_value(image: Image.Image, format: str = "PNG", **save_kwargs) -> dict:
    """An image as ``datasets.Image(decode=False)`` stores it: ``{"bytes", "path"}``."""
    buffer = io.BytesIO()
    image.save(buffer, format=format, **save_kwargs)
    return {"bytes": buffer.getvalue(), "path": None}


def uniform_png(colour, size=(16, 16)) -> dict:
    return png_value(Image.new("RGB", size, tuple(colour)))


def write_parquet(path: Path, rows: list[tuple[dict, int]], label_feature=None) -> Path:
    features = datasets.Features({"image": datasets.Image(), "label": label_feature or datasets.Value("int64")})
    images, labels = zip(*rows)
    datasets.Dataset.from_dict({"image": list(images), "label": list(labels)}, features=features).to_parquet(path)
    return path


def gray_id_rows(ids):
    """Uniform gray images whose gray level 5 * id identifies the row; label id % 3."""
    return [(uniform_png((5 * i,) * 3, size=(16, 16)), i % 3) for i in ids]


def ids_in(batches) -> list[int]:
    gray = to_pixels(torch.cat([batch["image"] for batch in batches])).mean(dim=(1, 2, 3))
    return torch.round(gray / 5).long().tolist()


def make_segmentation_module(tmp_path: Path, **kwargs) -> SegmentationDataModule:
    """A data module with small, single-process defaults and a private cache."""
    defaults = dict(
        crop_size=32,
        resize_scale=(64, 32),
        batch_size=2,
        eval_batch_size=2,
        num_workers=0,
        pin_memory=False,
        cache_dir=str(tmp_path / "hf_cache"),
    )
    return SegmentationDataModule(**{**defaults, **kwargs})
