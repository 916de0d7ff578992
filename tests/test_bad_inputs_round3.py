"""A catalogue of bad inputs, third round: COCO annotation files and objects columns, outputs written by two
commands at once, the messages a user meets, detector deployment, `mambaout profile` settings.

Each case asserts on the message (the file, the entry or key, the field and what is allowed) and on
what is left on disk. Everything runs in this process on generated files, except the two tests that
need real processes (two `predict` commands at once, the exit status of a command).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import yaml
from helpers import TINY_BACKBONE, tiny_fit_args
from PIL import Image
from pycocotools import mask as mask_utils

from mambaout_pl.cli import main, run_cli
from mambaout_pl.command_errors import VERBOSE_VARIABLE
from mambaout_pl.data import AnnotationFormatError, CorruptImageError, DataError, InvalidLabelError
from mambaout_pl.data.base import SampleMaker, Samples
from mambaout_pl.data.coco import load_coco_split
from mambaout_pl.data.detection import DetectionDataModule
from mambaout_pl.errors import ExportError, OutputInUseError
from mambaout_pl.export.target import staged_export
from mambaout_pl.training.reservation import StaleReservationWarning, reserve_outputs

ROOT = Path(__file__).parents[1]
RECIPE = ROOT / "recipes" / "quickstart.yaml"


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder``: files by content, folders as such."""
    return {str(p.relative_to(folder)): ("/" if p.is_dir() else p.read_bytes()) for p in sorted(folder.rglob("*"))}


# ---------------------------------------------------------------------------------------------
# COCO annotation files: every field checked against the format before anything is trained

SIZES = {1: ("a.png", 14, 12), 2: ("b.png", 20, 16)}  # image id: (file, width, height)


