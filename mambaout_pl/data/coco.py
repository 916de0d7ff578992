"""A local COCO folder (``annotations/instances_<split>.json`` + ``<split>/`` images) as a ``datasets.Dataset``.

Each image is one row: ``image`` (its file path, an undecoded ``datasets.Image``), ``image_id``, ``file_name``,
``width``, ``height`` and ``objects``, a list of the image's annotations with ``id``, ``bbox``
(COCO's ``[x, y, width, height]`` in pixels), ``category_id`` (COCO's id), ``area``, ``iscrowd``
and ``segmentation`` (the annotation's polygons or RLE, as a JSON string; ``""`` when absent).
Images without annotations are rows with no objects: they count in evaluation, and training
leaves them out (``skip_empty``).

The reader checks the annotation file before anything is trained: every field against COCO's
format (`coco_format.check_coco_content`: ids, references between images, annotations and
categories, boxes, areas, crowd flags, polygons and RLE masks), then against the image folder
(missing image files raise); boxes with no width or height, or lying wholly outside their image,
are dropped, and boxes reaching past the image border are clipped to it, with one counted warning
per file naming the first. `decode_coco_example` turns a row into tensors for
torchvision's detectors and raises on masks or images whose size differs from the annotation's.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value
from datasets import Image as ImageFeature
from pycocotools import mask as mask_utils
from torchvision import tv_tensors
from torchvision.transforms.v2.functional import pil_to_tensor

from mambaout_pl.data.coco_format import check_coco_content, segmentation_problem
from mambaout_pl.data.errors import AnnotationFormatError, DataError, DataNotFoundError
from mambaout_pl.data.images import read_rgb_image

__all__ = [
    "CocoAnnotationWarning",
    "coco_features",
    "coco_splits",
    "decode_coco_example",
    "decode_segmentation",
    "load_coco_folder",
    "load_coco_split",
]


def coco_features(category_names: list[str]) -> Features:
    """The columns of `load_coco_split`'s rows; ``objects.category`` is the category's index among ``category_names``."""
    return Features(
        {
            "image": ImageFeature(decode=False),
            "image_id": Value("int64"),
            "file_name": Value("string"),
            "width": Value("int32"),
            "height": Value("int32"),
            "objects": List(
                {
                    "id": Value("int64"),
                    "bbox": List(Value("float32"), length=4),
                    "category_id": Value("int64"),
                    "category": ClassLabel(names=category_names),
                    "area": Value("float32"),
                    "iscrowd": Value("int8"),
                    "segmentation": Value("string"),
                }
            ),
        }
    )


class CocoAnnotationWarning(UserWarning):
    """Annotations of a COCO file that were dropped or clipped while reading it."""


def load_coco_split(
    data_dir: str | os.PathLike,
    split: str = "train2017",
    annotation_file: str | os.PathLike | None = None,
    image_dir: str | os.PathLike | None = None,
    skip_empty: bool = False,
) -> tuple[Dataset, list[dict[str, Any]]]:
    """One split of a COCO folder and its categories (``{"id", "name", ...}``, sorted by id).

    Args:
        data_dir: The folder holding ``annotations/`` and the image folders.
        split: The split name: reads ``annotations/instances_<split>.json`` and ``<split>/``.
        annotation_file: Another annotation file (relative to ``data_dir`` or absolute).
        image_dir: Another image folder (relative to ``data_dir`` or absolute).
        skip_empty: Leave out images with no annotation left after the checks (for training).
    """
    data_dir = Path(data_dir).expanduser()
    annotation_path = data_dir / (annotation_file or Path("annotations") / f"instances_{split}.json")
    image_root = data_dir / (image_dir or split)
    if not annotation_path.is_file():
        raise DataNotFoundError(
            f"COCO annotation file {str(annotation_path)!r} does not exist. Set `data_dir` to the folder holding "
            f"annotations/instances_{split}.json and {split}/, or name the file with `annotation_file`."
        )
    if not image_root.is_dir():
        raise DataNotFoundError(
            f"COCO image folder {str(image_root)!r} does not exist. Set `data_dir` to the folder holding {split}/ "
            "next to annotations/, or name the folder with `image_dir`."
        )
    try:
        content = json.loads(annotation_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"Cannot read COCO annotation file {str(annotation_path)!r}: {error}.") from error
    check_coco_content(content, f"COCO annotation file {str(annotation_path)!r}")

    categories = sorted(content["categories"], key=lambda category: category["id"])
    index_of = {category["id"]: index for index, category in enumerate(categories)}
    images = {image["id"]: image for image in content["images"]}
    missing = [image["file_name"] for image in images.values() if not (image_root / image["file_name"]).is_file()]
    if missing:
        raise DataNotFoundError(
            f"{len(missing)} of the {len(images)} images listed in {str(annotation_path)!r} are not in "
            f"{str(image_root)!r}, e.g. {missing[:3]}. Point `data_dir`/`image_dir` at the image folder that "
            "belongs to this annotation file (for instance val2017/ with instances_val2017.json)."
        )

    objects: dict[int, list[dict[str, Any]]] = {image_id: [] for image_id in images}
    dropped, clipped, first = 0, 0, None
    for annotation in content["annotations"]:
        image = images[annotation["image_id"]]
        x, y, w, h = (float(value) for value in annotation["bbox"])
        x1, y1 = max(x, 0.0), max(y, 0.0)
        x2, y2 = min(x + w, float(image["width"])), min(y + h, float(image["height"]))
        if w <= 0 or h <= 0 or x2 <= x1 or y2 <= y1:
            dropped += 1
            first = first or annotation
            continue
        if (x1, y1, x2, y2) != (x, y, x + w, y + h):
            clipped += 1
            first = first or annotation
        segmentation = annotation.get("segmentation")
        objects[image["id"]].append(
            {
                "id": annotation["id"],
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "category_id": annotation["category_id"],
                "category": index_of[annotation["category_id"]],
                "area": float(annotation.get("area", w * h)),
                "iscrowd": int(annotation.get("iscrowd", 0)),
                "segmentation": json.dumps(segmentation) if segmentation else "",
            }
        )
    if dropped or clipped:
        warnings.warn(
            f"{str(annotation_path)!r}: dropped {dropped} boxes with no width or height or lying outside their "
            f"image, and clipped {clipped} boxes reaching past the image border to it (the first: annotation "
            f"{first['id']}, bbox {first['bbox']} in image {first['image_id']} of "
            f"{images[first['image_id']]['width']}x{images[first['image_id']]['height']} pixels). Fix those "
            "annotations to keep them.",
            CocoAnnotationWarning,
            stacklevel=2,
        )

    rows = [image for image in images.values() if objects[image["id"]] or not skip_empty]
    columns = {
        "image": [{"path": str(image_root / image["file_name"]), "bytes": None} for image in rows],
        "image_id": [image["id"] for image in rows],
        "file_name": [str(image["file_name"]) for image in rows],
        "width": [image["width"] for image in rows],
        "height": [image["height"] for image in rows],
        "objects": [objects[image["id"]] for image in rows],
    }
    return Dataset.from_dict(columns, features=coco_features(category_names(categories))), categories


def category_names(categories: list[dict[str, Any]]) -> list[str]:
    """The categories' names in order, a repeated name told apart by its id (``"name (id 7)"``)."""
    names = [str(category.get("name", category["id"])) for category in categories]
    return [
        f"{name} (id {category['id']})" if names.count(name) > 1 else name
        for name, category in zip(names, categories, strict=True)
    ]


