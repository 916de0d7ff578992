"""Embedded quick-start datasets that need no network, reached as ``path="builtin:<name>"``.

Each embedded dataset is written once as an image folder (``train/<class>/<index>.png``) under a
cache folder and then read with the same ``datasets.load_dataset("imagefolder", data_dir=...)``
call a user's own image folder goes through. Only a train split is written: the data module
holds out a seeded validation set from it.

The cache folder is ``cache_dir`` when given, else ``$MAMBAOUT_PL_CACHE``, else
``~/.cache/mambaout_pl``; the images go to ``<cache folder>/<name>``. Writing happens in a
temporary folder renamed into place, so a crash never leaves a half-written dataset and two
processes (e.g. DDP ranks) racing to write it are both fine.

To add a dataset, write a function ``(folder: Path) -> None`` that fills ``folder/train`` and
register it in ``BUILTIN_DATASETS``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

BUILTIN_PREFIX = "builtin:"
CACHE_ENV_VARIABLE = "MAMBAOUT_PL_CACHE"

DIGITS_IMAGE_SIZE = 32  # the 8x8 digits are upscaled 4x (nearest) so that crops and strides work


def write_digits(folder: Path) -> None:
    """Write scikit-learn's 1797 handwritten digits as 32x32 grayscale PNGs, one folder per digit.

    File ``train/<digit>/<index>.png`` holds ``load_digits().images[index]`` with its 0..16
    values scaled to 0..255 and each pixel repeated 4x4.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    scale = DIGITS_IMAGE_SIZE // digits.images.shape[1]
    for index, (pixels, target) in enumerate(zip(digits.images, digits.target)):
        gray = np.rint(pixels * (255.0 / 16.0)).astype(np.uint8)
        gray = np.repeat(np.repeat(gray, scale, axis=0), scale, axis=1)
        class_folder = folder / "train" / str(int(target))
        class_folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(gray, mode="L").save(class_folder / f"{index:04d}.png")


BUILTIN_DATASETS: dict[str, Callable[[Path], None]] = {
    "digits": write_digits,
}


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
    folder = cache_root(cache_dir) / name
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    try:
        BUILTIN_DATASETS[name](staging)
        try:
            staging.rename(folder)
        except OSError:
            if not folder.is_dir():  # not another process winning the race: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