def coco_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def valid_content() -> dict:
    """Two images, categories 7 and 3, a polygon, a compressed and an uncompressed RLE (a crowd region)."""
    images = [{"id": i, "file_name": name, "width": w, "height": h} for i, (name, w, h) in SIZES.items()]
    crowd = np.zeros((16, 20), np.uint8)
    crowd[:3, :3] = 1
    annotations = [
        {
            "id": 1,
            "image_id": 1,
            "category_id": 3,
            "bbox": [2.0, 3.0, 8.0, 5.0],
            "area": 40.0,
            "iscrowd": 0,
            "segmentation": [[2, 3, 10, 3, 10, 8, 2, 8]],
        },
        {
            "id": 2,
            "image_id": 2,
            "category_id": 7,
            "bbox": [5.0, 5.0, 6.0, 6.0],
            "area": 36.0,
            "iscrowd": 0,
            "segmentation": coco_rle(np.pad(np.ones((6, 6), np.uint8), ((5, 5), (5, 9)))),
        },
        {
            "id": 3,
            "image_id": 2,
            "category_id": 3,
            "bbox": [0.0, 0.0, 3.0, 3.0],
            "area": 9.0,
            "iscrowd": 1,
            "segmentation": {"size": [16, 20], "counts": [0, 3, 13, 3, 13, 3, 285]},
        },
    ]
    categories = [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_coco(root: Path, content: dict) -> Path:
    (root / "val").mkdir(parents=True)
    (root / "annotations").mkdir()
    for name, width, height in SIZES.values():
        Image.new("RGB", (width, height), (90, 120, 150)).save(root / "val" / name)
    path = root / "annotations" / "instances_val.json"
    path.write_text(json.dumps(content))
    return path


def annotation(content: dict, position: int) -> dict:
    return content["annotations"][position]


def drop(mapping: dict, key: str) -> None:
    del mapping[key]


# (id, edit of the valid content, error, pattern: the entry, the field, its value and what is allowed)
COCO_CASES: list[tuple[str, Callable[[dict], object], type[Exception], str]] = [
    (
        "bbox missing",
        lambda c: drop(annotation(c, 0), "bbox"),
        AnnotationFormatError,
        r"annotation 1 \(image 1, 'a\.png'\) has bbox None, which must be 4 finite numbers \[x, y, width, height\]",
    ),
    (
        "bbox of 3 numbers",
        lambda c: annotation(c, 0).update(bbox=[2.0, 3.0, 8.0]),
        AnnotationFormatError,
        r"annotation 1 .* has bbox \[2\.0, 3\.0, 8\.0\], which must be 4 finite numbers",
    ),
    (
        "bbox not a number",
        lambda c: annotation(c, 1).update(bbox=[5, 5, "6", 6]),
        AnnotationFormatError,
        r"annotation 2 \(image 2, 'b\.png'\) has bbox \[5, 5, '6', 6\], which must be 4 finite numbers",
    ),
    (
        "bbox NaN",
        lambda c: annotation(c, 1).update(bbox=[5.0, math.nan, 6.0, 6.0]),
        AnnotationFormatError,
        r"annotation 2 .* has bbox \[5\.0, nan, 6\.0, 6\.0\], which must be 4 finite numbers",
    ),
    (
        "bbox negative width",
        lambda c: annotation(c, 0).update(bbox=[10.0, 3.0, -8.0, 5.0]),
        AnnotationFormatError,
        r"annotation 1 .* has bbox \[10\.0, 3\.0, -8\.0, 5\.0\], which must be .*width and height >= 0",
    ),
    (
        "image_id of no image",
        lambda c: annotation(c, 0).update(image_id=99),
        AnnotationFormatError,
        r"annotation 1 has image_id 99, which must be the id of one of the file's 2 images",
    ),
    (
        "category_id of no category",
        lambda c: annotation(c, 2).update(category_id=5),
        InvalidLabelError,
        r"annotation 3 \(image 2, 'b\.png'\) has category_id 5, which is not among the file's categories \[3, 7\]",
    ),
    (
        "category ids repeated",
        lambda c: c["categories"].append({"id": 7, "name": "another seven"}),
        AnnotationFormatError,
        r"category 7 has id 7, which must be unique: two categories have this id",
    ),
    (
        "image ids repeated",
        lambda c: c["images"].append({"id": 2, "file_name": "a.png", "width": 14, "height": 12}),
        AnnotationFormatError,
        r"image 2 has id 2, which must be unique: two images have this id",
    ),
    (
        "annotation ids repeated",
        lambda c: annotation(c, 2).update(id=2),
        AnnotationFormatError,
        r"annotation 2 \(image 2, 'b\.png'\) has id 2, which must be unique",
    ),
    (
        "annotation without id",
        lambda c: drop(annotation(c, 1), "id"),
        AnnotationFormatError,
        r"annotations\[1\] \(image 2, 'b\.png'\) has id None, which must be an integer",
    ),
    (
        "annotation not an object",
        lambda c: c["annotations"].append([1, 2, 3]),
        AnnotationFormatError,
        r"annotations\[3\] has annotation \[1, 2, 3\], which must be a JSON object",
    ),
    (
        "image without width",
        lambda c: drop(c["images"][0], "width"),
        AnnotationFormatError,
        r"image 1 has width None, which must be a positive integer number of pixels",
    ),
    (
        "image height zero",
        lambda c: c["images"][1].update(height=0),
        AnnotationFormatError,
        r"image 2 has height 0, which must be a positive integer number of pixels",
    ),
    (
        "image without file name",
        lambda c: drop(c["images"][1], "file_name"),
        AnnotationFormatError,
        r"image 2 has file_name None, which must be the image's file name",
    ),
    (
        "polygon of odd length",
        lambda c: annotation(c, 0).update(segmentation=[[2, 3, 10, 3, 10, 8, 2]]),
        AnnotationFormatError,
        r"annotation 1 .* has segmentation \[\[2, 3, 10, 3, 10, 8, 2\]\], which must be a list of polygons, .*"
        r"at least 3 points \(6 numbers, an even count\)",
    ),
    (
        "polygon of two points",  # pycocotools would read 4 numbers as a box
        lambda c: annotation(c, 0).update(segmentation=[[2, 3, 10, 8]]),
        AnnotationFormatError,
        r"annotation 1 .* has segmentation \[\[2, 3, 10, 8\]\], which must be a list of polygons",
    ),
    (
        "polygon not nested",  # pycocotools: TypeError
        lambda c: annotation(c, 0).update(segmentation=[2, 3, 10, 3, 10, 8, 2, 8]),
        AnnotationFormatError,
        r"annotation 1 .* has segmentation \[2, 3, 10, 3, 10, 8, 2, 8\], which must be a list of polygons",
    ),
    (
        "segmentation a string",  # the reader would fail with a JSONDecodeError when decoding
        lambda c: annotation(c, 0).update(segmentation="polygon"),
        AnnotationFormatError,
        r"annotation 1 .* has segmentation 'polygon', which must be a list of polygons.*, or an RLE dict",
    ),
    (
        "RLE of another size",
        lambda c: annotation(c, 1).update(segmentation=coco_rle(np.zeros((12, 20), np.uint8))),
        AnnotationFormatError,
        r"annotation 2 \(image 2, 'b\.png'\) has segmentation .*whose size is its image's, \[16, 20\] "
        r"\(its 'size' is \[12, 20\]\)",
    ),
    (
        "RLE counts a number",
        lambda c: annotation(c, 1).update(segmentation={"size": [16, 20], "counts": 42}),
        AnnotationFormatError,
        r"annotation 2 .* has segmentation \{'size': \[16, 20\], 'counts': 42\}, .*its 'counts' is neither",
    ),
    (
        "uncompressed RLE of the wrong length",
        lambda c: annotation(c, 2).update(segmentation={"size": [16, 20], "counts": [0, 3, 13]}),
        AnnotationFormatError,
        r"annotation 3 .* whose run lengths add up to height x width = 320 \(they add up to 16\)",
    ),
    (
        "iscrowd 2",
        lambda c: annotation(c, 0).update(iscrowd=2),
        AnnotationFormatError,
        r"annotation 1 .* has iscrowd 2, which must be 0 or 1",
    ),
    (
        "negative area",
        lambda c: annotation(c, 0).update(area=-40.0),
        AnnotationFormatError,
        r"annotation 1 .* has area -40\.0, which must be a finite number of pixels >= 0",
    ),
    (
        "no annotations list",
        lambda c: drop(c, "annotations"),
        DataError,
        r"has no 'annotations' list: give an instances_\*\.json file",
    ),
    (
        "many problems at once",
        lambda c: [a.update(bbox=None, iscrowd=5) for a in c["annotations"]],
        AnnotationFormatError,
        r"\(6 problems\): annotation 1 .* has bbox None.*; annotation 1 .* has iscrowd 5.*; and 1 more\.",
    ),
]


@pytest.mark.parametrize(
    ("edit", "error", "pattern"), [case[1:] for case in COCO_CASES], ids=[case[0] for case in COCO_CASES]
)
def test_a_coco_file_that_breaks_the_format_is_refused_naming_the_entry_and_field(
    edit: Callable[[dict], object], error: type[Exception], pattern: str, tmp_path: Path
) -> None:
    content = valid_content()
    edit(content)
    path = write_coco(tmp_path / "coco", content)
    before = snapshot(tmp_path)
    with pytest.raises(error) as raised:
        load_coco_split(tmp_path / "coco", "val")
    message = str(raised.value)
    assert message.startswith(f"COCO annotation file '{path}'"), message
    assert re.search(pattern, message), message
    assert snapshot(tmp_path) == before  # reading writes nothing


def test_the_valid_coco_file_of_the_catalogue_reads_whole(tmp_path: Path) -> None:
    """The cases above differ from this file by one edit each: it reads, every mask decodes to its area."""
    write_coco(tmp_path / "coco", valid_content())
    dataset, categories = load_coco_split(tmp_path / "coco", "val")
    objects = [obj for row in dataset for obj in row["objects"]]
    assert [c["id"] for c in categories] == [3, 7] and [obj["id"] for obj in objects] == [1, 2, 3]
    for obj, (_, width, height) in zip(objects, (SIZES[1], SIZES[2], SIZES[2]), strict=True):
        segmentation = json.loads(obj["segmentation"])
        if isinstance(segmentation, list):
            mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width)))
        elif isinstance(segmentation["counts"], list):
            mask = mask_utils.decode(mask_utils.frPyObjects(segmentation, height, width))
        else:
            mask = mask_utils.decode(segmentation)
        assert mask.sum() == obj["area"], obj["id"]


