"""Tests of the data layer: sources, embedded data, transforms, ImageClassificationDataModule.

Every dataset here is generated on disk and read through the same ``datasets.load_dataset`` /
``load_from_disk`` calls a user's configuration makes; nothing touches the network.
"""

from __future__ import annotations

import io
import random
import threading
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.auto_augment import AugmentOp, RandAugment

from mambaout_pl.data import (
    ColumnNotFoundError,
    CorruptImageError,
    DataError,
    DataNotFoundError,
    ImageClassificationDataModule,
    InvalidLabelError,
    SplitNotFoundError,
    create_classification_transforms,
    open_dataset,
)
from mambaout_pl.data import embedded
from mambaout_pl.data.images import read_rgb_image
from mambaout_pl.data.transforms import make_posterize_safe

IMAGE_FOLDER_CLASSES = ["cat", "dog", "fish"]  # the classes of the `image_folder` fixture (conftest.py)
MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)


def make_module(tmp_path: Path, **kwargs) -> ImageClassificationDataModule:
    """A data module with small, fast, single-process defaults and a private cache."""
    defaults = dict(
        image_size=32, batch_size=4, num_workers=0, pin_memory=False, cache_dir=str(tmp_path / "hf_cache")
    )
    return ImageClassificationDataModule(**{**defaults, **kwargs})


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """Undo ImageNet normalisation: 0..255 pixel values of a [..., 3, H, W] batch."""
    return (images * STD + MEAN) * 255.0


def png_value(image: Image.Image, format: str = "PNG", **save_kwargs) -> dict:
    """An image as ``datasets.Image(decode=False)`` stores it: ``{"bytes", "path"}``."""
    buffer = io.BytesIO()
    image.save(buffer, format=format, **save_kwargs)
    return {"bytes": buffer.getvalue(), "path": None}


def uniform_png(colour, size=(16, 16)) -> dict:
    return png_value(Image.new("RGB", size, tuple(colour)))


def write_parquet(path: Path, rows: list[tuple[dict, int]], label_feature=None) -> Path:
    features = datasets.Features({"image": datasets.Image(), "label": label_feature or datasets.Value("int64")})
    images, labels = zip(*rows)
    datasets.Dataset.from_dict({"image": list(images), "label": list(labels)}, features=features).to_parquet(path)
    return path


# --------------------------------------------------------------------------------------------
# image folder through the data module


def test_image_folder_classes_batches_and_labels(image_folder, tmp_path):
    dm = make_module(tmp_path, path="imagefolder", data_dir=str(image_folder), batch_size=5)
    assert dm.num_classes == 3  # known right after construction, before setup
    assert dm.label_names == list(IMAGE_FOLDER_CLASSES)

    dm.setup("fit")
    assert len(dm.datasets["train"]) == 24 and len(dm.datasets["val"]) == 12  # the folder's own split

    train_batches = list(dm.train_dataloader())
    assert len(train_batches) == 4  # 24 // 5, last incomplete batch dropped
    val_batches = list(dm.val_dataloader())
    assert [len(batch["label"]) for batch in val_batches] == [5, 5, 2]
    for batch in train_batches + val_batches:
        assert set(batch) == {"image", "label"}
        assert batch["image"].dtype == torch.float32 and batch["label"].dtype == torch.long
        assert batch["image"].shape[1:] == (3, 32, 32)
        # The folder's class colours: red cat (0), green dog (1), blue fish (2).
        dominant_channel = to_pixels(batch["image"]).mean(dim=(2, 3)).argmax(dim=1)
        assert torch.equal(dominant_channel, batch["label"])

    # Labels follow the class folder names, row by row.
    raw = dm.datasets["train"].dataset
    for row in raw:
        assert Path(row["image"]["path"]).parent.name == dm.label_names[row["label"]]
    assert sorted(torch.cat([b["label"] for b in val_batches]).tolist()) == [0] * 4 + [1] * 4 + [2] * 4


def test_hold_out_is_seeded_deterministic_and_disjoint(image_folder, tmp_path):
    def held_out_paths(seed):
        dm = make_module(
            tmp_path, path="imagefolder", data_dir=str(image_folder), val_split=None, val_fraction=0.25, seed=seed
        )
        dm.setup("fit")
        paths = {role: [row["image"]["path"] for row in dm.datasets[role].dataset] for role in ("train", "val")}
        return paths["train"], paths["val"]

    train, val = held_out_paths(seed=0)
    assert len(val) == 6 and len(train) == 18
    assert not set(train) & set(val)
    assert len(set(train) | set(val)) == 24
    assert all("/train/" in path for path in val)  # held out of train, not taken from the validation folder
    assert held_out_paths(seed=0) == (train, val)
    assert set(held_out_paths(seed=1)[1]) != set(val)


