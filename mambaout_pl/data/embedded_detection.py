"""An embedded detection dataset that needs no network: handwritten digits scattered on scenes, in COCO's layout.

``write_digit_detection`` writes ``annotations/instances_{train2017,val2017}.json`` and
``{train2017,val2017}/`` PNG scenes (COCO 2017's split names, so that the same split settings read
both), so the data goes through the same reader (`mambaout_pl.data.coco.load_coco_split`) as a
real COCO folder. Each 64x64 scene holds 1-3 of scikit-learn's handwritten digits (training scenes
from the first 1497, validation scenes from the last 300), scaled to 16-32 pixels, placed without
overlap and painted in a colour that contrasts with a smooth colour background. A digit's mask
is the pixels its ink covers at least half of (stored as COCO RLE), its box the mask's extent; the
ten categories are the digits, ids 1-10 named "0"-"9". Generated from a seed: the same seed
writes the same files. ``materialize_digit_detection`` writes it once under the embedded-data
cache folder, in a temporary folder renamed into place, so a crash never leaves half a dataset.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

__all__ = ["DIGIT_DETECTION_CATEGORIES", "materialize_digit_detection", "write_digit_detection"]

DIGIT_DETECTION_NAME = "digit_detection"
DIGIT_DETECTION_VERSION = 2
DIGIT_DETECTION_SIZE = 64
DIGIT_DETECTION_COUNTS = {"train2017": 600, "val2017": 150}
DIGIT_DETECTION_CATEGORIES = [{"id": digit + 1, "name": str(digit), "supercategory": "digit"} for digit in range(10)]
# Scenes of each split paste digits from their own part of scikit-learn's digits ("train2017" and
# "train" draw from the training part, "val2017" and "val" from the validation part).
_POOLS = {"train": (0, 1497), "val": (1497, 1797)}


def write_digit_detection(
        folder: str | os.PathLike,
        seed: int = 0,
        counts: dict[str, int] | None = None,
        size: int = DIGIT_DETECTION_SIZE,
) -> Path:
    """Write the dataset (see the module docstring) into ``folder``, which must not exist yet; returns it."""
    from sklearn.datasets import load_digits

    folder = Path(folder)
    digits = load_digits()
    (folder / "annotations").mkdir(parents=True)
    for split_index, (split, count) in enumerate((counts or DIGIT_DETECTION_COUNTS).items()):
        rng = np.random.default_rng([seed, split_index])
        first, last = _POOLS.get(split.rstrip("0123456789"), (0, len(digits.images)))
        (folder / split).mkdir()
        images, annotations = [], []
        for image_id in range(1, count + 1):
            scene, objects = digit_scene(digits.images, digits.target, rng, first, last, size)
            file_name = f"{image_id:06d}.png"
            Image.fromarray(scene, mode="RGB").save(folder / split / file_name)
            images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
            for mask, digit in objects:
                rle = mask_utils.encode(np.asfortranarray(mask))
                annotations.append({
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": digit + 1,
                    "bbox": [float(value) for value in mask_utils.toBbox(rle)],
                    "area": float(mask.sum()),
                    "iscrowd": 0,
                    "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")},
                })
        content = {"images": images, "annotations": annotations, "categories": DIGIT_DETECTION_CATEGORIES}
        (folder / "annotations" / f"instances_{split}.json").write_text(json.dumps(content))
    return folder


def digit_scene(
        images: np.ndarray,
        targets: np.ndarray,
        rng: np.random.Generator,
        first: int,
        last: int,
        size: int,
) -> tuple[np.ndarray, list[tuple[np.ndarray, int]]]:
    """One scene (uint8 ``[size, size, 3]``) and its digits as (uint8 ``[size, size]`` mask, digit) pairs."""
    start, end = rng.uniform(0, 255, size=(2, 3))
    direction = rng.uniform(-1.0, 1.0, size=2)
    rows, columns = np.mgrid[0:size, 0:size] / (size - 1)
    blend = np.clip(0.5 + direction[0] * (rows - 0.5) + direction[1] * (columns - 0.5), 0.0, 1.0)[..., None]
    scene = (1.0 - blend) * start + blend * end + rng.normal(0.0, 6.0, size=(size, size, 3))
    taken = np.zeros((size, size), dtype=bool)
    objects: list[tuple[np.ndarray, int]] = []
    for _ in range(int(rng.integers(1, 4))):
        sample = int(rng.integers(first, last))
        side = int(rng.integers(16, 33))
        for _attempt in range(20):
            top, left = (int(value) for value in rng.integers(0, size - side + 1, size=2))
            if not taken[top:top + side, left:left + side].any():
                break
        else:
            continue  # no free place left for a digit of this size
        glyph = Image.fromarray(np.rint(images[sample] * (255.0 / 16.0)).astype(np.uint8), mode="L")
        ink = np.asarray(glyph.resize((side, side), Image.Resampling.BILINEAR), dtype=np.float64) / 255.0
        background = scene[top:top + side, left:left + side].mean(axis=(0, 1))
        colour = np.where(background > 127.5, rng.uniform(0, 60, size=3), rng.uniform(195, 255, size=3))
        window = scene[top:top + side, left:left + side]
        window[:] = (1.0 - ink[..., None]) * window + ink[..., None] * colour
        mask = np.zeros((size, size), dtype=np.uint8)
        mask[top:top + side, left:left + side] = ink >= 0.5
        taken[top:top + side, left:left + side] = True
        if mask.any():
            objects.append((mask, int(targets[sample])))
    return np.clip(np.rint(scene), 0, 255).astype(np.uint8), objects


def materialize_digit_detection(cache_dir: str | os.PathLike | None = None, **kwargs: Any) -> Path:
    """The dataset's folder under the embedded-data cache folder, written there first if missing.

    Arguments other than ``cache_dir`` go to `write_digit_detection`; a non-default ``seed``,
    ``counts`` or ``size`` gets its own folder.
    """
    from mambaout_pl.data.embedded import cache_root  # embedded.py registers this module's dataset

    suffix = "".join(f"-{key}{value}" for key, value in sorted(kwargs.items()) if key != "counts")
    if kwargs.get("counts"):
        suffix += "-" + "-".join(f"{split}{count}" for split, count in kwargs["counts"].items())
    folder = cache_root(cache_dir) / f"{DIGIT_DETECTION_NAME}-v{DIGIT_DETECTION_VERSION}{suffix}"
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DIGIT_DETECTION_NAME}-", dir=folder.parent))
    try:
        write_digit_detection(staging / "data", **kwargs)
        try:
            (staging / "data").rename(folder)
        except OSError:
            if not folder.is_dir():  # not another process winning the race: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