def test_boxes_outside_the_image_are_dropped_with_a_warning_naming_the_first(tmp_path: Path) -> None:
    content = valid_content()
    annotation(content, 0).update(bbox=[30.0, 1.0, 4.0, 4.0])  # right of the 14-pixel-wide image
    path = write_coco(tmp_path / "coco", content)
    with pytest.warns(
        UserWarning,
        match=r"dropped 1 boxes .*\(the first: annotation 1, bbox \[30\.0, 1\.0, 4\.0, 4\.0\] in image 1 of 14x12",
    ):
        dataset, _ = load_coco_split(tmp_path / "coco", "val")
    assert [len(row["objects"]) for row in dataset] == [0, 2]
    assert json.loads(path.read_text()) == content


# ---------------------------------------------------------------------------------------------
# Hub and parquet objects columns: the same checks, naming the row and the object

WIDTH, HEIGHT = 20, 16


def objects_parquet(folder: Path, edit: Callable[[dict], None] | None = None) -> dict[str, str]:
    """train and validation parquet files of two 20x16 images with Hub-style objects (a dict of lists), sizes given."""
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "width": datasets.Value("int32"),
            "height": datasets.Value("int32"),
            "objects": datasets.Sequence(
                {
                    "bbox": datasets.Sequence(datasets.Value("float32")),
                    "category": datasets.ClassLabel(names=["dog", "cat"]),
                    "area": datasets.Value("float32"),
                    "iscrowd": datasets.Value("int8"),
                    "segmentation": datasets.Value("string"),
                }
            ),
        }
    )
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split in ("train", "validation"):
        rows = {
            "image": [Image.new("RGB", (WIDTH, HEIGHT), (40 * i, 90, 30)) for i in range(2)],
            "width": [WIDTH, WIDTH],
            "height": [HEIGHT, HEIGHT],
            "objects": [
                {
                    "bbox": [[2.0, 3.0, 8.0, 5.0], [10.0, 2.0, 6.0, 6.0]],
                    "category": [0, 1],
                    "area": [40.0, 36.0],
                    "iscrowd": [0, 0],
                    "segmentation": [
                        json.dumps([[2, 3, 10, 3, 10, 8, 2, 8]]),
                        json.dumps([[10, 2, 16, 2, 16, 8, 10, 8]]),
                    ],
                }
                for _ in range(2)
            ],
        }
        if edit is not None and split == "train":
            edit(rows)
        files[split] = str(folder / f"{split}.parquet")
        datasets.Dataset.from_dict(rows, features=features).to_parquet(files[split])
    return files


