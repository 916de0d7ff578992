"""Shared test fixtures. Tests run offline and never touch the user's caches."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

# Set before `datasets` / `huggingface_hub` are imported: they read these once, at import.
_SANDBOX = Path(tempfile.mkdtemp(prefix="mambaout-pl-tests-"))
atexit.register(shutil.rmtree, _SANDBOX, ignore_errors=True)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HOME"] = str(_SANDBOX / "huggingface")
os.environ["HF_DATASETS_CACHE"] = str(_SANDBOX / "huggingface" / "datasets")
os.environ["MAMBAOUT_PL_CACHE"] = str(_SANDBOX / "mambaout_pl")

IMAGE_FOLDER_CLASSES = ("cat", "dog", "fish")
# Each class has one dominant channel (cat red, dog green, fish blue), so the class is learnable
# and can be read back from a batch: argmax of the mean colour == label.
IMAGE_FOLDER_COLOURS = {"cat": (200, 50, 50), "dog": (50, 200, 50), "fish": (50, 50, 200)}
IMAGE_FOLDER_SIZE = (48, 40)  # PIL (width, height)


def write_image_folder(root: Path, train_per_class: int = 8, val_per_class: int = 4, seed: int = 0) -> Path:
    """Write ``root/{train,validation}/{cat,dog,fish}/<class>_<i>.png``: noisy class-coloured RGB."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = IMAGE_FOLDER_SIZE
    for split, count in (("train", train_per_class), ("validation", val_per_class)):
        for name in IMAGE_FOLDER_CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                noise = rng.integers(-40, 41, size=(height, width, 3))
                pixels = np.clip(np.array(IMAGE_FOLDER_COLOURS[name]) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{name}_{index}.png")
    return root


@pytest.fixture
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh image folder (3 classes: 8 train and 4 validation images each, 48x40 RGB PNGs)."""
    return write_image_folder(tmp_path_factory.mktemp("image_folder"))