def test_no_validation_split_and_no_hold_out_is_an_error(image_folder, tmp_path):
    dm = make_module(tmp_path, path="imagefolder", data_dir=str(image_folder), val_split="valid", val_fraction=0.0)
    with pytest.raises(SplitNotFoundError, match=r"'valid'.*\['train', 'validation'\].*val_split"):
        dm.setup("fit")


# --------------------------------------------------------------------------------------------
# other sources: parquet, save_to_disk, streaming, builtin


def test_parquet_with_integer_labels(tmp_path):
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250)]
    train = write_parquet(tmp_path / "train.parquet", [(uniform_png(colours[i % 3]), i % 3) for i in range(9)])
    val = write_parquet(tmp_path / "val.parquet", [(uniform_png(colours[i]), i) for i in (2, 0, 1)])
    dm = make_module(
        tmp_path, path="parquet", data_files={"train": str(train), "validation": str(val)}, image_size=16, crop_pct=1.0
    )
    assert dm.num_classes == 3 and dm.label_names == ["0", "1", "2"]  # counted: no ClassLabel

    batch = next(iter(dm.val_dataloader()))
    assert batch["label"].tolist() == [2, 0, 1]
    pixels = to_pixels(batch["image"])
    expected = torch.tensor([colours[2], colours[0], colours[1]], dtype=torch.float32).view(3, 3, 1, 1)
    assert torch.allclose(pixels, expected.expand_as(pixels), atol=0.5)


def test_save_to_disk_folder(image_folder, tmp_path):
    saved = tmp_path / "saved"
    loaded = datasets.load_dataset("imagefolder", data_dir=str(image_folder), cache_dir=str(tmp_path / "c"))
    loaded.save_to_disk(str(saved))
    dm = make_module(tmp_path, path=str(saved))
    assert dm.label_names == list(IMAGE_FOLDER_CLASSES)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 24 and len(dm.datasets["val"]) == 12
    batch = next(iter(dm.val_dataloader()))
    assert torch.equal(to_pixels(batch["image"]).mean(dim=(2, 3)).argmax(dim=1), batch["label"])

    # A single saved Dataset becomes the "train" split, validated on a hold-out.
    single = tmp_path / "single"
    loaded["validation"].save_to_disk(str(single))
    dm = make_module(tmp_path, path=str(single), val_fraction=0.25)
    dm.setup("fit")
    assert (len(dm.datasets["train"]), len(dm.datasets["val"])) == (9, 3)


def _gray_id_rows(ids):
    """Uniform gray images whose gray level 5 * id identifies the row; label id % 3."""
    return [(uniform_png((5 * i,) * 3, size=(16, 16)), i % 3) for i in ids]


def _ids_in(batches) -> list[int]:
    gray = to_pixels(torch.cat([batch["image"] for batch in batches])).mean(dim=(1, 2, 3))
    return torch.round(gray / 5).long().tolist()


@pytest.fixture
def no_arrow_shutdown_sleep(monkeypatch):
    """datasets sleeps 5 s after each shuffled pass over parquet shards (an Arrow thread-shutdown
    workaround); these tiny single-process streams do not need it."""
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


def test_streaming_parquet_is_split_across_ranks(tmp_path, no_arrow_shutdown_sleep):
    files = {
        "train": [
            str(write_parquet(tmp_path / "train-0.parquet", _gray_id_rows(range(0, 10)))),
            str(write_parquet(tmp_path / "train-1.parquet", _gray_id_rows(range(10, 20)))),
        ],
        "validation": str(write_parquet(tmp_path / "val.parquet", _gray_id_rows(range(20, 27)))),
    }
    seen = {}
    for rank in (0, 1):
        dm = make_module(
            tmp_path, path="parquet", data_files=files, streaming=True, image_size=16, crop_pct=1.0,
            color_jitter=None, drop_last=False, batch_size=3,
        )
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, current_epoch=0)
        with pytest.warns(UserWarning, match="reading the whole streamed split 'train'"):
            assert dm.num_classes == 3  # no ClassLabel: counted by reading the stream
        dm.setup("fit")
        assert isinstance(dm.datasets["train"], torch.utils.data.IterableDataset)
        train_loader = dm.train_dataloader()
        epoch_0 = [batch for batch in train_loader]
        assert all(torch.equal(torch.tensor(_ids_in([b])) % 3, b["label"]) for b in epoch_0)
        assert _ids_in(list(train_loader)) == _ids_in(epoch_0)  # same epoch: same order
        dm.trainer.current_epoch = 1
        seen[rank] = (set(_ids_in(epoch_0)), set(_ids_in(list(train_loader))), set(_ids_in(list(dm.val_dataloader()))))
        assert len(seen[rank][0]) == 10  # two shards over two ranks: one shard each

    for part, everything in ((0, range(20)), (1, range(20)), (2, range(20, 27))):
        assert not seen[0][part] & seen[1][part]
        assert seen[0][part] | seen[1][part] == set(everything)


