"""The ADEChallengeData2016 folder layout, and ADE20K's 150 class names.

A folder in this layout holds ``images/<split>/<name>.<jpg|png|...>`` and, for labelled splits,
``annotations/<split>/<name>.png``: one single-channel label map per image, with the image's file
name stem and size. ADE20K's own splits are ``training`` and ``validation``; the folder
``training`` becomes the split ``"train"``, every other folder keeps its name. An optional
``class_names.txt`` (one name per line, in label order) names the classes of a folder that is not
ADE20K (the embedded ``builtin:digit_scenes`` writes one).

Each split is opened as a ``datasets.Dataset`` with the columns ``image`` and ``mask`` (file paths
as undecoded ``datasets.Image`` values) and ``name`` (the file name stem); a split without an
annotations folder has no ``mask`` column (it can be predicted on, not trained or validated on).
"""

from __future__ import annotations

import os
from pathlib import Path

from datasets import Dataset, DatasetDict, Features, Value
from datasets import Image as ImageFeature

from mambaout_pl.data.errors import DataError, DataNotFoundError, InvalidLabelError

#: ADE20K's classes in label order (label 0, "other", is not one of them: ``reduce_zero_label``).
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper",
    "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow",
    "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair",
    "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole",
    "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship",
    "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel",
    "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket",
    "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen",
    "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
CLASS_NAMES_FILE = "class_names.txt"
# Folder name -> split name, so that the usual `train_split="train"` finds ADE20K's training folder.
_SPLIT_NAMES = {"training": "train"}


def split_folder_name(split: str) -> str:
    """The ``images/`` sub-folder that holds ``split`` (``"train"`` -> ``"training"``)."""
    folders = {split_name: folder for folder, split_name in _SPLIT_NAMES.items()}
    return folders.get(split, split)


def load_ade20k_folder(folder: str | os.PathLike) -> DatasetDict:
    """Every split of a folder in the ADEChallengeData2016 layout (see the module docstring)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataNotFoundError(
            f"data_dir {str(folder)!r} does not exist or is not a folder ({folder.resolve()}). Set `data_dir` "
            "to a folder holding images/{training,validation} and annotations/{training,validation}."
        )
    images_root, annotations_root = folder / "images", folder / "annotations"
    if not images_root.is_dir():
        found = sorted(path.name for path in folder.iterdir())
        raise DataNotFoundError(
            f"No 'images' folder in data_dir {str(folder)!r} (it holds {found}). The ADEChallengeData2016 "
            "layout is images/<split>/<name>.jpg with annotations/<split>/<name>.png; set `data_dir` to the "
            "folder holding images/ and annotations/."
        )
    splits = {}
    for split_folder in sorted(path for path in images_root.iterdir() if path.is_dir()):
        images = {path.stem: path for path in sorted(split_folder.iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES}
        if not images:
            continue
        columns: dict[str, list[str]] = {"image": [str(path) for path in images.values()], "name": list(images)}
        features = {"image": ImageFeature(decode=False), "name": Value("string")}
        mask_folder = annotations_root / split_folder.name
        if mask_folder.is_dir():
            masks = {path.stem: path for path in mask_folder.iterdir() if path.suffix.lower() == ".png"}
            missing = [stem for stem in images if stem not in masks]
            other_formats = sorted(path for path in mask_folder.iterdir() if path.stem in missing)
            if other_formats:
                raise InvalidLabelError(
                    f"Label map {str(other_formats[0])!r} is not a PNG ({len(other_formats)} label maps in "
                    f"{str(mask_folder)!r} are not): label maps must be stored losslessly, and JPEG compression "
                    "changes class indices along every edge. Save them as PNG from the original labels."
                )
            if missing:
                raise DataNotFoundError(
                    f"Image {str(images[missing[0]])!r} has no label map: expected "
                    f"{str(mask_folder / (missing[0] + '.png'))!r} ({len(missing)} of {len(images)} images in "
                    f"{str(split_folder)!r} have none). Add the missing label maps, or move those images out."
                )
            columns["mask"] = [str(masks[stem]) for stem in images]
            features["mask"] = ImageFeature(decode=False)
        split = _SPLIT_NAMES.get(split_folder.name, split_folder.name)
        splits[split] = Dataset.from_dict(columns, features=Features(features))
    if not splits:
        raise DataNotFoundError(
            f"No images in {str(images_root)!r}: expected images/<split>/<name>.jpg (or "
            f"{', '.join(IMAGE_SUFFIXES[1:])}), e.g. images/training and images/validation."
        )
    return DatasetDict(splits)


def read_class_names(folder: str | os.PathLike) -> list[str] | None:
    """The class names in ``folder/class_names.txt`` (one per line), or None without that file."""
    path = Path(folder).expanduser() / CLASS_NAMES_FILE
    if not path.is_file():
        return None
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"{str(path)!r} names no classes: write one class name per line, in label order.")
    return names
