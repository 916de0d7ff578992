"""A catalogue of bad arguments and silent no-ops, fed to the real CLI, tasks and data modules.

Each must stop with an error that names the key and the value at fault and says what to do, before
any training step: wrong names and values when the task or the data module is built, settings that
would train nothing (or train wrongly without a word) when ``fit`` starts.
"""

from __future__ import annotations

import csv
import io
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import IMAGE_FOLDER_CLASSES, write_ade20k_folder, write_image_folder
from helpers import small_run_args
from lightning.pytorch import Trainer
from PIL import Image
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from mambaout_pl.cli import main, run_cli
from mambaout_pl.data import DataError, ImageClassificationDataModule, InvalidLabelError, SegmentationDataModule
from mambaout_pl.models import create_model
from mambaout_pl.tasks import ClassificationTask, SegmentationTask

ROOT = Path(__file__).parents[1]
RECIPE = ROOT / "recipes" / "quickstart.yaml"
TINY_BACKBONE = {"depths": [1, 1, 1, 1], "dims": [8, 8, 16, 16]}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes, 8 training and 4 validation images each."""
    return write_image_folder(tmp_path_factory.mktemp("images"))


def fit_args(root: Path, image_folder: Path, *extra: str, command: str = "fit") -> list[str]:
    return [
        command,
        f"--config={RECIPE}",
        *small_run_args(root, image_folder),
        "--data.image_size=32",
        f"--model.backbone_args={TINY_BACKBONE}".replace("'", '"'),
        *extra,
    ]


def empty_class_folder(root: Path, images: Path, scratch: Path) -> list[str]:
    folder = Path(shutil.copytree(images, scratch / "with_empty_class"))
    (folder / "train" / "bird").mkdir()
    return fit_args(root, folder)


def one_class_folder(root: Path, images: Path, scratch: Path) -> list[str]:
    for split in ("train", "validation"):
        shutil.copytree(images / split / "cat", scratch / "one_class" / split / "cat")
    return fit_args(root, scratch / "one_class")


def integer_weights(root: Path, images: Path, scratch: Path) -> list[str]:
    model = create_model("mambaout_femto", num_classes=3, **TINY_BACKBONE)
    path = scratch / "integer.safetensors"
    save_file({key: (value * 1000).long() for key, value in model.state_dict().items()}, str(path))
    return fit_args(root, images, f"--model.pretrained={path}")


# Each case: (id, arguments built from (root, image folder, scratch folder), expected error, pattern
# its message must match: the key, the value and the fix). jsonargparse reports an error raised by a
# constructor it calls as a ValueError that quotes the message.
Builder = Callable[[Path, Path, Path], list[str]]
BUILD_CASES: list[tuple[str, Builder, type[BaseException], str]] = [
    (
        "misspelt optimizer",
        lambda r, i, s: fit_args(r, i, "--model.optimizer=adamwx"),
        ValueError,
        r"optimizer='adamwx' is not a timm optimizer\. Close names: \['adamw'.*list_optimizers\(\)",
    ),
    (
        "misspelt scheduler",
        lambda r, i, s: fit_args(r, i, "--model.scheduler=cosin"),
        ValueError,
        r"scheduler='cosin' is not one of \['cosine', 'tanh', .*'poly'",
    ),
    (
        "plateau scheduler",
        lambda r, i, s: fit_args(r, i, "--model.scheduler=plateau"),
        ValueError,
        r"scheduler='plateau' is not one of .*steps once per epoch",
    ),
    (
        "negative lr",
        lambda r, i, s: fit_args(r, i, "--model.lr=-0.002"),
        ValueError,
        r"lr=-0\.002 must be a finite number above 0",
    ),
    (
        "zero lr",
        lambda r, i, s: fit_args(r, i, "--model.lr=0"),
        ValueError,
        r"lr=0(\.0)? must be a finite number above 0",
    ),
    (
        "image_size 0",
        lambda r, i, s: fit_args(r, i, "--data.image_size=0"),
        ValueError,
        r"image_size=0 must be a positive number of pixels",
    ),
    (
        "drop_path_rate 1.5",
        lambda r, i, s: fit_args(r, i, "--model.drop_path_rate=1.5"),
        ValueError,
        r"drop_path_rate=1\.5 must be in \[0, 1\)",
    ),
    (
        "reversed crop scale",
        lambda r, i, s: fit_args(r, i, "--data.scale=[1.0,0.08]"),
        ValueError,
        r"scale=\[1\.0, 0\.08\] must be \[smallest, largest\] .*0 < smallest <= largest <= 1",
    ),
    (
        "reversed crop ratio",
        lambda r, i, s: fit_args(r, i, "--data.ratio=[1.33,0.75]"),
        ValueError,
        r"ratio=\[1\.33, 0\.75\] must be \[smallest, largest\]",
    ),
    (
        "label column given as the image column",
        lambda r, i, s: fit_args(r, i, "--data.label_column=image"),
        ValueError,
        r"label_column='image' is also the image_column: set `label_column`",
    ),
    (
        "misspelt RandAugment section",
        lambda r, i, s: fit_args(r, i, "--data.auto_augment=rand-m9-mstd0.5-incl"),
        ValueError,
        r"auto_augment='rand-m9-mstd0\.5-incl': section 'incl' is not part of timm's 'rand' grammar.*inc<number>",
    ),
    (
        "misspelt auto-augment policy",
        lambda r, i, s: fit_args(r, i, "--data.auto_augment=randaug-m9"),
        ValueError,
        r"auto_augment='randaug-m9': policy 'randaug' is not one of 'rand'",
    ),
    ("one-class folder", one_class_folder, DataError, r"one_class' has only one class folder \('cat'\).*at least two"),
    (
        "empty class folder",
        empty_class_folder,
        DataError,
        r"Class folder '.*train/bird' holds no images, so class 'bird' would be left out.*remove the folder",
    ),
    (
        "integer tensors as float weights",
        integer_weights,
        ValueError,
        r"integer\.safetensors' holds integer or boolean tensors for floating-point parameters: head\.fc\.bias "
        r"\(torch\.int64\).*Re-export the weights as floating point",
    ),
]


@pytest.mark.parametrize(
    ("build", "error", "pattern"), [case[1:] for case in BUILD_CASES], ids=[c[0] for c in BUILD_CASES]
)
def test_bad_argument_stops_the_cli_when_building_and_writes_nothing(
    build: Builder, error: type[BaseException], pattern: str, images: Path, tmp_path: Path
) -> None:
    root, scratch = tmp_path / "runs", tmp_path / "scratch"
    scratch.mkdir()
    with pytest.raises(error) as raised:
        run_cli(build(root, images, scratch))
    message = str(raised.value)
    assert re.search(pattern, message, flags=re.DOTALL), message
    assert not root.exists()  # refused before the Trainer made any folder


# Settings accepted when built but that would train nothing, or train wrongly, once fit starts.
FIT_CASES: list[tuple[str, list[str], type[BaseException], str]] = [
    ("max_epochs 0", ["--trainer.max_epochs=0"], ValueError, r"trainer\.max_epochs=0 trains nothing: set it"),
    ("max_steps 0", ["--trainer.max_steps=0"], ValueError, r"trainer\.max_steps=0 trains nothing"),
    (
        "split smaller than one batch",
        ["--data.batch_size=32"],
        DataError,
        r"No training batches: the training split \('train'\) has 24 examples, fewer than batch_size=32, and "
        r"drop_last=true .*Lower `batch_size`.*`drop_last` to false",
    ),
    (
        "Mixup with an odd batch size",
        ["--model.mixup_alpha=0.8", "--data.batch_size=3"],
        ValueError,
        r"needs an even data\.batch_size, got 3: set data\.batch_size to 4 or 2",
    ),
    (
        "CutMix without drop_last, odd last batch",
        ["--model.cutmix_alpha=1.0", "--data.drop_last=false", "--data.val_split=null", "--data.val_fraction=0.2"],
        ValueError,
        r"drop_last=false its last batch holds 3 of the 19 training examples.*Set data\.drop_last to true",
    ),
    (
        "streaming without a length",
        ["--data.streaming=true", "--trainer.limit_train_batches=1.0"],
        ValueError,
        r"neither trainer\.limit_train_batches nor trainer\.max_steps is set.*Set trainer\.limit_train_batches",
    ),
]


@pytest.mark.parametrize(("extra", "error", "pattern"), [case[1:] for case in FIT_CASES], ids=[c[0] for c in FIT_CASES])
def test_fit_that_would_train_nothing_or_wrongly_stops_before_the_first_step(
    extra: list[str], error: type[BaseException], pattern: str, images: Path, tmp_path: Path
) -> None:
    root = tmp_path / "runs"
    with pytest.raises(error) as raised:
        run_cli(fit_args(root, images, *extra))
    assert re.search(pattern, str(raised.value), flags=re.DOTALL), str(raised.value)
    assert not list(root.rglob("*.ckpt"))


def test_streaming_with_a_batch_limit_trains_on_the_full_schedule(images: Path, tmp_path: Path) -> None:
    """The legitimate streaming setting still trains, its schedule decaying over the capped epochs."""
    main(
        fit_args(
            tmp_path,
            images,
            "--data.streaming=true",
            "--trainer.limit_train_batches=2",
            "--trainer.max_epochs=2",
            "--trainer.limit_val_batches=0",
            "--model.warmup_epochs=0",
            "--model.min_lr=0",
        )
    )
    checkpoint = torch.load(next(tmp_path.rglob("last.ckpt")), map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 4
    assert checkpoint["lr_schedulers"][0]["t_initial"] == 4  # 2 updates per epoch over 2 epochs, not 2 updates


# ---------------------------------------------------------------------------------------------
# predictions


def test_classification_predict_writes_a_csv_row_per_image(images: Path, tmp_path: Path) -> None:
    predictions = tmp_path / "predictions"
    main(
        fit_args(
            tmp_path, images, "--data.predict_split=validation", f"--model.predict_dir={predictions}", command="predict"
        )
    )
    with (predictions / "predictions.csv").open() as file:
        rows = list(csv.DictReader(file))
    expected_files = sorted(str(path) for path in (images / "validation").rglob("*.png"))
    assert [row["index"] for row in rows] == [str(index) for index in range(len(expected_files))]
    assert sorted(row["file"] for row in rows) == expected_files
    for row in rows:
        assert row["label_name"] == IMAGE_FOLDER_CLASSES[int(row["class_index"])]
        assert 1 / 3 <= float(row["probability"]) <= 1.0  # the most likely of 3 classes


class UnwrittenTask(ClassificationTask):
    """A task whose predictions nothing writes."""

    def configure_callbacks(self) -> list:
        return []


def test_predict_without_a_writer_warns_that_nothing_is_written(tmp_path: Path) -> None:
    task = UnwrittenTask(num_classes=3, backbone_args=TINY_BACKBONE)
    trainer = Trainer(default_root_dir=tmp_path, accelerator="cpu", enable_progress_bar=False, logger=False)
    with pytest.warns(UserWarning, match=r"UnwrittenTask: no prediction writer is set.*BasePredictionWriter"):
        trainer.predict(task, DataLoader([{"image": torch.zeros(3, 32, 32)}] * 2, batch_size=2))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# segmentation: label maps that went through JPEG, and the same checks of the arguments


def encoded(array: np.ndarray, format: str) -> dict[str, bytes | None]:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=format)
    return {"bytes": buffer.getvalue(), "path": None}


def test_label_maps_stored_as_jpeg_are_refused_naming_the_row(tmp_path: Path) -> None:
    labels = np.repeat((np.arange(32) * 3 // 32).astype(np.uint8)[None], 24, axis=0)  # classes 0, 1, 2: all valid
    image = np.stack([labels * 80] * 3, axis=-1)
    features = datasets.Features({"image": datasets.Image(), "mask": datasets.Image()})
    files = {}
    for split in ("train", "validation"):
        files[split] = str(tmp_path / f"{split}.parquet")
        rows = {"image": [encoded(image, "PNG")] * 2, "mask": [encoded(labels, "JPEG")] * 2}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(files[split])
    data = SegmentationDataModule(
        path="parquet",
        data_files=files,
        num_classes=3,
        crop_size=16,
        resize_scale=(32, 16),
        batch_size=2,
        num_workers=0,
        pin_memory=False,
        cache_dir=str(tmp_path / "cache"),
    )
    with pytest.raises(InvalidLabelError, match=r"Label map row 0 of split 'validation' is stored as JPEG.*as PNG"):
        next(iter(data.val_dataloader()))


def test_a_jpeg_annotation_file_is_refused_naming_it(tmp_path: Path) -> None:
    folder = write_ade20k_folder(tmp_path / "ade")
    annotation = folder / "annotations" / "training" / "ADE_training_00000001.png"
    Image.open(annotation).save(annotation.with_suffix(".jpg"))
    annotation.unlink()
    data = SegmentationDataModule(
        path="ade20k",
        data_dir=str(folder),
        reduce_zero_label=True,
        crop_size=16,
        num_workers=0,
        cache_dir=str(tmp_path / "cache"),
    )
    with pytest.raises(InvalidLabelError, match=r"ADE_training_00000001\.jpg' is not a PNG.*Save them as PNG"):
        data.setup("fit")


@pytest.mark.parametrize(
    ("arguments", "pattern"),
    [
        ({"mask_column": "image"}, r"mask_column='image' is also the image_column"),
        ({"num_classes": 0}, r"num_classes=0 must be >= 1"),
    ],
    ids=["mask column given as the image column", "zero classes"],
)
def test_bad_segmentation_data_arguments_fail_when_built(arguments: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        SegmentationDataModule(**arguments)


@pytest.mark.parametrize(
    ("arguments", "pattern"),
    [
        ({"drop_path_rate": 1.0}, r"drop_path_rate=1\.0 must be in \[0, 1\)"),
        ({"optimizer": "adamw_8bit"}, r"optimizer='adamw_8bit' is not a timm optimizer"),
        ({"lr": float("nan")}, r"lr=nan must be a finite number above 0"),
    ],
    ids=["drop_path_rate 1", "unknown optimizer", "lr nan"],
)
def test_bad_segmentation_task_arguments_fail_when_built(arguments: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        SegmentationTask(backbone="mambaout_femto", backbone_args=TINY_BACKBONE, **arguments)


def test_good_optimizer_and_policy_spellings_are_accepted() -> None:
    """The checks accept what timm accepts: lookahead prefixes, upper case, every grammar section."""
    ImageClassificationDataModule(auto_augment="rand-m9-n2-mstd0.5-mmax10-inc1-p0.5-tweights", image_size=16)
    ImageClassificationDataModule(auto_augment="augmix-m5-w4-d2-a1.0-b1", image_size=16)
    ImageClassificationDataModule(auto_augment="originalr-mstd0.5", image_size=16)
    for optimizer in ("lookahead_adamw", "SGD", "lamb"):
        SegmentationTask(
            backbone="mambaout_femto",
            backbone_args=TINY_BACKBONE,
            optimizer=optimizer,
            aux_head=False,
            decode_channels=8,
        )


def test_cutmix_without_drop_last_trains_when_every_batch_is_even(images: Path, tmp_path: Path) -> None:
    """24 examples in batches of 4: no odd last batch, so ``drop_last=false`` is fine."""
    main(
        fit_args(
            tmp_path, images, "--model.cutmix_alpha=1.0", "--data.drop_last=false", "--trainer.limit_val_batches=0"
        )
    )
    checkpoint = torch.load(next(tmp_path.rglob("last.ckpt")), map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2
