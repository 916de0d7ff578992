"""Shared test fixtures. Tests run offline and never touch the user's caches."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

# Set before `datasets` / `huggingface_hub` are imported: they read these once, at import.
_SANDBOX = Path(tempfile.mkdtemp(prefix="mambaout-pl-tests-"))
atexit.register(shutil.rmtree, _SANDBOX, ignore_errors=True)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HOME"] = str(_SANDBOX / "huggingface")
os.environ["HF_DATASETS_CACHE"] = str(_SANDBOX / "huggingface" / "datasets")
os.environ["MAMBAOUT_PL_CACHE"] = str(_SANDBOX / "mambaout_pl")
if "PYTEST_XDIST_WORKER" in os.environ:
    # pytest-xdist runs one worker per CPU: one thread each (and in the processes they start), so
    # the workers do not wait on each other's thread pools.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The multi-process tests first (one worker runs them all, the longest share of the suite), then the other
    slow ones, so that under pytest-xdist the longest runs start early and short tests fill the end."""
    items.sort(
        key=lambda item: (item.get_closest_marker("xdist_group") is None, item.get_closest_marker("slow") is None)
    )


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


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small image folder per test module (3 classes: 2 train and 1 validation image each)."""
    return write_image_folder(tmp_path_factory.mktemp("images"), train_per_class=2, val_per_class=1)


@pytest.fixture(scope="module")
def run(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The version folder of a one-step classification run on ``images`` (its config.yaml and checkpoints)."""
    from helpers import tiny_fit_args

    from mambaout_pl.cli import run_cli

    root = tmp_path_factory.mktemp("fit")
    run_cli(tiny_fit_args(root, images))
    return root / "lightning_logs" / "version_0"


@pytest.fixture
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh image folder (3 classes: 8 train and 4 validation images each, 48x40 RGB PNGs)."""
    return write_image_folder(tmp_path_factory.mktemp("image_folder"))


# Segmentation: a tiny folder in the ADEChallengeData2016 layout. Each image is split into a left
# part of one colour and a right part of another; its label map gives the left part ADE label 1
# ("wall"), the right part label 2 ("building"), and a top band label 0 ("other", ignored with
# reduce_zero_label). The sizes differ, as ADE20K's do.
ADE20K_FOLDER_SIZES = {"training": [(48, 40), (40, 56), (56, 48), (48, 48)], "validation": [(40, 48), (56, 40)]}
ADE20K_FOLDER_COLOURS = ((220, 40, 40), (40, 40, 220))


def ade20k_label_map(width: int, height: int) -> np.ndarray:
    """The label map of a ``width`` x ``height`` image of the ADE20K-layout fixture (raw ADE labels)."""
    labels = np.full((height, width), 1, dtype=np.uint8)
    labels[:, width // 2 :] = 2
    labels[:4] = 0
    return labels


def write_ade20k_folder(root: Path, seed: int = 0) -> Path:
    """Write ``root/images/<split>/ADE_<split>_<i>.jpg`` and ``root/annotations/<split>/ADE_<split>_<i>.png``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, sizes in ADE20K_FOLDER_SIZES.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for index, (width, height) in enumerate(sizes):
            labels = ade20k_label_map(width, height)
            colours = np.array([(128, 128, 128), *ADE20K_FOLDER_COLOURS], dtype=np.int64)[labels]
            noise = rng.integers(-20, 21, size=(height, width, 3))
            pixels = np.clip(colours + noise, 0, 255).astype(np.uint8)
            name = f"ADE_{split}_{index:08d}"
            Image.fromarray(pixels).save(root / "images" / split / f"{name}.jpg", quality=95)
            Image.fromarray(labels, mode="L").save(root / "annotations" / split / f"{name}.png")
    return root


@pytest.fixture
def ade20k_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh ADEChallengeData2016-layout folder: 4 training and 2 validation images of 40-56 px."""
    return write_ade20k_folder(tmp_path_factory.mktemp("ADEChallengeData2016"))


def write_segmentation_parquet(
    path: Path, count: int = 4, size: tuple[int, int] = (32, 24), num_classes: int = 3
) -> Path:
    """A parquet file of ``image`` and ``mask`` columns: vertical stripes of class 0..num_classes-1, 255 in row 0."""
    import io

    import datasets
    from PIL import Image

    width, height = size
    stripes = (np.arange(width) * num_classes // width).astype(np.uint8)
    labels = np.repeat(stripes[None], height, axis=0)
    labels[0] = 255
    rows = {"image": [], "mask": []}
    for index in range(count):
        pixels = np.stack([labels * 60 + index, labels * 30, 200 - labels * 50], axis=-1).astype(np.uint8)
        for column, array in (("image", pixels), ("mask", labels)):
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="PNG")
            rows[column].append({"bytes": buffer.getvalue(), "path": None})
    features = datasets.Features({"image": datasets.Image(), "mask": datasets.Image()})
    datasets.Dataset.from_dict(rows, features=features).to_parquet(path)
    return path


@pytest.fixture
def segmentation_parquet(tmp_path: Path) -> dict[str, str]:
    """``data_files`` of a parquet segmentation dataset: train (4 rows) and validation (2 rows), 3 classes."""
    return {
        "train": str(write_segmentation_parquet(tmp_path / "train.parquet", count=4)),
        "validation": str(write_segmentation_parquet(tmp_path / "validation.parquet", count=2)),
    }


@pytest.fixture
def one_thread():
    """For tiny runs: one thread avoids waiting on thread pools when other jobs share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_process_mesh(tmp_path: Path):
    """A gloo process group of this process alone and its 2-D mesh as ModelParallelStrategy builds it."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    finally:
        dist.destroy_process_group()