def second_object(rows: dict, key: str, value) -> None:
    rows["objects"][1][key][1] = value


OBJECTS_CASES: list[tuple[str, Callable[[dict], None], str]] = [
    (
        "box not finite",
        lambda rows: second_object(rows, "bbox", [10.0, math.inf, 6.0, 6.0]),
        r"Row 1, object 1 of split 'train' .* has objects\.bbox \[10\.0, inf, 6\.0, 6\.0\], which must be 4 finite",
    ),
    (
        "box of 3 numbers",
        lambda rows: second_object(rows, "bbox", [10.0, 2.0, 6.0]),
        r"Row 1, object 1 of split 'train' .* has 3 numbers in objects\.bbox, which must have 4",
    ),
    (
        "negative width",
        lambda rows: second_object(rows, "bbox", [10.0, 2.0, -6.0, 6.0]),
        r"Row 1, object 1 .* objects\.bbox \[10\.0, 2\.0, -6\.0, 6\.0\], which must be \[x, y, width, height\] with "
        r"width and height >= 0 \(for \[x1, y1, x2, y2\] boxes set box_format='xyxy'\)",
    ),
    (
        "crowd flag 3",
        lambda rows: second_object(rows, "iscrowd", 3),
        r"Row 1, object 1 .* has objects\.iscrowd 3\.0, which must be 0 or 1",
    ),
    (
        "negative area",
        lambda rows: second_object(rows, "area", -1.0),
        r"Row 1, object 1 .* has objects\.area -1\.0, which must be a finite number of pixels >= 0",
    ),
    (
        "polygon of odd length",
        lambda rows: second_object(rows, "segmentation", json.dumps([[10, 2, 16, 2, 16]])),
        r"The masks \(objects\.segmentation\) of split 'train' .*: row 1, object 1 has mask \[\[10, 2, 16, 2, 16\]\], "
        r"which must be a list of polygons",
    ),
    (
        "mask not JSON",
        lambda rows: second_object(rows, "segmentation", "[[10, 2,"),
        r"row 1, object 1 has mask '\[\[10, 2,', which must be COCO's polygons or RLE as JSON",
    ),
    (
        "RLE of another size",
        lambda rows: second_object(rows, "segmentation", json.dumps(coco_rle(np.zeros((HEIGHT, WIDTH + 4), np.uint8)))),
        r"row 1, object 1 has mask .*whose size is its image's, \[16, 20\] \(its 'size' is \[16, 24\]\)",
    ),
]