@pytest.mark.filterwarnings("ignore:Label column .* is not a ClassLabel")
def test_streaming_reshuffles_each_epoch(tmp_path, no_arrow_shutdown_sleep):
    train = str(write_parquet(tmp_path / "train.parquet", _gray_id_rows(range(20))))
    dm = make_module(
        tmp_path, path="parquet", data_files={"train": train, "validation": train}, streaming=True, image_size=16,
        crop_pct=1.0, color_jitter=None, drop_last=False,
    )
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1, current_epoch=0)
    loader = dm.train_dataloader()
    epoch_0 = _ids_in(list(loader))
    dm.trainer.current_epoch = 1
    epoch_1 = _ids_in(list(loader))
    assert sorted(epoch_0) == sorted(epoch_1) == list(range(20))
    assert epoch_0 != epoch_1


@pytest.mark.filterwarnings("ignore:Label column .* is not a ClassLabel")
def test_streaming_corrupt_image_raises_or_is_left_out(tmp_path, no_arrow_shutdown_sleep):
    rows = _gray_id_rows(range(6))
    rows[3] = ({"bytes": b"not an image", "path": None}, 0)
    train = str(write_parquet(tmp_path / "train.parquet", rows))
    files = {"train": train, "validation": train}
    options = dict(path="parquet", data_files=files, streaming=True, image_size=16, crop_pct=1.0, drop_last=False)
    with pytest.raises(CorruptImageError, match="index 3 of split 'validation'"):
        list(make_module(tmp_path, **options).val_dataloader())
    dm = make_module(tmp_path, skip_corrupt=True, **options)
    with pytest.warns(UserWarning, match="Corrupt image at index 3"):
        assert sorted(_ids_in(list(dm.val_dataloader()))) == [0, 1, 2, 4, 5]
    assert dm.num_skipped == 1


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("digits_cache")


def test_builtin_digits_match_sklearn(digits_cache):
    from sklearn.datasets import load_digits

    digits = load_digits()
    dm = ImageClassificationDataModule(
        path="builtin:digits", cache_dir=str(digits_cache), image_size=32, num_workers=0, pin_memory=False, batch_size=16
    )
    assert dm.num_classes == 10 and dm.label_names == [str(d) for d in range(10)]
    dm.setup("fit")
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) == 1797
    assert len(dm.datasets["val"]) == 180  # val_fraction 0.1 held out: digits have no validation split

    train = open_dataset("builtin:digits", cache_dir=str(digits_cache), split="train")
    assert len(train) == 1797
    paths = [value["path"] for value in train.cast_column("image", datasets.Image(decode=False))["image"]]
    indices = np.array([int(Path(path).stem) for path in paths])
    assert sorted(indices.tolist()) == list(range(1797))
    assert np.array_equal(np.array(train["label"]), digits.target[indices])  # label names are the digits
    for row in (0, 1000, 1796):
        image = np.asarray(train[row]["image"])
        assert image.shape == (32, 32)
        assert np.array_equal(image[::4, ::4], np.rint(digits.images[indices[row]] * 255 / 16).astype(np.uint8))

    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (16, 3, 32, 32)
    pixels = to_pixels(batch["image"])
    assert torch.allclose(pixels[:, 0], pixels[:, 2], atol=1e-3)  # grayscale: equal channels


