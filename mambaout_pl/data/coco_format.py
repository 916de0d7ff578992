"""Checks of detection annotations against COCO's format, field by field, before anything is trained.

`check_coco_content` reads a loaded ``instances_*.json`` once: the images (unique integer ids, a
file name, positive integer sizes), the categories (unique integer ids) and every annotation (its
id, the image and category it refers to, ``bbox``, ``area``, ``iscrowd`` and ``segmentation``).
`segmentation_problem` is the check of one segmentation, shared with the Hub's and parquet's
objects columns. Every problem names the entry, the field, its value and what the format allows;
boxes of no area or outside their image are the reader's to drop or clip (with a warning), not
errors. Plain loops over dicts: COCO's 860k training annotations take a few seconds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from mambaout_pl.data.errors import AnnotationFormatError, DataError, InvalidLabelError

__all__ = ["AnnotationProblems", "check_coco_content", "segmentation_problem"]

_NUMBERS = (int, float)
_POLYGON = "a list of polygons, each a list [x1, y1, x2, y2, ...] of at least 3 points (6 numbers, an even count)"
_RLE = "an RLE dict {'size': [height, width], 'counts': a string or a list of run lengths}"


class AnnotationProblems:
    """The problems found in one source: the first few in full, the rest counted."""

    def __init__(self, source: str, shown: int = 5) -> None:
        self.source = source
        self.shown = shown
        self.messages: list[str] = []
        self.count = 0
        self.labels_only = True  # every problem is a category outside the categories

    def add(self, where: str, field: str, value: Any, allowed: str, label: bool = False) -> None:
        """Record that ``field`` of ``where`` holds ``value`` where the format allows ``allowed``."""
        self.count += 1
        self.labels_only &= label
        if len(self.messages) < self.shown:
            shown = repr(value)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            self.messages.append(f"{where} has {field} {shown}, which must be {allowed}")

    def add_unknown_category(self, where: str, value: Any, known: list[int]) -> None:
        """Record a ``category_id`` that is none of the file's categories."""
        self.add(where, "category_id", value, "", label=True)
        if len(self.messages) <= self.shown and self.messages[-1].startswith(where):
            self.messages[-1] = f"{where} has category_id {value!r}, which is not among the file's categories {known}"

    def raise_if_any(self) -> None:
        """Raise one error listing the problems (``InvalidLabelError`` when they are all unknown categories)."""
        if not self.count:
            return
        more = f"; and {self.count - len(self.messages)} more" if self.count > len(self.messages) else ""
        error = InvalidLabelError if self.labels_only else AnnotationFormatError
        raise error(
            f"{self.source} does not follow the COCO format ({self.count} problem{'s' if self.count > 1 else ''}): "
            f"{'; '.join(self.messages)}{more}. Fix or remove these entries."
        )


def check_coco_content(content: Mapping[str, Any], source: str) -> None:
    """Raise naming every entry of a COCO instances file that breaks the format (see the module docstring)."""
    for key in ("images", "annotations", "categories"):
        if not isinstance(content, Mapping) or not isinstance(content.get(key), list):
            raise DataError(
                f"{source} has no '{key}' list: give an instances_*.json file with 'images', 'annotations' and "
                "'categories'."
            )
    problems = AnnotationProblems(source)
    images = _check_images(content["images"], problems)
    category_ids = _check_categories(content["categories"], problems)
    _check_annotations(content["annotations"], images, category_ids, problems)
    problems.raise_if_any()


def _check_images(images: list[Any], problems: AnnotationProblems) -> dict[int, dict[str, Any]]:
    """The images by id; records ids that repeat or are not integers, missing file names and bad sizes."""
    by_id: dict[int, dict[str, Any]] = {}
    for position, image in enumerate(images):
        if type(image) is not dict:
            problems.add(f"images[{position}]", "image", image, "a JSON object")
            continue
        image_id = image.get("id")
        where = f"image {image_id!r}" if image_id is not None else f"images[{position}]"
        if type(image_id) is not int:
            problems.add(where, "id", image_id, "an integer")
        elif image_id in by_id:
            problems.add(where, "id", image_id, "unique: two images have this id")
        else:
            by_id[image_id] = image
        file_name = image.get("file_name")
        if type(file_name) is not str or not file_name:
            problems.add(where, "file_name", file_name, "the image's file name in the image folder")
        for side in ("width", "height"):
            size = image.get(side)
            if type(size) is not int or size <= 0:
                problems.add(where, side, size, "a positive integer number of pixels")
    return by_id