@pytest.mark.parametrize(("edit", "pattern"), [case[1:] for case in OBJECTS_CASES], ids=[c[0] for c in OBJECTS_CASES])
def test_an_objects_column_that_breaks_the_format_is_refused_naming_the_row_and_object(
    edit: Callable[[dict], None], pattern: str, tmp_path: Path
) -> None:
    files = objects_parquet(tmp_path / "parquet", edit)
    data = DetectionDataModule(
        path="parquet",
        data_files=files,
        train_split="train",
        val_split="validation",
        batch_size=2,
        num_workers=0,
        min_size=HEIGHT,
        max_size=100,
        hflip=0.0,
        cache_dir=str(tmp_path / "cache"),
    )
    with pytest.raises(AnnotationFormatError) as raised:
        data.setup("fit")
    assert re.search(pattern, str(raised.value)), str(raised.value)
    assert "parquet" in str(raised.value)  # the source is named


def test_the_valid_objects_column_of_the_catalogue_trains(tmp_path: Path) -> None:
    data = DetectionDataModule(
        path="parquet",
        data_files=objects_parquet(tmp_path / "parquet"),
        train_split="train",
        val_split="validation",
        batch_size=2,
        num_workers=0,
        min_size=HEIGHT,
        max_size=100,
        hflip=0.0,
        cache_dir=str(tmp_path / "cache"),
    )
    data.setup("fit")
    (batch,) = list(data.train_dataloader())
    assert [target["masks"].sum().item() for target in batch["targets"]] == [40 + 36, 40 + 36]


# ---------------------------------------------------------------------------------------------
# messages users meet: `error: <message>` as the last line of stderr, exit status 2, no traceback


def recipe(folder: Path, edit: Callable[[dict], None]) -> Path:
    content = yaml.safe_load(RECIPE.read_text())
    edit(content)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def invalid_yaml(folder: Path) -> Path:
    path = folder / "broken.yaml"
    path.write_text(RECIPE.read_text().replace("  max_epochs: 12", "  max_epochs: 12\n   devices: [1"))
    return path


def other_task_checkpoint(run: Path, folder: Path, task: str) -> Path:
    """A copy of the run's checkpoint that records another task class (what a checkpoint of that task records)."""
    content = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    content["mambaout_pl"]["task"] = task
    content["hyper_parameters"]["_class_path"] = task
    path = folder / "other_task.ckpt"
    torch.save(content, path)
    return path


def fit(root: Path, images: Path, *extra: str) -> list[str]:
    return tiny_fit_args(root, images, *extra)


