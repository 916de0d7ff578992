"""Embedded quick-start datasets that need no network, reached as ``path="builtin:<name>"``.

Classification datasets (``builtin:digits``) are written once as an image folder
(``train/<class>/<index>.png``) under a cache folder and then read with the same
``datasets.load_dataset("imagefolder", data_dir=...)`` call a user's own image folder goes
through. Only a train split is written: the data module holds out a seeded validation set from it.
Segmentation datasets (``builtin:digit_scenes``, listed in ``SEGMENTATION_DATASETS``) are written in
the ADEChallengeData2016 layout (``images/{training,validation}``, ``annotations/{training,validation}``)
with a ``class_names.txt``, and read by ``SegmentationDataModule`` like a user's own such folder.
Detection datasets (``builtin:digit_detection``, listed in ``DETECTION_DATASETS``) are written as a
COCO folder (``embedded_detection.py``) and read by ``DetectionDataModule`` through the same COCO
reader as a user's own.

The cache folder is ``cache_dir`` when given, else ``$MAMBAOUT_PL_CACHE``, else
``~/.cache/mambaout_pl``; the images go to ``<cache folder>/<name>-v<version>``, so files written
by an older generator are never read. Writing happens in a temporary folder renamed into place, so
a crash never leaves a half-written dataset and two processes (e.g. DDP ranks) racing to write it
are both fine.

To add a dataset, write a function ``(folder: Path) -> None`` that fills ``folder``, register it
in ``BUILTIN_DATASETS`` (and, for a segmentation or detection dataset, in ``SEGMENTATION_DATASETS`` or
``DETECTION_DATASETS``), and bump
its ``BUILTIN_DATASET_VERSIONS`` entry whenever what it writes changes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from mambaout_pl.data.embedded_detection import DIGIT_DETECTION_VERSION, write_digit_detection
from mambaout_pl.training.atomic import staged_folder

BUILTIN_PREFIX = "builtin:"
CACHE_ENV_VARIABLE = "MAMBAOUT_PL_CACHE"

DIGITS_IMAGE_SIZE = 32  # the 8x8 digits are upscaled 4x (nearest) so that crops and strides work

DIGIT_SCENE_SIZE = 48
DIGIT_SCENE_CLASSES = ("background",) + tuple(str(digit) for digit in range(10))
DIGIT_SCENE_COUNTS = {"training": 1200, "validation": 200}
# Scenes of each split paste digits from their own part of scikit-learn's digits, so that the
# validation scenes show handwriting the model never trained on.
_DIGIT_SCENE_POOLS = {"training": (0, 1497), "validation": (1497, 1797)}


def write_digits(folder: Path) -> None:
    """Write scikit-learn's 1797 handwritten digits as 32x32 grayscale PNGs, one folder per digit.

    File ``train/<digit>/<index>.png`` holds ``load_digits().images[index]`` with its 0..16
    values scaled to 0..255 and each pixel repeated 4x4.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    scale = DIGITS_IMAGE_SIZE // digits.images.shape[1]
    for index, (pixels, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        gray = np.rint(pixels * (255.0 / 16.0)).astype(np.uint8)
        gray = np.repeat(np.repeat(gray, scale, axis=0), scale, axis=1)
        class_folder = folder / "train" / str(int(target))
        class_folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(gray, mode="L").save(class_folder / f"{index:04d}.png")


def write_digit_scenes(folder: Path) -> None:
    """Write 48x48 scenes of 1-3 handwritten digits on smooth colour backgrounds, with per-pixel labels.

    ``images/<split>/scene_<index>.png`` is the RGB scene, ``annotations/<split>/scene_<index>.png``
    its 8-bit label map: 0 for background, ``digit + 1`` where a digit's ink covers at least half the
    pixel. The digits are scikit-learn's (training scenes from the first 1497, validation scenes
    from the last 300), scaled to 16-26 pixels and painted in a colour that contrasts with the
    background. Generated from a fixed seed: every run writes the same files.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(0)
    size = DIGIT_SCENE_SIZE
    for split, count in DIGIT_SCENE_COUNTS.items():
        image_folder, mask_folder = folder / "images" / split, folder / "annotations" / split
        image_folder.mkdir(parents=True)
        mask_folder.mkdir(parents=True)
        first, last = _DIGIT_SCENE_POOLS[split]
        for index in range(count):
            scene, labels = _digit_scene(digits.images, digits.target, rng, first, last, size)
            Image.fromarray(scene, mode="RGB").save(image_folder / f"scene_{index:05d}.png")
            Image.fromarray(labels, mode="L").save(mask_folder / f"scene_{index:05d}.png")
    (folder / "class_names.txt").write_text("\n".join(DIGIT_SCENE_CLASSES) + "\n")


def _digit_scene(
    images: np.ndarray, targets: np.ndarray, rng: np.random.Generator, first: int, last: int, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """One scene (uint8 [size, size, 3]) and its label map (uint8 [size, size])."""
    start, end = rng.uniform(0, 255, size=(2, 3))
    direction = rng.uniform(-1.0, 1.0, size=2)
    rows, columns = np.mgrid[0:size, 0:size] / (size - 1)
    blend = np.clip(0.5 + direction[0] * (rows - 0.5) + direction[1] * (columns - 0.5), 0.0, 1.0)[..., None]
    scene = (1.0 - blend) * start + blend * end + rng.normal(0.0, 6.0, size=(size, size, 3))
    labels = np.zeros((size, size), dtype=np.uint8)
    taken = np.zeros((size, size), dtype=bool)
    for _ in range(int(rng.integers(1, 4))):
        sample = int(rng.integers(first, last))
        side = int(rng.integers(16, 27))
        for _attempt in range(10):  # avoid covering more than a quarter of an earlier digit's box
            top, left = (int(value) for value in rng.integers(0, size - side + 1, size=2))
            if taken[top : top + side, left : left + side].mean() < 0.25:
                break
        glyph = Image.fromarray(np.rint(images[sample] * (255.0 / 16.0)).astype(np.uint8), mode="L")
        ink = np.asarray(glyph.resize((side, side), Image.Resampling.BILINEAR), dtype=np.float64) / 255.0
        background = scene[top : top + side, left : left + side].mean(axis=(0, 1))
        colour = np.where(background > 127.5, rng.uniform(0, 60, size=3), rng.uniform(195, 255, size=3))
        window = scene[top : top + side, left : left + side]
        window[:] = (1.0 - ink[..., None]) * window + ink[..., None] * colour
        labels[top : top + side, left : left + side][ink >= 0.5] = int(targets[sample]) + 1
        taken[top : top + side, left : left + side] = True
    return np.clip(np.rint(scene), 0, 255).astype(np.uint8), labels


BUILTIN_DATASETS: dict[str, Callable[[Path], None]] = {
    "digits": write_digits,
    "digit_scenes": write_digit_scenes,
    "digit_detection": write_digit_detection,
}
BUILTIN_DATASET_VERSIONS: dict[str, int] = {
    "digits": 1,
    "digit_scenes": 2,
    "digit_detection": DIGIT_DETECTION_VERSION,
}

#: Embedded datasets written in the ADEChallengeData2016 layout, read by ``SegmentationDataModule``.
SEGMENTATION_DATASETS = frozenset({"digit_scenes"})
#: Embedded datasets written as COCO folders, read by ``DetectionDataModule``.
DETECTION_DATASETS = frozenset({"digit_detection"})


def builtin_name(path: str) -> str:
    """The registry name in ``"builtin:<name>"``; raises listing the known names if unknown."""
    name = path[len(BUILTIN_PREFIX) :] if path.startswith(BUILTIN_PREFIX) else path
    if name not in BUILTIN_DATASETS:
        known = ", ".join(f"'{BUILTIN_PREFIX}{known}'" for known in sorted(BUILTIN_DATASETS))
        raise ValueError(f"Unknown embedded dataset {path!r}. Known embedded datasets: {known}.")
    return name


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder embedded datasets are written under (see the module docstring)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV_VARIABLE):
        return Path(os.environ[CACHE_ENV_VARIABLE]).expanduser()
    return Path.home() / ".cache" / "mambaout_pl"


def materialize(path: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Write the embedded dataset ``path`` (``"builtin:<name>"``) once; return its image folder."""
    name = builtin_name(path)
    folder = cache_root(cache_dir) / f"{name}-v{BUILTIN_DATASET_VERSIONS.get(name, 1)}"
    if folder.is_dir():
        return folder
    with staged_folder(folder) as staging:  # another process writing it meanwhile is fine: theirs is kept
        BUILTIN_DATASETS[name](staging)
    return folder