def _check_categories(categories: list[Any], problems: AnnotationProblems) -> set[int]:
    """The category ids; records ids that repeat or are not integers, and names that are not strings."""
    ids: set[int] = set()
    for position, category in enumerate(categories):
        if type(category) is not dict:
            problems.add(f"categories[{position}]", "category", category, "a JSON object")
            continue
        category_id = category.get("id")
        where = f"category {category_id!r}" if category_id is not None else f"categories[{position}]"
        if type(category_id) is not int:
            problems.add(where, "id", category_id, "an integer")
        elif category_id in ids:
            problems.add(where, "id", category_id, "unique: two categories have this id")
        else:
            ids.add(category_id)
        if "name" in category and type(category["name"]) is not str:
            problems.add(where, "name", category["name"], "a string")
    return ids


def _check_annotations(
    annotations: list[Any], images: dict[int, dict[str, Any]], category_ids: set[int], problems: AnnotationProblems
) -> None:
    seen: set[int] = set()
    known_categories = sorted(category_ids)
    for position, annotation in enumerate(annotations):
        if type(annotation) is not dict:
            problems.add(f"annotations[{position}]", "annotation", annotation, "a JSON object")
            continue
        annotation_id = annotation.get("id")
        image_id = annotation.get("image_id")
        image = images.get(image_id) if type(image_id) is int else None
        where = f"annotation {annotation_id!r}" if annotation_id is not None else f"annotations[{position}]"
        if image is not None:
            where += f" (image {image_id}, {image.get('file_name')!r})"
        if type(annotation_id) is not int:
            problems.add(where, "id", annotation_id, "an integer")
        elif annotation_id in seen:
            problems.add(where, "id", annotation_id, "unique: two annotations have this id")
        else:
            seen.add(annotation_id)
        if image is None:
            problems.add(where, "image_id", image_id, f"the id of one of the file's {len(images)} images")
        category_id = annotation.get("category_id")
        if type(category_id) is not int or category_id not in category_ids:
            problems.add_unknown_category(where, category_id, known_categories)
        bbox = annotation.get("bbox")
        if not _finite_numbers(bbox) or len(bbox) != 4:
            problems.add(where, "bbox", bbox, "4 finite numbers [x, y, width, height] in pixels")
        elif bbox[2] < 0 or bbox[3] < 0:
            problems.add(where, "bbox", bbox, "[x, y, width, height] with width and height >= 0")
        if "area" in annotation:
            area = annotation["area"]
            if type(area) not in _NUMBERS or not math.isfinite(area) or area < 0:
                problems.add(where, "area", area, "a finite number of pixels >= 0")
        iscrowd = annotation.get("iscrowd", 0)
        if type(iscrowd) not in (int, bool) or iscrowd not in (0, 1):
            problems.add(where, "iscrowd", iscrowd, "0 or 1")
        segmentation = annotation.get("segmentation")
        if segmentation is not None and image is not None:
            allowed = segmentation_problem(segmentation, image.get("height"), image.get("width"))
            if allowed is not None:
                problems.add(where, "segmentation", segmentation, allowed)


def segmentation_problem(segmentation: Any, height: int | None = None, width: int | None = None) -> str | None:
    """What a COCO ``segmentation`` must be, when it is not that; None when it is fine.

    Polygons: a list of lists of an even count (at least 6) of finite numbers; an empty list is no
    mask. RLE: ``size`` ``[height, width]`` of its image (when known) and ``counts`` a string
    (compressed) or a list of run lengths that add up to ``height * width``.
    """
    if type(segmentation) is list:
        for polygon in segmentation:
            if not _finite_numbers(polygon) or len(polygon) < 6 or len(polygon) % 2:
                return _POLYGON
        return None
    if type(segmentation) is not dict:
        return f"{_POLYGON}, or {_RLE}"
    size, counts = segmentation.get("size"), segmentation.get("counts")
    if type(size) is not list or len(size) != 2 or not all(type(side) is int and side > 0 for side in size):
        return f"{_RLE} (its 'size' is {size!r})"
    if height is not None and width is not None and size != [height, width]:
        return f"{_RLE} whose size is its image's, [{height}, {width}] (its 'size' is {size})"
    if type(counts) in (str, bytes):
        return None
    if type(counts) is not list or not all(type(run) is int and run >= 0 for run in counts):
        return f"{_RLE} (its 'counts' is neither)"
    if sum(counts) != size[0] * size[1]:
        return f"{_RLE} whose run lengths add up to height x width = {size[0] * size[1]} (they add up to {sum(counts)})"
    return None


def _finite_numbers(values: Any) -> bool:
    """Whether ``values`` is a list (or tuple) of finite numbers: their sum is finite (in C, one call)."""
    if type(values) not in (list, tuple):
        return False
    try:
        return math.isfinite(sum(values))
    except TypeError:  # an element that is not a number
        return False