Builder = Callable[[Path, Path, Path, Path], list[str]]
# (id, arguments from (root, image folder, scratch folder, run folder), the last line of stderr)
MESSAGE_CASES: list[tuple[str, Builder, str]] = [
    (
        "unknown key in a recipe",
        lambda r, i, s, run: [
            "fit",
            f"--config={recipe(s, lambda c: c['model']['init_args'].update(learning_rate=0.1))}",
            f"--trainer.default_root_dir={r}",
        ],
        r"error: Unknown key 'model\.learning_rate' in recipe '.*recipe\.yaml': mambaout_pl\.tasks\.ClassificationTask "
        r"has no argument 'learning_rate'\. `mambaout fit --help` lists every key\.",
    ),
    (
        "misspelt trainer key in a recipe",
        lambda r, i, s, run: [
            "fit",
            f"--config={recipe(s, lambda c: c['trainer'].update(max_epoch=3))}",
            f"--trainer.default_root_dir={r}",
        ],
        r"error: Unknown key 'trainer\.max_epoch' in recipe '.*recipe\.yaml' \(did you mean 'trainer\.max_epochs'\?\)",
    ),
    (
        "misspelt data key on the command line",
        lambda r, i, s, run: fit(r, i, "--data.batch_sise=3"),
        r"error: Unknown key 'data\.batch_sise' on the command line \(--data\.batch_sise=3\): "
        r"mambaout_pl\.data\.ImageClassificationDataModule has no argument 'batch_sise' \(did you mean 'batch_size'\?\)",
    ),
    (
        "value of another type",
        lambda r, i, s, run: fit(r, i, "--trainer.precision=99"),
        r"error: Invalid value '99' for 'trainer\.precision' on the command line \(--trainer\.precision=99\): it must "
        r"be one of 64, 32, 16, .*'bf16-mixed'.* or null\.",
    ),
    (
        "invalid recipe YAML",
        lambda r, i, s, run: ["fit", f"--config={invalid_yaml(s)}", f"--trainer.default_root_dir={r}"],
        r"error: Recipe '.*broken\.yaml' is not valid YAML at line \d+, column \d+: .*\. Fix the file\.",
    ),
    (
        "a value a constructor refuses",
        lambda r, i, s, run: fit(r, i, "--model.nonfinite_loss=ignore"),
        r"^error: nonfinite_loss='ignore' is not one of \['raise', 'skip'\]",
    ),
    (
        "data folder missing (DataError)",
        lambda r, i, s, run: fit(r, s / "no_such_folder"),
        r"error: .*no_such_folder.* does not exist",
    ),
    (
        "split missing (SplitNotFoundError)",
        lambda r, i, s, run: fit(r, i, "--data.val_split=valid", "--data.val_fraction=0"),
        r"error: .*split 'valid' does not exist.*'validation'",
    ),
    (
        "resume a checkpoint of another task (CheckpointMismatchError)",
        lambda r, i, s, run: fit(
            r, i, f"--ckpt_path={other_task_checkpoint(run, s, 'mambaout_pl.tasks.segmentation.SegmentationTask')}"
        ),
        r"error: .*other_task\.ckpt' was written by mambaout_pl\.tasks\.segmentation\.SegmentationTask",
    ),
    (
        "validate a checkpoint of another task",
        lambda r, i, s, run: [
            "validate",
            *fit(r, i)[1:],
            f"--ckpt_path={other_task_checkpoint(run, s, 'mambaout_pl.tasks.detection.InstanceSegmentationTask')}",
        ],
        r"error: '.*other_task\.ckpt' is a checkpoint of mambaout_pl\.tasks\.detection\.InstanceSegmentationTask, but "
        r"'.*quickstart\.yaml' sets up mambaout_pl\.tasks\.ClassificationTask: a network of another task.*Give the "
        r"recipe that trained it, or a checkpoint of mambaout_pl\.tasks\.ClassificationTask\.",
    ),
    (
        "checkpoint naming a class outside the allow-list (UntrustedNameError)",
        lambda r, i, s, run: ["validate", *fit(r, i)[1:], f"--ckpt_path={other_task_checkpoint(run, s, 'os.system')}"],
        r"error: .*'os\.system'.*other_task\.ckpt",
    ),
    (
        "checkpoint path missing",
        lambda r, i, s, run: ["validate", *fit(r, i)[1:], f"--ckpt_path={s / 'gone.ckpt'}"],
        r"error: --ckpt_path '.*gone\.ckpt' does not exist\. Give the path of a checkpoint file",
    ),
]


