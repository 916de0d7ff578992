"""The COCO folder reader, the example decoder, and the embedded digit-detection dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision import tv_tensors

from mambaout_pl.data.coco import CocoAnnotationWarning, decode_coco_example, load_coco_split
from mambaout_pl.data.embedded_detection import write_digit_detection
from mambaout_pl.data.errors import AnnotationFormatError, DataError, DataNotFoundError, InvalidLabelError

SIZES = {"a.png": (14, 12), "b.png": (20, 16), "c.png": (10, 10)}  # (width, height)


def box_mask(height: int, width: int, x1: int, y1: int, x2: int, y2: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[y1:y2, x1:x2] = 1
    return mask


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths of the column-major pixels, starting with a run of zeros."""
    pixels = mask.flatten(order="F")
    counts, value, run = [], 0, 0
    for pixel in pixels:
        if pixel != value:
            counts.append(run)
            value, run = pixel, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


# The masks drawn in `write_coco`: (file, category id, iscrowd, mask).
DRAWN = [
    ("a.png", 3, 0, box_mask(12, 14, 2, 3, 10, 8)),  # written as a polygon
    ("a.png", 7, 0, box_mask(12, 14, 0, 0, 4, 4)),  # compressed RLE
    ("b.png", 7, 0, box_mask(16, 20, 5, 5, 11, 11)),  # uncompressed RLE
    ("b.png", 3, 1, box_mask(16, 20, 0, 0, 3, 3)),  # a crowd region
]


def write_coco(root: Path, split: str = "val") -> Path:
    """A COCO folder: 3 images (c.png without annotations), categories 7 and 3, each mask encoding, a crowd."""
    rng = np.random.default_rng(0)
    (root / split).mkdir(parents=True)
    (root / "annotations").mkdir()
    images = []
    for image_id, (name, (width, height)) in enumerate(SIZES.items(), start=1):
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / split / name)
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
    image_ids = {image["file_name"]: image["id"] for image in images}
    segmentations = [
        [[2, 3, 10, 3, 10, 8, 2, 8]],
        compressed_rle(DRAWN[1][3]),
        uncompressed_rle(DRAWN[2][3]),
        compressed_rle(DRAWN[3][3]),
    ]
    annotations = []
    for index, ((name, category, crowd, mask), segmentation) in enumerate(
        zip(DRAWN, segmentations, strict=True), start=1
    ):
        x, y, w, h = (float(v) for v in mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask))))
        annotations.append(
            {
                "id": index,
                "image_id": image_ids[name],
                "category_id": category,
                "bbox": [x, y, w, h],
                "area": float(mask.sum()),
                "iscrowd": crowd,
                "segmentation": segmentation,
            }
        )
    content = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}],
    }
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(content))
    return root


def edit_annotations(root: Path, edit, split: str = "val") -> Path:
    path = root / "annotations" / f"instances_{split}.json"
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))
    return path


def test_reader_round_trips_a_coco_folder(tmp_path):
    root = write_coco(tmp_path)
    dataset, categories = load_coco_split(root, "val")
    assert [category["id"] for category in categories] == [3, 7]
    assert dataset.column_names == ["image", "image_id", "file_name", "width", "height", "objects"]
    assert dataset["file_name"] == list(SIZES)  # the annotation file's names, for the prediction files
    assert dataset["image_id"] == [1, 2, 3] and [len(objects) for objects in dataset["objects"]] == [2, 2, 0]
    label_of = {category["id"]: index + 1 for index, category in enumerate(categories)}

    for row, (name, (width, height)) in zip(dataset, SIZES.items(), strict=True):
        image, target = decode_coco_example(row, label_of, crowd=True)
        assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8
        expected_pixels = torch.from_numpy(np.array(Image.open(root / "val" / name))).permute(2, 0, 1)
        assert torch.equal(image.as_subclass(torch.Tensor), expected_pixels)
        drawn = [entry for entry in DRAWN if entry[0] == name]
        assert isinstance(target["boxes"], tv_tensors.BoundingBoxes) and target["boxes"].format.name == "XYXY"
        assert tuple(target["boxes"].canvas_size) == (height, width)
        assert target["labels"].dtype == torch.int64
        assert target["labels"].tolist() == [label_of[category] for _, category, _, _ in drawn]
        assert target["iscrowd"].tolist() == [crowd for _, _, crowd, _ in drawn]
        assert isinstance(target["masks"], tv_tensors.Mask) and target["masks"].dtype == torch.uint8
        assert target["masks"].shape == (len(drawn), height, width)
        for box, mask, (_, _, _, expected) in zip(target["boxes"], target["masks"], drawn, strict=True):
            assert np.array_equal(mask.numpy(), expected)
            rows, columns = np.nonzero(expected)
            assert box.tolist() == [columns.min(), rows.min(), columns.max() + 1, rows.max() + 1]

    _, training_target = decode_coco_example(dataset[1], label_of)  # crowd regions left out of training targets
    assert training_target["labels"].tolist() == [label_of[7]] and training_target["masks"].shape[0] == 1
    trainable, _ = load_coco_split(root, "val", skip_empty=True)
    assert trainable["image_id"] == [1, 2]