def test_builtin_is_written_once_and_atomically(tmp_path, monkeypatch):
    calls = []

    def write_tiny(folder: Path) -> None:
        calls.append(folder)
        for index in range(3):
            (folder / "train" / "a").mkdir(parents=True, exist_ok=True)
            Image.new("L", (4, 4), 10 * index).save(folder / "train" / "a" / f"{index}.png")
            threading.Event().wait(0.05)  # let a racing writer overlap

    monkeypatch.setitem(embedded.BUILTIN_DATASETS, "tiny", write_tiny)
    results = []
    def materialize():
        results.append(embedded.materialize("builtin:tiny", cache_dir=tmp_path))

    threads = [threading.Thread(target=materialize) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [tmp_path / "tiny-v1"] * 2
    assert sorted(p.name for p in (tmp_path / "tiny-v1" / "train" / "a").iterdir()) == ["0.png", "1.png", "2.png"]
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-v1"]  # no staging folder left behind
    embedded.materialize("builtin:tiny", cache_dir=tmp_path)
    assert len(calls) <= 2  # the third call reuses the folder

    monkeypatch.setenv(embedded.CACHE_ENV_VARIABLE, str(tmp_path / "env"))
    assert embedded.materialize("builtin:tiny") == tmp_path / "env" / "tiny-v1"


def test_unknown_builtin_lists_known_names(tmp_path):
    with pytest.raises(DataError, match=r"builtin:nope.*'builtin:digits'"):
        make_module(tmp_path, path="builtin:nope").num_classes


# --------------------------------------------------------------------------------------------
# user errors


def test_missing_data_dir_and_local_path(tmp_path):
    missing = tmp_path / "no_such_folder"
    with pytest.raises(DataNotFoundError, match=str(missing)) as error:
        make_module(tmp_path, path="imagefolder", data_dir=str(missing)).num_classes
    assert "data_dir" in str(error.value)
    with pytest.raises(DataNotFoundError, match=str(missing)):
        make_module(tmp_path, path=str(missing)).num_classes
    with pytest.raises(DataNotFoundError, match="missing.parquet"):
        open_dataset("parquet", data_files={"train": str(tmp_path / "missing.parquet")})


def test_datasets_errors_are_wrapped_with_the_cause(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="Cannot open dataset path='imagefolder'") as error:
        open_dataset("imagefolder", data_dir=str(tmp_path / "empty"), cache_dir=str(tmp_path / "c"))
    assert isinstance(error.value.__cause__, FileNotFoundError)  # datasets' own error, chained


def test_missing_split_names_available_splits_and_argument(image_folder, tmp_path):
    dm = make_module(tmp_path, path="imagefolder", data_dir=str(image_folder), train_split="training")
    with pytest.raises(SplitNotFoundError, match=r"'training'.*\['train', 'validation'\].*`train_split`"):
        dm.num_classes
    dm = make_module(tmp_path, path="imagefolder", data_dir=str(image_folder), test_split="test")
    with pytest.raises(SplitNotFoundError, match=r"`test_split`"):
        dm.setup("test")
    with pytest.raises(DataError, match="test_split"):
        make_module(tmp_path, path="imagefolder", data_dir=str(image_folder)).setup("test")


@pytest.mark.parametrize("argument,column", [("label_column", "target"), ("image_column", "img")])
def test_missing_column_names_available_columns_and_argument(image_folder, tmp_path, argument, column):
    dm = make_module(tmp_path, path="imagefolder", data_dir=str(image_folder), **{argument: column})
    with pytest.raises(ColumnNotFoundError, match=rf"'{column}'.*\['image', 'label'\].*`{argument}`"):
        dm.setup("fit")


def test_label_out_of_range_names_value_row_and_column(tmp_path):
    colour = (10, 20, 30)
    train = write_parquet(tmp_path / "train.parquet", [(uniform_png(colour), i % 3) for i in range(6)])
    val = write_parquet(tmp_path / "val.parquet", [(uniform_png(colour), label) for label in (0, 1, 7, 2, 9)])
    dm = make_module(tmp_path, path="parquet", data_files={"train": str(train), "validation": str(val)})
    assert dm.num_classes == 3
    expected = r"Label 7 at row 2 of column 'label' in split 'validation'.*\[0, 3\); 2 row"
    with pytest.raises(InvalidLabelError, match=expected):
        dm.setup("fit")

    unlabelled = write_parquet(tmp_path / "test.parquet", [(uniform_png(colour), -1)] * 2)
    files = {"train": str(train), "validation": str(train), "test": str(unlabelled)}
    dm = make_module(tmp_path, path="parquet", data_files=files, test_split="test", predict_split="test")
    with pytest.raises(InvalidLabelError, match=r"Label -1 .*predict_split"):
        dm.setup("test")
    dm.setup("predict")  # unlabelled data is fine for prediction
    assert next(iter(dm.predict_dataloader()))["label"].tolist() == [-1, -1]


def _add_truncated_png(image_folder: Path) -> Path:
    good = next((image_folder / "train" / "dog").iterdir()).read_bytes()
    broken = image_folder / "train" / "dog" / "broken.png"
    broken.write_bytes(good[: len(good) // 2])
    return broken


def test_corrupt_image_raises_naming_the_file(image_folder, tmp_path):
    _add_truncated_png(image_folder)
    dm = make_module(tmp_path, path="imagefolder", data_dir=str(image_folder), batch_size=25)
    dm.setup("fit")
    with pytest.raises(CorruptImageError, match=r"broken\.png.*split 'train'|split 'train'.*broken\.png") as error:
        list(dm.train_dataloader())
    assert "skip_corrupt" in str(error.value)


def test_skip_corrupt_skips_and_counts_across_workers(image_folder, tmp_path):
    _add_truncated_png(image_folder)
    dm = make_module(
        tmp_path, path="imagefolder", data_dir=str(image_folder), batch_size=5, num_workers=2, skip_corrupt=True,
        drop_last=False,
    )
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 25
    batches = list(dm.train_dataloader())
    # The broken image's slot is filled by the next readable example: batch sizes do not change.
    assert [len(batch["label"]) for batch in batches] == [5] * 5
    assert dm.num_skipped == 1  # counted in a worker process, seen here


# --------------------------------------------------------------------------------------------
# image modes


def test_grayscale_and_alpha_convert_to_rgb():
    assert np.asarray(read_rgb_image(png_value(Image.new("L", (2, 2), 77)))).tolist() == [[[77] * 3] * 2] * 2
    la = Image.fromarray(np.array([[[100, 0], [100, 255], [100, 128]]], np.uint8), mode="LA")
    # alpha composited over white: 0 -> white, 255 -> the value, 128 -> (100*128 + 255*127) / 255
    assert np.asarray(read_rgb_image(png_value(la)))[0, :, 0].tolist() == [255, 100, 177]
    rgba = Image.fromarray(np.array([[[10, 20, 30, 255], [10, 20, 30, 0]]], np.uint8), mode="RGBA")
    assert np.asarray(read_rgb_image(png_value(rgba)))[0].tolist() == [[10, 20, 30], [255, 255, 255]]
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 50])
    palette.putpixel((1, 0), 1)
    converted = read_rgb_image(png_value(palette, transparency=0))
    assert converted.mode == "RGB" and np.asarray(converted)[0].tolist() == [[255, 255, 255], [200, 100, 50]]


def test_16_bit_images_are_scaled_not_clipped():
    value = png_value(Image.fromarray(np.array([[0, 257 * 128, 65535]], dtype=np.uint16)))
    reopened = Image.open(io.BytesIO(value["bytes"]))
    assert reopened.mode.startswith("I")
    assert np.asarray(reopened.convert("RGB"))[0, 1, 0] == 255  # what PIL's convert would give
    assert np.asarray(read_rgb_image(value))[0, :, 0].tolist() == [0, 128, 255]


def test_cmyk_converts_to_rgb():
    cmyk = Image.new("CMYK", (3, 1))
    cmyk.putpixel((1, 0), (255, 0, 0, 0))  # cyan
    cmyk.putpixel((2, 0), (0, 0, 0, 255))  # black
    converted = np.asarray(read_rgb_image(png_value(cmyk, format="TIFF")))
    assert converted[0].tolist() == [[255, 255, 255], [0, 255, 255], [0, 0, 0]]


def _exif_rotated_png(width=3, height=2) -> dict:
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[0, 0] = (255, 0, 0)  # red top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return png_value(Image.fromarray(pixels), exif=exif)


def test_exif_orientation_is_applied():
    upright = read_rgb_image(_exif_rotated_png())
    assert upright.size == (2, 3)  # width and height swapped
    assert np.asarray(upright)[0, 1].tolist() == [255, 0, 0]  # top-left went to top-right
    assert np.asarray(upright)[..., 0].sum() == 255


def test_data_module_uses_the_conversions(tmp_path):
    folder = tmp_path / "modes" / "train"
    for name in ("a", "b"):
        (folder / name).mkdir(parents=True)
    Image.fromarray(np.full((16, 16), 257 * 100, np.uint16)).save(folder / "a" / "gray16.png")
    pixels = np.zeros((16, 32, 3), np.uint8)
    pixels[:, :16] = (250, 0, 0)  # left half red, right half blue as stored
    pixels[:, 16:] = (0, 0, 250)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(folder / "b" / "rotated.png", exif=exif)
    dm = make_module(
        tmp_path, path="imagefolder", data_dir=str(folder.parent), val_split="train", image_size=16, crop_pct=1.0
    )
    batch = next(iter(dm.val_dataloader()))
    gray, rotated = to_pixels(batch["image"])
    assert torch.allclose(gray, torch.full_like(gray, 100.0), atol=0.5)  # scaled from 16 bits, not clipped to 255
    # Upright (rotated 90 degrees clockwise): red on top, blue at the bottom.
    assert rotated[0, :6].mean() > 240 and rotated[2, :6].mean() < 10
    assert rotated[2, -6:].mean() > 240 and rotated[0, -6:].mean() < 10


# --------------------------------------------------------------------------------------------
# transforms


def test_eval_transform_resizes_and_centre_crops():
    transform = create_classification_transforms(32, training=False, crop_pct=0.875)
    image = Image.new("RGB", (64, 48), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 8, 48))  # a blue band that the centre crop cuts away
    output = transform(image)
    assert output.shape == (3, 32, 32)
    assert torch.allclose(to_pixels(output)[:, 4:-4, 4:-4].mean(dim=(1, 2)), torch.tensor([255.0, 0.0, 0.0]), atol=1.0)
    with pytest.raises(ValueError, match="random"):
        create_classification_transforms(32, training=False, interpolation="random")