@pytest.mark.parametrize(("build", "pattern"), [case[1:] for case in MESSAGE_CASES], ids=[c[0] for c in MESSAGE_CASES])
def test_a_users_mistake_ends_with_one_error_line(
    build: Builder, pattern: str, images: Path, run: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.delenv(VERBOSE_VARIABLE, raising=False)
    root, scratch = tmp_path / "runs", tmp_path / "scratch"
    scratch.mkdir()
    args = build(root, images, scratch, run)
    with pytest.raises(SystemExit) as raised:
        main(args)
    assert raised.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert re.search(pattern, lines[-1]), lines[-3:]
    assert "Traceback" not in err and "usage:" not in err and "Given value" not in err, err[-2000:]
    assert not root.exists() or not list(root.rglob("*.ckpt"))  # stopped before training or evaluating


def test_verbose_shows_the_traceback_above_the_error_line(images: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv(VERBOSE_VARIABLE, "1")
    with pytest.raises(SystemExit):
        main(fit(tmp_path / "runs", tmp_path / "no_such_folder"))
    lines = capsys.readouterr().err.strip().splitlines()
    assert "Traceback (most recent call last):" in lines
    assert lines[-1].startswith("error: ") and "no_such_folder" in lines[-1]


@pytest.mark.slow
def test_a_data_error_exits_the_process_with_status_2_and_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mambaout_pl", *tiny_fit_args(tmp_path / "runs", tmp_path / "no_such_folder")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "no_such_folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_logger_false_trains_without_the_learning_rate_monitor(images: Path, tmp_path: Path) -> None:
    cli = run_cli(tiny_fit_args(tmp_path, images, "--trainer.logger=false"))
    assert cli.trainer.global_step == 1 and not cli.trainer.loggers
    assert not [callback for callback in cli.trainer.callbacks if type(callback).__name__ == "LearningRateMonitor"]
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_skip_corrupt_with_no_readable_image_names_a_file_and_the_real_count(tmp_path: Path) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    paths = [folder / f"{index:02d}.png" for index in range(12)]
    for path in paths:
        path.write_bytes(b"\x89PNG truncated")
    dataset = datasets.Dataset.from_dict(
        {"image": [{"path": str(path), "bytes": None} for path in paths]},
        features=datasets.Features({"image": datasets.Image(decode=False)}),
    )
    from multiprocessing import Value

    from mambaout_pl.data.images import read_rgb_image

    samples = Samples(
        dataset, SampleMaker(lambda row, index: read_rgb_image(row["image"]), "validation", True, Value("i", 0))
    )
    with pytest.warns(UserWarning), pytest.raises(CorruptImageError) as raised:
        samples[3]
    message = str(raised.value)
    assert "none of the 12 images of split 'validation' can be decoded" in message and "consecutive" not in message
    assert "02.png" in message  # the last one tried: rows 3..11, then 0, 1, 2


# ---------------------------------------------------------------------------------------------
# outputs two commands would write at once: reserved while a command runs


def predict_args(run: Path, images: Path, folder: Path, *extra: str) -> list[str]:
    return [
        "predict",
        f"--config={run / 'config.yaml'}",
        f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
        f"--data.predict_images={images / 'validation'}",
        f"--model.predict_dir={folder}",
        f"--trainer.default_root_dir={folder.parent}",
        *extra,
    ]


def test_predicting_into_a_reserved_folder_is_refused_naming_the_file_and_the_command(
    images: Path, run: Path, tmp_path: Path, capsys
) -> None:
    folder = tmp_path / "predictions"
    with reserve_outputs(folder / ".predict.lock", folder / "predictions.csv", "set `model.predict_dir` elsewhere"):
        before = snapshot(folder)
        with pytest.raises(SystemExit) as raised:
            main(predict_args(run, images, folder))
        assert raised.value.code == 2 and isinstance(raised.value.__context__, OutputInUseError)
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert (
            f"error: '{folder / 'predictions.csv'}' is reserved by another command that is running now: PID {os.getpid()}"
            in last
        )
        assert (
            f"(its reservation: '{folder / '.predict.lock'}'). Wait for it to finish, or set `model.predict_dir`"
            in last
        )
        assert snapshot(folder) == before  # the other command's lock alone: nothing written
    assert list(folder.iterdir()) == []  # released


def test_a_reservation_left_by_a_dead_command_is_taken_over_with_a_note(
    images: Path, run: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "predictions"
    folder.mkdir()
    record = {"pid": 999999, "host": "node7", "started": "2026-01-01 00:00:00", "command": "mambaout predict (killed)"}
    (folder / ".predict.lock").write_text(json.dumps(record))  # no process holds it
    with pytest.warns(
        StaleReservationWarning, match=r"of PID 999999 on node7.*`mambaout predict \(killed\)`.*no longer"
    ):
        main(predict_args(run, images, folder))
    assert sorted(p.name for p in folder.iterdir()) == ["predictions.csv"]
    with (folder / "predictions.csv").open() as file:
        assert len(list(csv.DictReader(file))) == 3  # the 3 validation images


def test_a_failed_predict_leaves_no_predictions_file(images: Path, run: Path, tmp_path: Path) -> None:
    inputs = Path(shutil.copytree(images / "validation", tmp_path / "inputs" / "validation"))
    (inputs / "fish" / "fish_0.png").write_bytes(b"\x89PNG truncated")  # the last one read
    folder = tmp_path / "predictions"
    with pytest.raises(SystemExit):
        main(predict_args(run, inputs.parent, folder, "--data.eval_batch_size=1"))
    assert not folder.exists() or list(folder.iterdir()) == []  # no header-only file, no partial file, no lock


def test_a_second_concurrent_export_is_refused_and_the_first_kept(run: Path, tmp_path: Path, capsys) -> None:
    target = tmp_path / "export"
    with staged_export(target, overwrite=False) as staging:  # an export under way
        (staging / "model.safetensors").write_bytes(b"first")
        assert main(["export", str(run / "checkpoints" / "last.ckpt"), str(target)]) == 2
        message = capsys.readouterr().err
        assert f"'{target}' is reserved by another command that is running now: PID {os.getpid()}" in message
        assert "give another output folder" in message
    assert (target / "model.safetensors").read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no staging folder, no lock left


@pytest.mark.slow
@pytest.mark.xdist_group("processes")
def test_two_predict_processes_into_one_folder_the_second_refuses(images: Path, run: Path, tmp_path: Path) -> None:
    folder, marker, release = tmp_path / "predictions", tmp_path / "first_is_predicting", tmp_path / "release"
    hold = tmp_path / "hold.yaml"
    callback = {
        "class_path": "fault_injection.HoldPrediction",
        "init_args": {"marker": str(marker), "release": str(release)},
    }
    hold.write_text(yaml.safe_dump({"trainer": {"callbacks": [callback]}}))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "mambaout_pl", *predict_args(run, images, folder)]
    first = subprocess.Popen([*command, f"--config={hold}"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), first.communicate()[1][-3000:]
        second = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    finally:
        release.write_text("go")
    first_err = first.communicate(timeout=300)[1]
    assert first.returncode == 0, first_err[-3000:]
    assert second.returncode == 2, second.stderr[-3000:]
    last = second.stderr.strip().splitlines()[-1]
    assert (
        f"error: '{folder / 'predictions.csv'}' is reserved by another command that is running now: PID {first.pid}"
        in last
    )
    assert f"--config={hold}" in last  # the first one's command line
    assert sorted(p.name for p in folder.iterdir()) == ["predictions.csv"]
    with (folder / "predictions.csv").open() as file:
        assert [row["index"] for row in csv.DictReader(file)] == ["0", "1", "2"]  # the first command's, whole


# ---------------------------------------------------------------------------------------------
# detector deployment, `mambaout profile` settings


def test_detector_deployment_export_says_it_is_not_supported_and_why(tmp_path: Path) -> None:
    from detection_helpers import SMALL_TASK

    from mambaout_pl.export.deploy import export_onnx, export_program, export_task
    from mambaout_pl.tasks import InstanceSegmentationTask

    task = InstanceSegmentationTask(**{**SMALL_TASK, "backbone_args": json.loads(TINY_BACKBONE)})
    for export in (
        lambda: export_task(task, tmp_path / "onnx", "onnx"),
        lambda: export_task(task, tmp_path / "pt2", "pt2"),
        lambda: export_onnx(task.model, tmp_path / "model.onnx", input_size=64),
        lambda: export_program(task.model, tmp_path / "model.pt2", input_size=64),
    ):
        with pytest.raises(ExportError) as raised:
            export()
        message = str(raised.value)
        assert message.startswith(
            "A Mask R-CNN detector (RCNNDetector) cannot be exported as ONNX or as a torch.export"
        )
        assert "non-maximum suppression" in message and "data-dependent shapes" in message
        assert "Export it in the Hub format instead (`mambaout export CKPT DIR`, without --format)" in message
        assert "export_onnx(" not in message  # the call that fails is not suggested
    assert list(tmp_path.iterdir()) == []
    # Why `--format pt2` is not suggested either: torch.export itself stops at the detections' data-dependent count.
    with pytest.raises(Exception, match="data-dependent expression"):
        torch.export.export(task.model.eval(), (torch.rand(2, 3, 64, 64),), strict=False)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--batch-size", "0"], "--batch-size 0: a batch needs at least 1 image."),
        (["--steps", "-1"], "--steps -1: give a number of timed steps >= 1, or 0 to skip the throughput."),
        (["--warmup", "-2"], "--warmup -2: give a number of untimed warm-up steps >= 0."),
        (["--threads", "-1"], "--threads -1: give at least 1 thread"),
    ],
    ids=["batch size 0", "negative steps", "negative warm-up", "negative threads"],
)
def test_profile_refuses_settings_that_measure_nothing(arguments: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["profile", "--model", "mambaout_femto", *arguments])
    assert raised.value.code == 2
    captured = capsys.readouterr()
    assert message in captured.err.strip().splitlines()[-1] and captured.out == ""  # before any model is built


def test_profile_refuses_an_image_smaller_than_the_models_downsampling(capsys) -> None:
    assert main(["profile", "--model", "mambaout_femto", "--image-size", "16", "48", "--steps", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "mambaout profile: error: --image-size 16 48 is too small for mambaout_femto: it downsamples by 32, so "
        "each side must be at least 32 pixels."
    )
    assert main(["profile", "--model", "mambaout_femto", "--image-size", "32", "32", "--steps", "0"]) == 0