def test_boxes_without_area_or_outside_the_image_are_dropped_with_a_counted_warning(tmp_path):
    root = write_coco(tmp_path)

    def edit(content):
        content["annotations"][0]["bbox"] = [2.0, 3.0, 0.0, 5.0]  # no width
        content["annotations"][1]["bbox"] = [30.0, 1.0, 4.0, 4.0]  # right of the 14-pixel-wide image
        content["annotations"][2]["bbox"] = [15.0, 5.0, 10.0, 6.0]  # reaches past the 20-pixel-wide image

    path = edit_annotations(root, edit)
    with pytest.warns(CocoAnnotationWarning, match="dropped 2 boxes.*clipped 1 boxes") as record:
        dataset, _ = load_coco_split(root, "val")
    assert str(path) in str(record[0].message)
    assert [len(objects) for objects in dataset["objects"]] == [0, 2, 0]
    assert dataset[1]["objects"][0]["bbox"] == [15.0, 5.0, 5.0, 6.0]


def test_unknown_category_id_raises_naming_the_file(tmp_path):
    root = write_coco(tmp_path)
    path = edit_annotations(root, lambda content: content["annotations"][2].update(category_id=5))
    with pytest.raises(InvalidLabelError, match=r"category_id 5.*\[3, 7\]") as error:
        load_coco_split(root, "val")
    assert str(path) in str(error.value) and "b.png" in str(error.value)


def test_missing_images_raise_naming_the_first_ones_and_the_folders(tmp_path):
    root = write_coco(tmp_path)
    (root / "val" / "b.png").unlink()
    (root / "val" / "c.png").unlink()
    with pytest.raises(DataNotFoundError, match=r"2 of the 3 images.*\['b.png', 'c.png'\]") as error:
        load_coco_split(root, "val")
    assert str(root / "annotations" / "instances_val.json") in str(error.value)
    assert str(root / "val") in str(error.value)
    with pytest.raises(DataNotFoundError, match="instances_train2017.json"):
        load_coco_split(root)


def test_a_mask_or_image_of_another_size_raises(tmp_path):
    root = write_coco(tmp_path / "wrong")
    wrong = compressed_rle(np.zeros((12, 20), dtype=np.uint8))  # b.png is 20x16
    edit_annotations(root, lambda content: content["annotations"][2].update(segmentation=wrong))
    with pytest.raises(
        AnnotationFormatError, match=r"annotation 3 \(image 2, 'b\.png'\) has segmentation .*\[16, 20\]"
    ):
        load_coco_split(root, "val")  # refused when the file is read, before training

    root = write_coco(tmp_path / "right")
    dataset, categories = load_coco_split(root, "val")
    label_of = {category["id"]: index + 1 for index, category in enumerate(categories)}
    row = dataset[1]
    row["objects"][0]["segmentation"] = json.dumps(wrong)  # a row from elsewhere: the decoder checks it too
    with pytest.raises(DataError, match=r"annotation 3 of image .*b\.png.* is 12x20 .* image is 16x20"):
        decode_coco_example(row, label_of)
    decode_coco_example(row, label_of, masks=False)  # boxes alone still decode

    Image.new("RGB", (9, 9)).save(root / "val" / "c.png")
    with pytest.raises(DataError, match=r"c\.png' is 9x9 .* says 10x10"):
        decode_coco_example(load_coco_split(root, "val")[0][2], label_of)


def test_digit_detection_is_a_coco_folder_of_digits_with_exact_masks(tmp_path):
    counts = {"train": 6, "val": 3}
    root = write_digit_detection(tmp_path / "digits", seed=3, counts=counts)
    for split, count in counts.items():
        dataset, categories = load_coco_split(root, split)
        assert len(dataset) == count and [category["name"] for category in categories] == [str(d) for d in range(10)]
        label_of = {category["id"]: index + 1 for index, category in enumerate(categories)}
        for row in dataset:
            image, target = decode_coco_example(row, label_of)
            assert image.shape == (3, 64, 64) and 1 <= len(target["labels"]) <= 3
            assert target["labels"].min() >= 1 and target["labels"].max() <= 10
            for box, mask, area in zip(target["boxes"], target["masks"], target["area"], strict=True):
                rows, columns = torch.nonzero(mask, as_tuple=True)
                assert box.tolist() == [columns.min(), rows.min(), columns.max() + 1, rows.max() + 1]
                assert mask.sum() == area
                assert 16 <= max(box[2] - box[0], box[3] - box[1]) <= 32
            assert target["masks"].sum(0).max() == 1  # the digits do not overlap
    again = write_digit_detection(tmp_path / "again", seed=3, counts=counts)
    other = write_digit_detection(tmp_path / "other", seed=4, counts=counts)
    for name in ("annotations/instances_train.json", "train/000001.png", "val/000003.png"):
        assert (root / name).read_bytes() == (again / name).read_bytes()
    assert (root / "train" / "000001.png").read_bytes() != (other / "train" / "000001.png").read_bytes()