def coco_splits(data_dir: str | os.PathLike) -> list[str]:
    """The split names of a COCO folder: ``<split>`` for each ``annotations/instances_<split>.json``."""
    folder = Path(data_dir).expanduser() / "annotations"
    return sorted(path.name[len("instances_") : -len(".json")] for path in folder.glob("instances_*.json"))


def load_coco_folder(data_dir: str | os.PathLike) -> DatasetDict:
    """Every split of a COCO folder (see `coco_splits`), as read by `load_coco_split`."""
    splits = coco_splits(data_dir)
    if not splits:
        folder = Path(data_dir).expanduser()
        raise DataNotFoundError(
            f"{str(folder)!r} is not a COCO folder: it has no annotations/instances_<split>.json file. Set `data_dir` "
            "to the folder holding annotations/instances_train2017.json and train2017/ (and the same for val2017)."
        )
    return DatasetDict({split: load_coco_split(data_dir, split)[0] for split in splits})


def decode_segmentation(segmentation: Any, height: int, width: int, where: str = "") -> np.ndarray:
    """A COCO segmentation (polygons, RLE or uncompressed RLE, or their JSON) as a ``[height, width]`` uint8 mask.

    A value that is not one of these, or an RLE of another size than its image, raises naming ``where``.
    """
    if isinstance(segmentation, str):
        try:
            segmentation = json.loads(segmentation)
        except json.JSONDecodeError as error:
            raise AnnotationFormatError(
                f"The mask of {where} is a string that is not COCO's JSON ({error}): give polygons or an RLE dict."
            ) from error
    if isinstance(segmentation, dict) and isinstance(segmentation.get("size"), (list, tuple)):
        size = list(segmentation["size"])
        if size != [height, width] and len(size) == 2:
            raise DataError(
                f"The mask of {where} is {size[0]}x{size[1]} (RLE 'size', height x width) but its image is "
                f"{height}x{width}. Re-encode the mask at the image size."
            )
        segmentation = {**segmentation, "size": size}
    problem = segmentation_problem(segmentation, height, width)
    if problem is not None:
        shown = repr(segmentation)
        raise AnnotationFormatError(
            f"The mask of {where} is {shown if len(shown) <= 80 else shown[:77] + '...'}, but a COCO segmentation "
            f"must be {problem}."
        )
    if isinstance(segmentation, list):
        rles = mask_utils.frPyObjects(segmentation, height, width)
        return mask_utils.decode(mask_utils.merge(rles))
    if isinstance(segmentation["counts"], list):
        segmentation = mask_utils.frPyObjects(segmentation, height, width)
    return mask_utils.decode(segmentation)


