"""DetectionDataModule: a COCO folder, HF-style parquet, the embedded digits, and bad annotations.

Every dataset here is generated on disk and read through the same calls a user's configuration makes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torchmetrics.detection import MeanAveragePrecision

from mambaout_pl.data import (
    AnnotationFormatError,
    ColumnNotFoundError,
    DataError,
    DataNotFoundError,
    DetectionDataModule,
    InvalidLabelError,
)
from mambaout_pl.data.detection import AnnotationWarning
from mambaout_pl.models import RCNNDetector

WIDTH, HEIGHT = 20, 16
# COCO categories, deliberately not in id order: labels follow the ids, so "dog" (id 2) is 1, "cat" (id 5) 2.
CATEGORIES = [{"id": 5, "name": "cat"}, {"id": 2, "name": "dog"}]
LABEL_OF = {5: 2, 2: 1}
# Per split, per image: its objects as (category id, iscrowd, (x1, y1, x2, y2)), boxes in whole pixels.
OBJECTS = {
    "train2017": {
        11: [(5, 0, (2, 3, 9, 8)), (2, 1, (12, 1, 18, 6))],  # an object and a crowd region
        12: [(2, 1, (0, 0, 5, 5))],  # only a crowd region: not trained on
        13: [],  # no objects: not trained on
        14: [(2, 0, (4, 6, 15, 14))],
    },
    "val2017": {
        21: [(2, 0, (1, 2, 8, 10)), (5, 1, (10, 10, 20, 16))],
        22: [],
    },
}


def box_mask(box: tuple[int, int, int, int]) -> np.ndarray:
    x1, y1, x2, y2 = box
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[y1:y2, x1:x2] = 1
    return mask


def rle(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask))
    return {"size": list(encoded["size"]), "counts": encoded["counts"].decode("ascii")}


def image_pixels(image_id: int) -> np.ndarray:
    """An image whose red channel is its id, so that a batch tells which image it holds."""
    pixels = np.random.default_rng(image_id).integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
    pixels[..., 0] = image_id
    return pixels


def write_coco_folder(root: Path) -> Path:
    """``annotations/instances_{train2017,val2017}.json`` and the images of ``OBJECTS``, masks as RLE."""
    (root / "annotations").mkdir(parents=True)
    for split, images in OBJECTS.items():
        (root / split).mkdir()
        content = {"images": [], "annotations": [], "categories": CATEGORIES}
        for image_id, objects in images.items():
            Image.fromarray(image_pixels(image_id)).save(root / split / f"{image_id}.png")
            content["images"].append({"id": image_id, "file_name": f"{image_id}.png", "width": WIDTH, "height": HEIGHT})
            for category, crowd, box in objects:
                x1, y1, x2, y2 = box
                content["annotations"].append(
                    {
                        "id": len(content["annotations"]) + 1,
                        "image_id": image_id,
                        "category_id": category,
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": float((x2 - x1) * (y2 - y1)),
                        "iscrowd": crowd,
                        "segmentation": rle(box_mask(box)),
                    }
                )
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(content))
    return root


def edit_annotations(root: Path, split: str, edit) -> Path:
    path = root / "annotations" / f"instances_{split}.json"
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))
    return path


def make_module(tmp_path: Path, **kwargs) -> DetectionDataModule:
    """Small single-process defaults; no resize for the 20x16 images (shorter side 16) and no flip."""
    defaults = dict(
        batch_size=2,
        num_workers=0,
        pin_memory=False,
        min_size=HEIGHT,
        max_size=100,
        hflip=0.0,
        cache_dir=str(tmp_path / "cache"),
    )
    return DetectionDataModule(**{**defaults, **kwargs})


def image_id_of(image: torch.Tensor) -> int:
    return round(float(image[0].mean()) * 255)


def check_target(target: dict, objects: list, training: bool, masks: bool | None = True) -> None:
    """A target against the objects written: crowd regions only in evaluation, with iscrowd and area.

    ``masks``: True checks the box-shaped masks, False that there are none, None leaves them unchecked.
    """
    expected = [obj for obj in objects if not (training and obj[1])]
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    assert target["boxes"].tolist() == [list(map(float, box)) for _, _, box in expected]
    assert target["labels"].tolist() == [LABEL_OF[category] for category, _, _ in expected]
    if training:
        assert "iscrowd" not in target and "area" not in target
    else:
        assert target["iscrowd"].tolist() == [crowd for _, crowd, _ in expected]
        assert target["area"].tolist() == [float((x2 - x1) * (y2 - y1)) for _, _, (x1, y1, x2, y2) in expected]
    if masks:
        assert target["masks"].dtype == torch.uint8
        assert target["masks"].shape == (len(expected), HEIGHT, WIDTH)
        for mask, (_, _, box) in zip(target["masks"], expected, strict=True):
            assert np.array_equal(mask.numpy(), box_mask(box))
    elif masks is False:
        assert "masks" not in target


def test_coco_folder_trains_on_annotated_images_and_evaluates_every_image(tmp_path):
    root = write_coco_folder(tmp_path / "coco")
    dm = make_module(tmp_path, path="coco", data_dir=str(root))
    assert dm.num_classes == 2 and dm.label_names == ["dog", "cat"]
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 2 and len(dm.datasets["val"]) == 2  # images 12, 13 left out of training

    (train,) = list(dm.train_dataloader())
    assert set(train) == {"images", "targets", "file_names"}
    ids = [target["image_id"] for target in train["targets"]]
    assert sorted(ids) == [11, 14]
    assert train["file_names"] == [f"{image_id}.png" for image_id in ids]  # the annotation file's file_name
    for image, target in zip(train["images"], train["targets"], strict=True):
        assert image.dtype == torch.float32 and image.shape == (3, HEIGHT, WIDTH)
        assert image_id_of(image) == target["image_id"]
        check_target(target, OBJECTS["train2017"][target["image_id"]], training=True)

    (val,) = list(dm.val_dataloader())
    assert [target["image_id"] for target in val["targets"]] == [21, 22]
    for image, target in zip(val["images"], val["targets"], strict=True):
        expected_pixels = torch.from_numpy(image_pixels(target["image_id"])).permute(2, 0, 1)
        assert torch.equal((image * 255).round().byte(), expected_pixels)  # original size, not resized
        check_target(target, OBJECTS["val2017"][target["image_id"]], training=False)
    assert val["targets"][1]["boxes"].shape == (0, 4) and val["targets"][1]["masks"].shape == (0, HEIGHT, WIDTH)
    assert dm.annotation_file("val") == root / "annotations" / "instances_val2017.json"
    assert dm.annotation_file("test") is None  # no test split set


def test_training_resizes_and_flips_boxes_and_masks_with_the_image(tmp_path):
    root = write_coco_folder(tmp_path / "coco")
    dm = make_module(tmp_path, path="coco", data_dir=str(root), min_size=32, hflip=1.0, masks=False)
    dm.setup("fit")
    sample = dm.datasets["train"][1]  # image 14: one 11x8 box at (4, 6)
    assert sample["image"].shape == (3, 32, 40) and "masks" not in sample["target"]
    x1, y1, x2, y2 = 4 * 2, 6 * 2, 15 * 2, 14 * 2
    assert sample["target"]["boxes"].tolist() == [[40.0 - x2, y1, 40.0 - x1, y2]]


def test_resumed_training_order_continues_the_interrupted_epoch(tmp_path):
    root = write_coco_folder(tmp_path / "coco")
    options = dict(path="coco", data_dir=str(root), batch_size=1, seed=5, min_size=[16, 24], hflip=0.5)
    reference = make_module(tmp_path, **options).train_dataloader()
    reference.load_state_dict({"epoch": 1, "consumed": 0})
    epoch_1 = list(reference)
    dm = make_module(tmp_path, **options)
    dm.load_state_dict({"train_loader": {"epoch": 1, "consumed": 1}})
    (resumed,) = list(dm.train_dataloader())
    assert torch.equal(resumed["images"][0], epoch_1[1]["images"][0])
    assert torch.equal(resumed["targets"][0]["boxes"], epoch_1[1]["targets"][0]["boxes"])


def hf_rows(split: str, box_format: str = "xyxy") -> dict:
    """The ``OBJECTS`` of ``split`` as a Hub detection dataset holds them: one objects dict of lists per image."""
    columns = {"image": [], "image_id": [], "objects": []}
    for image_id, objects in OBJECTS[split].items():
        columns["image"].append(Image.fromarray(image_pixels(image_id)))
        columns["image_id"].append(image_id)
        boxes = [
            list(box) if box_format == "xyxy" else [box[0], box[1], box[2] - box[0], box[3] - box[1]]
            for _, _, box in objects
        ]
        columns["objects"].append(
            {
                "bbox": [[float(value) for value in box] for box in boxes],
                "category": [LABEL_OF[category] - 1 for category, _, _ in objects],
                "area": [float((x2 - x1) * (y2 - y1)) for _, _, (x1, y1, x2, y2) in objects],
                "iscrowd": [crowd for _, crowd, _ in objects],
                # Polygons around each box's pixels.
                "segmentation": [[[x1, y1, x2, y1, x2, y2, x1, y2]] for _, _, (x1, y1, x2, y2) in objects],
            }
        )
    return columns


def hf_features(category=None) -> datasets.Features:
    return datasets.Features(
        {
            "image": datasets.Image(),
            "image_id": datasets.Value("int64"),
            "objects": datasets.Sequence(
                {
                    "bbox": datasets.Sequence(datasets.Value("float32"), length=4),
                    "category": category or datasets.ClassLabel(names=["dog", "cat"]),
                    "area": datasets.Value("float32"),
                    "iscrowd": datasets.Value("int8"),
                    "segmentation": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
                }
            ),
        }
    )


def write_parquet(folder: Path, box_format: str = "xyxy", features=None, edit=None) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, name in (("train2017", "train"), ("val2017", "validation")):
        rows = hf_rows(split, box_format)
        if edit is not None:
            edit(split, rows)
        files[name] = str(folder / f"{name}.parquet")
        datasets.Dataset.from_dict(rows, features=features or hf_features()).to_parquet(files[name])
    return files


def polygon_mask(box: tuple[int, int, int, int]) -> np.ndarray:
    x1, y1, x2, y2 = box
    polygon = mask_utils.frPyObjects([[x1, y1, x2, y1, x2, y2, x1, y2]], HEIGHT, WIDTH)
    return mask_utils.decode(mask_utils.merge(polygon))


@pytest.mark.parametrize("box_format", ["xyxy", "xywh"])
def test_parquet_with_hub_style_objects(tmp_path, box_format):
    files = write_parquet(tmp_path / "parquet", box_format)
    dm = make_module(
        tmp_path, path="parquet", data_files=files, box_format=box_format, train_split="train", val_split="validation"
    )
    assert dm.num_classes == 2 and dm.label_names == ["dog", "cat"]
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 2 and len(dm.datasets["val"]) == 2
    (train,) = list(dm.train_dataloader())
    assert sorted(target["image_id"] for target in train["targets"]) == [11, 14]
    (val,) = list(dm.val_dataloader())
    for image, target in zip(val["images"], val["targets"], strict=True):
        assert image_id_of(image) == target["image_id"] and image.shape == (3, HEIGHT, WIDTH)
        expected = OBJECTS["val2017"][target["image_id"]]
        check_target(target, expected, training=False, masks=None)
        masks = [polygon_mask(box) for _, _, box in expected]
        assert np.array_equal(target["masks"].numpy(), np.array(masks).reshape(-1, HEIGHT, WIDTH))
    assert val["targets"][0]["masks"].sum() > 0


def test_predict_split_without_objects(tmp_path):
    path = tmp_path / "predict.parquet"
    rows = {"image": [Image.fromarray(image_pixels(image_id)) for image_id in (31, 32)], "image_id": [31, 32]}
    datasets.Dataset.from_dict(rows).to_parquet(path)
    # No train split to read the classes from: they are given.
    dm = make_module(
        tmp_path, path="parquet", data_files={"predict": str(path)}, predict_split="predict", label_names=["dog", "cat"]
    )
    (batch,) = list(dm.predict_dataloader())
    assert [image_id_of(image) for image in batch["images"]] == [31, 32]
    assert [target["image_id"] for target in batch["targets"]] == [31, 32]
    assert all(target["boxes"].shape == (0, 4) and len(target["labels"]) == 0 for target in batch["targets"])


@pytest.mark.slow
def test_streamed_parquet_trains_on_annotated_images_and_evaluates_every_image(tmp_path):
    files = write_parquet(tmp_path / "parquet")
    dm = make_module(
        tmp_path,
        path="parquet",
        data_files=files,
        box_format="xyxy",
        streaming=True,
        train_split="train",
        val_split="validation",
        drop_last=False,
    )
    assert dm.label_names == ["dog", "cat"]
    dm.setup("fit")
    train = [target for batch in dm.train_dataloader() for target in batch["targets"]]
    assert sorted(target["image_id"] for target in train) == [11, 14]
    for target in train:
        check_target(target, OBJECTS["train2017"][target["image_id"]], training=True, masks=None)
    val = [target for batch in dm.val_dataloader() for target in batch["targets"]]
    assert [target["image_id"] for target in val] == [21, 22]


def test_parquet_with_integer_categories_needs_label_names(tmp_path):
    files = write_parquet(tmp_path / "parquet", features=hf_features(datasets.Value("int64")))
    options = dict(path="parquet", data_files=files, box_format="xyxy", train_split="train", val_split="validation")
    with pytest.raises(DataError, match="not a ClassLabel. Set `label_names`"):
        make_module(tmp_path, **options).label_names
    dm = make_module(tmp_path, label_names=["dog", "cat"], **options)
    dm.setup("validate")
    assert dm.datasets["val"][0]["target"]["labels"].tolist() == [1, 2]


def test_masks_stored_as_images_and_one_of_another_size(tmp_path):
    rows = hf_rows("val2017")
    for objects, written in zip(rows["objects"], OBJECTS["val2017"].values(), strict=True):
        objects["segmentation"] = [Image.fromarray(box_mask(box) * 255) for _, _, box in written]
    features = hf_features()
    features["objects"]["segmentation"] = datasets.Sequence(datasets.Image())
    (tmp_path / "parquet").mkdir()
    path = str(tmp_path / "parquet" / "val.parquet")
    datasets.Dataset.from_dict(rows, features=features).to_parquet(path)
    options = dict(path="parquet", data_files={"validation": path}, box_format="xyxy", train_split="validation")
    dm = make_module(tmp_path, test_split="validation", **options)
    dm.setup("test")
    target = dm.datasets["test"][0]["target"]
    check_target(target, OBJECTS["val2017"][21], training=False)

    rows["objects"][0]["segmentation"][1] = Image.new("L", (WIDTH, HEIGHT - 2), 255)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(path)
    dm = make_module(tmp_path / "other", test_split="validation", **options)
    dm.setup("test")
    with pytest.raises(DataError, match=r"mask of object 1 of row 0 of split 'validation' is 20x14 .* image is 20x16"):
        dm.datasets["test"][0]


def test_builtin_digit_detection_is_read_as_a_coco_folder(tmp_path):
    dm = make_module(tmp_path, eval_batch_size=3, min_size=64, max_size=128)
    assert dm.hparams.path is None and dm.source[0] == "coco"
    assert dm.num_classes == 10 and dm.label_names == [str(digit) for digit in range(10)]
    folder = Path(dm.source[1])
    assert folder.name == "digit_detection-v2"
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 600 and len(dm.datasets["val"]) == 150
    content = json.loads((folder / "annotations" / "instances_val2017.json").read_text())
    val = next(iter(dm.val_dataloader()))
    for image, target in zip(val["images"], val["targets"], strict=True):
        assert image.shape == (3, 64, 64)
        written = [a for a in content["annotations"] if a["image_id"] == target["image_id"]]
        assert target["labels"].tolist() == [a["category_id"] for a in written]  # ids 1..10 are labels 1..10
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in written)]
        assert torch.allclose(target["boxes"], torch.tensor(boxes))
        assert target["masks"].sum(dim=(1, 2)).tolist() == [a["area"] for a in written]
    assert [target["image_id"] for target in val["targets"]] == [1, 2, 3]
    batch = next(iter(dm.train_dataloader()))
    assert all(1 <= label <= 10 for target in batch["targets"] for label in target["labels"].tolist())
    with pytest.raises(DataError, match="is not a detection dataset"):
        make_module(tmp_path, path="builtin:digits").source


# -- bad input ----------------------------------------------------------------------------------


def test_unknown_category_in_a_coco_file_names_the_file(tmp_path):
    root = write_coco_folder(tmp_path / "coco")
    path = edit_annotations(root, "val2017", lambda content: content["annotations"][0].update(category_id=9))
    dm = make_module(tmp_path, path="coco", data_dir=str(root))
    with pytest.raises(
        InvalidLabelError, match=r"category_id 9, which is not among the file's categories \[2, 5\]"
    ) as error:
        dm.setup("fit")
    assert str(path) in str(error.value)


def test_parquet_category_outside_the_classes_names_the_row(tmp_path):
    def edit(split, rows):
        if split == "train2017":
            rows["objects"][3]["category"][0] = 7

    files = write_parquet(tmp_path / "parquet", features=hf_features(datasets.Value("int64")), edit=edit)
    dm = make_module(
        tmp_path,
        path="parquet",
        data_files=files,
        box_format="xyxy",
        label_names=["dog", "cat"],
        train_split="train",
        val_split="validation",
    )
    with pytest.raises(InvalidLabelError, match=r"Row 3 of split 'train' .* category 7 .* outside the 2 categories"):
        dm.setup("fit")


def test_parquet_boxes_without_area_or_outside_the_image_are_counted_and_left_out(tmp_path):
    def edit(split, rows):
        if split == "train2017":
            rows["width"] = [WIDTH] * 4
            rows["height"] = [HEIGHT] * 4
            rows["objects"][0]["bbox"][0] = [5.0, 3.0, 5.0, 8.0]  # no width: image 11 keeps only its crowd region
            rows["objects"][3]["bbox"][0] = [4.0, 6.0, 30.0, 14.0]  # past the right border: clipped

    features = hf_features()
    features["width"] = datasets.Value("int32")
    features["height"] = datasets.Value("int32")

    def write(folder):
        folder.mkdir(parents=True)
        rows = hf_rows("train2017")
        edit("train2017", rows)
        datasets.Dataset.from_dict(rows, features=features).to_parquet(folder / "train.parquet")
        return str(folder / "train.parquet")

    dm = make_module(
        tmp_path,
        path="parquet",
        data_files={"train": write(tmp_path / "parquet")},
        box_format="xyxy",
        train_split="train",
        val_split=None,
        val_fraction=0.0,
    )
    with pytest.warns(AnnotationWarning, match=r"Split 'train' .* left out 1 boxes .* clipped 1 boxes .* row 0"):
        train = dm._checked("train", "train_split", "train")
    assert train["image_id"] == [14]  # image 11 has only a crowd region left
    sample = dm.decoder(train, "train", "train")(train[0], 0)
    assert sample["target"]["boxes"].tolist() == [[4.0, 6.0, 20.0, 14.0]]


def test_a_mask_of_another_size_names_the_annotation_and_the_image(tmp_path):
    root = write_coco_folder(tmp_path / "coco")
    wrong = rle(np.zeros((HEIGHT, WIDTH + 4), dtype=np.uint8))
    edit_annotations(root, "val2017", lambda content: content["annotations"][0].update(segmentation=wrong))
    for masks in (True, False):  # a file that breaks the format is refused whole, before anything is decoded
        dm = make_module(tmp_path, path="coco", data_dir=str(root), masks=masks)
        with pytest.raises(
            AnnotationFormatError,
            match=r"instances_val2017\.json' .*annotation 1 \(image 21, '21\.png'\) has segmentation .*\[16, 20\]",
        ):
            dm.setup("validate")


def test_an_annotation_file_that_does_not_match_its_image_folder(tmp_path):
    root = write_coco_folder(tmp_path / "coco")
    Image.new("RGB", (WIDTH, HEIGHT + 1)).save(root / "val2017" / "22.png")
    message = r"22\.png' .*is 20x17 .* annotations say 20x16.*instances_<split>.json"
    with pytest.raises(DataError, match=message):  # found from the image headers, before training
        make_module(tmp_path, path="coco", data_dir=str(root)).setup("fit")
    dm = make_module(tmp_path, path="coco", data_dir=str(root))
    val = dm.split("val2017", "val_split")
    with pytest.raises(DataError, match=message):  # and when the image is decoded
        dm.decoder(val, "val2017", "val")(val[1], 1)

    with pytest.raises(DataError, match="is a COCO folder, whose boxes are always .*remove `box_format`"):
        make_module(tmp_path, path="coco", data_dir=str(root), box_format="xyxy").setup("fit")

    (root / "train2017" / "13.png").unlink()
    with pytest.raises(
        DataNotFoundError, match=r"1 of the 4 images listed in .*instances_train2017.json.*\['13.png'\]"
    ):
        make_module(tmp_path, path="coco", data_dir=str(root)).setup("fit")
    with pytest.raises(DataNotFoundError, match="has no annotations/instances_<split>.json"):
        make_module(tmp_path, path="coco", data_dir=str(root / "train2017")).setup("fit")


def test_masks_asked_for_but_absent_and_a_missing_objects_column(tmp_path):
    root = write_coco_folder(tmp_path / "coco")
    dm = make_module(tmp_path, path="coco", data_dir=str(root), mask_key="mask")
    with pytest.raises(ColumnNotFoundError, match="no masks .*Set `mask_key`.* or `masks: false`"):
        dm.setup("fit")
    dm = make_module(tmp_path, path="coco", data_dir=str(root), objects_column="annotations")
    with pytest.raises(ColumnNotFoundError, match="Column 'annotations' does not exist .*Set `objects_column`"):
        dm.label_names


def test_batches_train_a_detector_and_score_with_torchmetrics(one_thread, tmp_path):
    """The contract end to end: training batches give finite losses, evaluation targets feed the COCO metric."""
    root = write_coco_folder(tmp_path / "coco")
    dm = make_module(tmp_path, path="coco", data_dir=str(root), min_size=64, max_size=96)
    dm.setup("fit")
    torch.manual_seed(0)
    detector = RCNNDetector(
        "mambaout_femto",
        num_classes=dm.num_classes,
        min_size=64,
        max_size=96,
        fpn_channels=32,
        anchor_sizes=(8, 16, 32, 64, 128),
        box_batch_size_per_image=64,
    ).train()
    (train,) = list(dm.train_dataloader())
    losses = detector(train["images"], train["targets"])
    assert "loss_mask" in losses and all(math.isfinite(loss.item()) for loss in losses.values())

    (val,) = list(dm.val_dataloader())
    with torch.no_grad():
        predictions = detector.eval()(val["images"])
    metric = MeanAveragePrecision(iou_type=["bbox", "segm"])
    preds = [{**p, "masks": (p["masks"][:, 0] > 0.5).to(torch.uint8)} for p in predictions]
    metric.update(preds, val["targets"])
    assert 0.0 <= float(metric.compute()["bbox_map"]) <= 1.0

    # Predicting exactly the objects that are not crowd regions scores 1: the crowd region (the only
    # "cat") is ignored. Were `iscrowd` lost, "cat" would count as missed and the mean would be 0.5.
    metric = MeanAveragePrecision(iou_type=["bbox", "segm"])
    exact = []
    for target in val["targets"]:
        keep = target["iscrowd"] == 0
        exact.append(
            {
                "boxes": target["boxes"][keep],
                "labels": target["labels"][keep],
                "masks": target["masks"][keep],
                "scores": torch.ones(int(keep.sum())),
            }
        )
    metric.update(exact, val["targets"])
    scores = metric.compute()
    assert float(scores["bbox_map"]) == 1.0 and float(scores["segm_map"]) == 1.0


def test_category_names_repeated_or_differing_between_splits(tmp_path):
    root = write_coco_folder(tmp_path / "coco")
    for split in OBJECTS:
        edit_annotations(root, split, lambda content: content["categories"][1].update(name="cat"))
    assert make_module(tmp_path, path="coco", data_dir=str(root)).label_names == ["cat (id 2)", "cat (id 5)"]

    edit_annotations(root, "val2017", lambda content: content["categories"].append({"id": 8, "name": "fish"}))
    dm = make_module(tmp_path, path="coco", data_dir=str(root))
    with pytest.raises(
        InvalidLabelError, match=r"Split 'val2017' names its categories .*'fish'.* the same 'categories'"
    ):
        dm.setup("fit")
