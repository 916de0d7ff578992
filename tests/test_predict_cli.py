"""`mambaout predict` on a folder of images: one command from a run's config.yaml and checkpoint.

A tiny run is trained through the CLI; its training images are then deleted, and the same CLI
predicts a flat folder of unlabelled images of other sizes from the run's saved config.yaml. The
written rows are checked against the network's own probabilities of each file, the masks against
the input sizes, and a second run against overwriting the first one's files.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import IMAGE_FOLDER_CLASSES, IMAGE_FOLDER_COLOURS, write_ade20k_folder, write_image_folder
from helpers import TINY_BACKBONE, small_segmentation_args, tiny_fit_args
from PIL import Image

from mambaout_pl.cli import main, run_cli
from mambaout_pl.data import ADE20K_CLASSES, ImageClassificationDataModule
from mambaout_pl.data.images import read_rgb_image
from mambaout_pl.errors import OutputExistsError
from mambaout_pl.tasks import ClassificationTask

ROOT = Path(__file__).parents[1]

# (relative path, (width, height), colour): a flat folder, one image in a sub-folder, sizes unlike the training images'.
UNLABELLED = [
    ("holiday.png", (37, 29), IMAGE_FOLDER_COLOURS["cat"]),
    ("IMG_0002.jpg", (50, 44), IMAGE_FOLDER_COLOURS["dog"]),
    ("more/IMG_0003.png", (30, 52), IMAGE_FOLDER_COLOURS["fish"]),
    ("test_4.png", (41, 41), (120, 120, 120)),  # a name `imagefolder` would take for a test split
]


def write_unlabelled_folder(folder: Path) -> Path:
    """The images of ``UNLABELLED``, and a file that is not an image."""
    rng = np.random.default_rng(1)
    for name, (width, height), colour in UNLABELLED:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        noise = rng.integers(-30, 31, size=(height, width, 3))
        Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(path)
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_unlabelled_folder(tmp_path_factory.mktemp("unlabelled"))


@pytest.fixture(scope="module")
def classification_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The version folder of a one-step quick-start run on an image folder that no longer exists."""
    images = write_image_folder(tmp_path_factory.mktemp("images"), train_per_class=2, val_per_class=1)
    root = tmp_path_factory.mktemp("runs")
    main(tiny_fit_args(root, images))
    shutil.rmtree(images)
    return root / "lightning_logs" / "version_0"


def predict_args(run: Path, *extra: str) -> list[str]:
    return [
        "predict",
        f"--config={run / 'config.yaml'}",
        f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
        *extra,
    ]


def expected_top_k(run: Path, files: list[str]) -> list[tuple[list[str], list[float]]]:
    """Each file's classes and probabilities, most probable first, from the checkpoint and the run's eval transform."""
    task = ClassificationTask.load_from_checkpoint(run / "checkpoints" / "last.ckpt", map_location="cpu").eval()
    transform = ImageClassificationDataModule(image_size=32, crop_pct=1.0, interpolation="bilinear").eval_transform
    images = torch.stack([transform(read_rgb_image({"path": file, "bytes": None})) for file in files])
    with torch.no_grad():
        probabilities = torch.softmax(task(images), dim=-1)
    scores, classes = probabilities.sort(dim=-1, descending=True)
    return [([IMAGE_FOLDER_CLASSES[c] for c in row], score) for row, score in zip(classes.tolist(), scores.tolist())]


def test_classification_predicts_a_flat_folder_into_the_runs_folder(
    classification_run: Path, unlabelled: Path, caplog
) -> None:
    with caplog.at_level(logging.INFO):
        main(predict_args(classification_run, f"--data.predict_images={unlabelled}"))

    predict_run = classification_run / "predict"  # the predict command's folder in the checkpoint's run
    path = predict_run / "predictions.csv"
    assert f"Predictions of 4 images written to {path}" in caplog.text
    assert (predict_run / "config.yaml").is_file()
    with path.open() as file:
        header, *rows = list(csv.reader(file))
    # top-k capped at the 3 classes
    assert header == [
        "index",
        "file",
        "class_index",
        "label_name",
        "probability",
        "class_index_2",
        "label_name_2",
        "probability_2",
        "class_index_3",
        "label_name_3",
        "probability_3",
    ]
    files = sorted(str(unlabelled / name) for name, _, _ in UNLABELLED)
    assert [row[0] for row in rows] == ["0", "1", "2", "3"]
    assert [row[1] for row in rows] == files  # every image, none else, in path order
    for row, (names, scores) in zip(rows, expected_top_k(classification_run, files), strict=True):
        written = [float(row[index]) for index in (4, 7, 10)]
        assert [row[index] for index in (3, 6, 9)] == names
        assert [IMAGE_FOLDER_CLASSES[int(row[index])] for index in (2, 5, 8)] == names
        assert written == pytest.approx(scores, abs=2e-6)
        assert written == sorted(written, reverse=True) and sum(written) <= 1 + 1e-5