def decode_coco_example(
    example: dict[str, Any],
    label_of: dict[int, int],
    masks: bool = True,
    crowd: bool = False,
) -> tuple[tv_tensors.Image, dict[str, Any]]:
    """One row of `load_coco_split` as a uint8 CHW image and a target for torchvision's detectors.

    Args:
        example: The row.
        label_of: COCO category id -> contiguous label 1..K (`{c["id"]: i + 1 for i, c in enumerate(categories)}`).
        masks: Decode the instance masks (`masks`, uint8 `[N, H, W]`).
        crowd: Keep crowd annotations (`iscrowd` 1) for evaluation; training leaves them out.

    Returns:
        The image and ``{"boxes": BoundingBoxes XYXY, "labels": int64, "iscrowd": int64, "area",
        "image_id", ["masks": Mask]}``.
    """
    path = example["image"]["path"] if isinstance(example["image"], dict) else str(example["image"])
    image = read_rgb_image(example["image"])
    height, width = int(example["height"]), int(example["width"])
    if image.size != (width, height):
        raise DataError(
            f"Image {path!r} is {image.width}x{image.height} (width x height) but its annotation file says "
            f"{width}x{height}. Use the annotation file that belongs to these images."
        )
    objects = [obj for obj in example["objects"] if crowd or not obj["iscrowd"]]
    boxes = torch.tensor([obj["bbox"] for obj in objects], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    target: dict[str, Any] = {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
        "labels": torch.tensor([label_of[obj["category_id"]] for obj in objects], dtype=torch.int64),
        "iscrowd": torch.tensor([obj["iscrowd"] for obj in objects], dtype=torch.int64),
        "area": torch.tensor([obj["area"] for obj in objects], dtype=torch.float32),
        "image_id": int(example["image_id"]),
    }
    if masks:
        decoded = np.zeros((len(objects), height, width), dtype=np.uint8)
        for index, obj in enumerate(objects):
            if obj["segmentation"]:
                where = f"annotation {obj['id']} of image {path!r}"
                decoded[index] = decode_segmentation(obj["segmentation"], height, width, where)
        target["masks"] = tv_tensors.Mask(torch.from_numpy(decoded))
    return tv_tensors.Image(pil_to_tensor(image)), target