def test_train_transform_options_reach_timm():
    options = dict(ratio=(1.0, 1.0), color_jitter=None, interpolation="nearest")
    transform = create_classification_transforms(40, training=True, scale=(0.5, 0.5), **options)
    crop = transform.transforms[0]
    assert crop.scale == (0.5, 0.5) and crop.ratio == (1.0, 1.0) and crop.size == (40, 40)
    assert transform.transforms[1].p == 0.5  # default hflip

    # Whole-image crop and certain flips: the output is the image turned upside down.
    pixels = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    transform = create_classification_transforms(40, training=True, scale=(1.0, 1.0), hflip=1.0, vflip=1.0, **options)
    output = to_pixels(transform(Image.fromarray(pixels)))
    expected = torch.from_numpy(pixels[::-1, ::-1].copy()).permute(2, 0, 1).float()
    assert torch.allclose(output, expected, atol=0.01)


def _posterize_op(transform):
    randaugment = next(t for t in transform.transforms if isinstance(t, RandAugment))
    return next(op for op in randaugment.ops if op.name == "PosterizeIncreasing")


def test_posterize_at_zero_bits_no_longer_crashes():
    image = Image.fromarray(np.random.default_rng(0).integers(1, 256, (8, 8, 3), dtype=np.uint8))

    # Plain timm at magnitude 10 asks Pillow for 0 bits, which this Pillow refuses.
    plain = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    assert plain.level_fn(10, plain.hparams) == (0,)
    with pytest.raises(ValueError, match="bits must be between"):
        plain(image)

    transform = create_classification_transforms(16, training=True, auto_augment="rand-m9-mstd0.5-inc1")
    ours = _posterize_op(transform)
    ours.prob, ours.magnitude, ours.magnitude_std = 1.0, 10, 0.0
    assert np.asarray(ours(image)).max() == 0  # 0 bits kept: every bit cleared, as old Pillow did
    ours.magnitude = 5  # 4 - int(0.5 * 4) = 2 bits kept: unchanged semantics
    assert np.array_equal(np.asarray(ours(image)), np.asarray(ImageOps.posterize(image, 2)))
    assert make_posterize_safe(create_transform(16, is_training=True, auto_augment="rand-m9-mstd0.5-inc1")) == 1


def _run_seeded(transform, image, seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return transform(image)


def test_paper_train_transform_runs_many_times():
    options = dict(scale=(0.08, 1.0), hflip=0.5, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, re_mode="pixel")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8))
    plain = create_transform(16, is_training=True, interpolation="random", **options)
    ours = create_classification_transforms(16, training=True, interpolation="random", **options)

    seeds = range(1000)
    crashed = []
    for seed in seeds:
        try:
            expected = _run_seeded(plain, image, seed)
        except ValueError as error:
            assert "bits must be" in str(error)
            crashed.append(seed)
            continue
        if seed % 100 == 0:  # where plain timm works, ours gives the very same output
            assert torch.equal(_run_seeded(ours, image, seed), expected)
    assert crashed, "these seeds should reach posterize at magnitude 10 with plain timm"

    for seed in seeds:
        output = _run_seeded(ours, image, seed)
        assert output.shape == (3, 16, 16) and torch.isfinite(output).all()