def test_classification_writes_json_lines_and_never_overwrites(classification_run: Path, unlabelled: Path) -> None:
    folder = classification_run.parents[1] / "my_predictions"  # inside the run's trainer.default_root_dir
    args = predict_args(
        classification_run,
        f"--data.predict_images={unlabelled / 'more'}",
        f"--model.predict_dir={folder}",
        "--model.predict_format=jsonl",
        "--model.predict_top_k=2",
    )
    main(args)
    path = folder / "predictions.jsonl"
    (record,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert record["index"] == 0 and record["file"] == str(unlabelled / "more" / "IMG_0003.png")
    ((names, scores),) = expected_top_k(classification_run, [record["file"]])
    assert record["label_name"] == names[:2] and record["class_index"] == [
        IMAGE_FOLDER_CLASSES.index(n) for n in names[:2]
    ]
    assert record["probability"] == pytest.approx(scores[:2], abs=2e-6) and sum(record["probability"]) < 1

    before = path.read_bytes()
    with pytest.raises(OutputExistsError, match=re.escape(f"'{path}' exists already (written by an earlier run?)")):
        run_cli(args)
    assert path.read_bytes() == before and sorted(p.name for p in folder.iterdir()) == ["predictions.jsonl"]


@pytest.mark.slow
def test_segmentation_writes_a_mask_per_image_named_and_sized_after_it(unlabelled: Path, tmp_path: Path) -> None:
    data = write_ade20k_folder(tmp_path / "ADEChallengeData2016")
    root = tmp_path / "runs"
    recipe = ROOT / "recipes" / "quickstart_segmentation.yaml"
    main(
        [
            "fit",
            f"--config={recipe}",
            *small_segmentation_args(root, data),
            f"--model.backbone_args={TINY_BACKBONE}",
            "--model.decode_channels=8",
            "--model.aux_channels=8",
        ]
    )
    shutil.rmtree(data)
    run = root / "lightning_logs" / "version_0"
    main(predict_args(run, f"--data.predict_images={unlabelled}"))

    folder = run / "predict"  # the run folder of its checkpoint
    written = folder.rglob("*")
    assert sorted(path.relative_to(folder).as_posix() for path in written if path.suffix in (".png", ".csv")) == [
        "IMG_0002.png",
        "holiday.png",
        "legend.csv",
        "more/IMG_0003.png",  # its sub-folder kept
        "test_4.png",
    ]
    for name, size, _ in UNLABELLED:
        mask = Image.open(folder / Path(name).with_suffix(".png"))
        assert mask.mode == "P" and mask.size == size
        assert np.asarray(mask).max() < 150  # ADE20K's classes, from the checkpoint
    with open(folder / "legend.csv", newline="") as file:
        legend = list(csv.DictReader(file))
    assert [row["name"] for row in legend] == list(ADE20K_CLASSES) and legend[1]["index"] == "1"
    colours = mask.getpalette()
    for row in (legend[1], legend[149]):  # the colour of the class's pixels in the masks
        index = int(row["index"])
        assert [int(row["red"]), int(row["green"]), int(row["blue"])] == colours[3 * index : 3 * index + 3]

    same_names = tmp_path / "same_names"
    shutil.copytree(unlabelled / "more", same_names / "a")
    shutil.copytree(unlabelled / "more", same_names / "b")
    main(predict_args(run, f"--data.predict_images={same_names}"))
    folder = run / "predict_1"
    assert Image.open(folder / "a" / "IMG_0003.png").size == Image.open(folder / "b" / "IMG_0003.png").size == (30, 52)

    Image.open(same_names / "a" / "IMG_0003.png").save(same_names / "a" / "IMG_0003.jpg")
    with pytest.raises(OutputExistsError, match=r"Two images to predict are named 'a/IMG_0003'"):
        run_cli(predict_args(run, f"--data.predict_images={same_names}"))
    written = run / "predict_2" / "a" / "IMG_0003.png"
    assert Image.open(written).size == (30, 52)  # the first one's mask, whole
