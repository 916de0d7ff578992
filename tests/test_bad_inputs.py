"""A catalogue of bad inputs fed to the real CLI and data modules.

Each must stop the command with exit status 2 and, as the last line of stderr, ``error: <message>``
naming the file, key or value at fault (no traceback, no usage text), and must leave an earlier run
in the same root folder as it was. Images in unusual formats must be converted, not refused.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import yaml
from conftest import IMAGE_FOLDER_COLOURS, write_ade20k_folder, write_image_folder
from helpers import small_run_args
from PIL import Image

from mambaout_pl.cli import main, run_cli
from mambaout_pl.command_errors import user_error
from mambaout_pl.data import (
    ColumnNotFoundError,
    CorruptImageError,
    DataError,
    DataNotFoundError,
    ImageClassificationDataModule,
    InvalidLabelError,
    SegmentationDataModule,
    SplitNotFoundError,
)
from mambaout_pl.errors import CheckpointError, CheckpointMismatchError, OutputPathError

ROOT = Path(__file__).parents[1]
RECIPE = ROOT / "recipes" / "quickstart.yaml"
TINY_BACKBONE = '{"depths": [1, 1, 1, 1], "dims": [8, 8, 16, 16]}'
OTHER_BACKBONE = '{"depths": [1, 1, 1, 1], "dims": [8, 8, 16, 24]}'


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def checkpoint(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real classification checkpoint of one training step."""
    root = tmp_path_factory.mktemp("earlier_fit")
    run_cli(fit_args(root, images, "--trainer.limit_train_batches=1"))
    return root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"


def fit_args(root: Path, image_folder: Path, *extra: str) -> list[str]:
    return [
        "fit",
        f"--config={RECIPE}",
        *small_run_args(root, image_folder),
        "--data.image_size=32",
        f"--model.backbone_args={TINY_BACKBONE}",
        *extra,
    ]


def earlier_run(root: Path) -> dict[Path, bytes]:
    """Files of an earlier run in ``root``, by path, with their bytes."""
    run = root / "lightning_logs" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    files = {run / "config.yaml": b"seed_everything: 0\n", run / "checkpoints" / "last.ckpt": b"earlier checkpoint"}
    for path, content in files.items():
        path.write_bytes(content)
    return files


def png_bytes(image: Image.Image, format: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **kwargs)
    return buffer.getvalue()


# Each case: (id, build the arguments from (root, image folder, scratch folder, checkpoint), expected
# error, pattern its message must match). Files the case needs are written by the builder.
Builder = Callable[[Path, Path, Path, Path], list[str]]


def copy_images(images: Path, scratch: Path) -> Path:
    import shutil

    return Path(shutil.copytree(images, scratch / "copy"))


def truncated_image(root: Path, images: Path, scratch: Path, checkpoint: Path, skip: bool = False) -> list[str]:
    folder = copy_images(images, scratch)
    broken = folder / "validation" / "cat" / "cat_0.png"  # validated first: in the sanity check
    broken.write_bytes(broken.read_bytes()[:60])
    return fit_args(root, folder, *(["--data.skip_corrupt=true"] if skip else []))


def not_an_image(root: Path, images: Path, scratch: Path, checkpoint: Path) -> list[str]:
    folder = copy_images(images, scratch)
    (folder / "validation" / "cat" / "a_notes.png").write_text("this is not an image")
    return fit_args(root, folder)


def empty_split(root: Path, images: Path, scratch: Path, checkpoint: Path) -> list[str]:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    image = {"bytes": png_bytes(Image.new("RGB", (8, 8), (200, 0, 0))), "path": None}
    files = {"train": str(scratch / "train.parquet"), "validation": str(scratch / "validation.parquet")}
    datasets.Dataset.from_dict({"image": [image] * 4, "label": [0, 1, 0, 1]}, features=features).to_parquet(
        files["train"]
    )
    datasets.Dataset.from_dict({"image": [], "label": []}, features=features).to_parquet(files["validation"])
    return fit_args(
        root, images, "--data.path=parquet", "--data.data_dir=null", f"--data.data_files={json.dumps(files)}"
    )


def labels_out_of_range(root: Path, images: Path, scratch: Path, checkpoint: Path) -> list[str]:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    image = {"bytes": png_bytes(Image.new("RGB", (8, 8), (0, 200, 0))), "path": None}
    files = {}
    for split, labels in (("train", [0, 1, 2, 0]), ("validation", [0, 7])):
        files[split] = str(scratch / f"{split}.parquet")
        datasets.Dataset.from_dict({"image": [image] * len(labels), "label": labels}, features=features).to_parquet(
            files[split]
        )
    return fit_args(
        root, images, "--data.path=parquet", "--data.data_dir=null", f"--data.data_files={json.dumps(files)}"
    )


def recipe_with_wrong_type(root: Path, images: Path, scratch: Path, checkpoint: Path) -> list[str]:
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["trainer"]["max_epochs"] = "many"
    path = scratch / "bad_recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return ["fit", f"--config={path}", f"--trainer.default_root_dir={root}"]


def checkpoint_of_another_task(root: Path, images: Path, scratch: Path, checkpoint: Path) -> list[str]:
    content = torch.load(checkpoint, map_location="cpu", weights_only=True)
    content["mambaout_pl"]["task"] = "mambaout_pl.tasks.segmentation.SegmentationTask"
    other = scratch / "segmentation.ckpt"
    torch.save(content, other)
    return fit_args(root, images, f"--ckpt_path={other}")


def checkpoint_with_wrong_keys(root: Path, images: Path, scratch: Path, checkpoint: Path) -> list[str]:
    content = torch.load(checkpoint, map_location="cpu", weights_only=True)
    content["state_dict"] = {key.replace("model.", "network."): value for key, value in content["state_dict"].items()}
    renamed = scratch / "renamed_keys.ckpt"
    torch.save(content, renamed)
    return fit_args(root, images, f"--ckpt_path={renamed}")


def plain_weights_as_checkpoint(root: Path, images: Path, scratch: Path, checkpoint: Path) -> list[str]:
    weights = scratch / "weights.pth"
    torch.save({"head.fc.weight": torch.zeros(3, 16)}, weights)
    return fit_args(root, images, f"--ckpt_path={weights}")


def pickled_checkpoint(root: Path, images: Path, scratch: Path, checkpoint: Path) -> list[str]:
    content = torch.load(checkpoint, map_location="cpu", weights_only=True)
    content["extra"] = Path("arbitrary object")
    pickled = scratch / "pickled.ckpt"
    torch.save(content, pickled)
    return fit_args(root, images, f"--ckpt_path={pickled}")


CLI_CASES: list[tuple[str, Builder, type[BaseException], str]] = [
    (
        "unknown config key",
        lambda r, i, s, c: fit_args(r, i, "--model.init_args.learning_rate=0.1"),
        SystemExit,
        r"Unknown key 'model\.learning_rate' on the command line \(--model\.init_args\.learning_rate=0\.1\): "
        r"mambaout_pl\.tasks\.ClassificationTask has no argument 'learning_rate'",
    ),
    (
        "wrong type on the command line",
        lambda r, i, s, c: fit_args(r, i, "--model.lr=fast"),
        SystemExit,
        r"Invalid value 'fast' for 'model\.lr' on the command line \(--model\.lr=fast\): it must be float",
    ),
    (
        "wrong type in a recipe",
        recipe_with_wrong_type,
        SystemExit,
        r"Invalid value 'many' for 'trainer\.max_epochs' in recipe '.*bad_recipe\.yaml': it must be int or null",
    ),
    (
        "missing recipe file",
        lambda r, i, s, c: ["fit", f"--config={s / 'no_such_recipe.yaml'}"],
        SystemExit,
        r"Recipe file '.*no_such_recipe\.yaml' does not exist",
    ),
    (
        "unknown backbone",
        lambda r, i, s, c: fit_args(r, i, "--model.backbone=mambaout_fento"),
        ValueError,
        "Unknown model 'mambaout_fento'. Did you mean 'mambaout_femto'",
    ),
    (
        "unknown token mixer",
        lambda r, i, s, c: fit_args(r, i, '--model.backbone_args={"token_mixer": "mamba"}'),
        ValueError,
        "Unknown token_mixer 'mamba', expected one of 'gated_conv', 'ssm', 'attention'",
    ),
    (
        "unknown non-finite loss mode",
        lambda r, i, s, c: fit_args(r, i, "--model.nonfinite_loss=ignore"),
        ValueError,
        "nonfinite_loss='ignore' is not one of",
    ),
    (
        "unknown pre-emption signal",
        lambda r, i, s, c: fit_args(r, i, "--preemption.signals=[SIGTERN]"),
        ValueError,
        "SIGTERN",
    ),
    (
        "dataset path missing",
        lambda r, i, s, c: fit_args(r, i, f"--data.path={s / 'no_such_dataset'}", "--data.data_dir=null"),
        DataNotFoundError,
        "no_such_dataset",
    ),
    ("image folder missing", lambda r, i, s, c: fit_args(r, s / "no_such_folder"), DataNotFoundError, "no_such_folder"),
    (
        "split missing",
        lambda r, i, s, c: fit_args(r, i, "--data.val_split=valid", "--data.val_fraction=0"),
        SplitNotFoundError,
        r"split 'valid' does not exist.*'validation'",
    ),
    ("empty split", empty_split, DataError, r"validation\.parquet.*\"validation\" corresponds to no data"),
    (
        "column missing",
        lambda r, i, s, c: fit_args(r, i, "--data.label_column=labels"),
        ColumnNotFoundError,
        r"Column 'labels' does not exist.*`label_column`",
    ),
    (
        "labels out of range",
        labels_out_of_range,
        InvalidLabelError,
        r"Label 7 at row 1 of column 'label' in split 'validation' is outside \[0, 3\)",
    ),
    ("truncated image", truncated_image, CorruptImageError, r"cat_0\.png.*skip_corrupt"),
    ("file that is not an image", not_an_image, CorruptImageError, r"a_notes\.png.*skip_corrupt"),
    (
        "resume checkpoint missing",
        lambda r, i, s, c: fit_args(r, i, f"--ckpt_path={s / 'gone.ckpt'}"),
        FileNotFoundError,
        "gone.ckpt",
    ),
    (
        "checkpoint of another task",
        checkpoint_of_another_task,
        CheckpointMismatchError,
        r"segmentation\.ckpt' was written by mambaout_pl\.tasks\.segmentation\.SegmentationTask",
    ),
    (
        "checkpoint with wrong keys",
        checkpoint_with_wrong_keys,
        CheckpointMismatchError,
        r"renamed_keys\.ckpt' does not fit.*missing \(model\..*unexpected \(network\.",
    ),
    (
        "plain weights as a checkpoint",
        plain_weights_as_checkpoint,
        CheckpointError,
        r"weights\.pth' is not a training checkpoint.*model\.pretrained",
    ),
    ("checkpoint with pickled objects", pickled_checkpoint, CheckpointError, r"Refusing to load '.*pickled\.ckpt'"),
    (
        "resume with another network",
        lambda r, i, s, c: fit_args(r, i, f"--model.backbone_args={OTHER_BACKBONE}", f"--ckpt_path={c}"),
        CheckpointMismatchError,
        r"last\.ckpt' does not fit.*different shapes.*backbone_args",
    ),
    (
        "resume with another recipe",
        lambda r, i, s, c: fit_args(r, i, "--model.lr=0.5", f"--ckpt_path={c}"),
        CheckpointMismatchError,
        r"last\.ckpt' was written with other model settings.*'lr': \(0\.002, 0\.5\)",
    ),
    (
        "checkpoint folder outside the root",
        lambda r, i, s, c: fit_args(r, i, f"--checkpoint.dirpath={r / '..' / 'elsewhere'}"),
        OutputPathError,
        r"ModelCheckpoint\.dirpath = '.*elsewhere' lies outside trainer\.default_root_dir",
    ),
    (
        "log folder outside the root",
        lambda r, i, s, c: fit_args(
            r,
            i,
            f'--trainer.logger={{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {{"save_dir": "{s}"}}}}',
        ),
        OutputPathError,
        r"CSVLogger\.save_dir = '.*scratch' lies outside",
    ),
]


@pytest.mark.parametrize(
    ("build", "error", "pattern"), [case[1:] for case in CLI_CASES], ids=[case[0] for case in CLI_CASES]
)
def test_bad_input_stops_the_cli_with_a_clear_error_and_writes_nothing_over(
    build: Builder, error: type[BaseException], pattern: str, images: Path, checkpoint: Path, tmp_path: Path, capsys
) -> None:
    root = tmp_path / "runs"
    earlier = earlier_run(root)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    args = build(root, images, scratch, checkpoint)
    with pytest.raises(SystemExit) as raised:
        main(args)
    assert raised.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ") and re.search(pattern, lines[-1]), lines[-3:]
    assert not any(line.startswith(("Traceback", "usage:")) for line in lines), lines
    caught = raised.value.__context__  # what the command stopped on
    assert isinstance(user_error(caught) or caught, error), repr(caught)
    assert {path: path.read_bytes() for path in earlier} == earlier
    assert sorted(root.rglob("*.ckpt")) == [root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"]


@pytest.mark.slow
def test_a_bad_input_exits_the_command_with_a_non_zero_status(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mambaout_pl",
            "fit",
            f"--config={RECIPE}",
            f"--trainer.default_root_dir={tmp_path}",
            "--model.init_args.learning_rate=0.1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "learning_rate" in result.stderr
    assert not list(tmp_path.iterdir())


def test_skip_corrupt_trains_past_a_truncated_image_and_counts_it(
    images: Path, checkpoint: Path, tmp_path: Path
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with pytest.warns(UserWarning, match=r"cat_0\.png.*Skipped \(skip_corrupt=True\)"):
        cli = run_cli(
            truncated_image(tmp_path, images, scratch, checkpoint, skip=True) + ["--trainer.limit_train_batches=6"]
        )
    assert cli.datamodule.num_skipped >= 1
    assert cli.trainer.global_step == 6


# ---------------------------------------------------------------------------------------------
# image formats that must be converted, not refused


def test_unusual_image_formats_reach_the_batch_as_the_right_rgb(tmp_path: Path) -> None:
    red, green, blue = (np.array(IMAGE_FOLDER_COLOURS[name], np.uint8) for name in ("cat", "dog", "fish"))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, displayed rotated 90 degrees clockwise
    sideways = np.zeros((16, 32, 3), np.uint8)
    sideways[:, :16], sideways[:, 16:] = red, blue  # upright: red on top, blue at the bottom
    cmyk = Image.new("CMYK", (16, 16), (255, 0, 0, 0))  # pure cyan
    written = {
        "grayscale": (Image.new("L", (16, 16), 90), {}, "PNG"),
        "rgba": (
            Image.fromarray(np.dstack([np.full((16, 16, 3), green), np.full((16, 16), 255, np.uint8)])),
            {},
            "PNG",
        ),
        "transparent": (Image.new("RGBA", (16, 16), (0, 0, 0, 0)), {}, "PNG"),
        "cmyk": (cmyk, {}, "JPEG"),
        "gray16": (Image.fromarray(np.full((16, 16), 257 * 60, np.uint16)), {}, "PNG"),
        "exif": (Image.fromarray(sideways), {"exif": exif}, "PNG"),
        "palette": (
            Image.new("RGB", (16, 16), tuple(int(v) for v in blue)).convert("P", palette=Image.Palette.ADAPTIVE),
            {},
            "PNG",
        ),
    }
    folder = tmp_path / "modes" / "train"
    for name in ("a", "b"):  # an image folder needs two classes to have labels
        (folder / name).mkdir(parents=True)
    for index, (name, (image, options, format)) in enumerate(written.items()):
        image.save(folder / "ab"[index % 2] / f"{index}_{name}.{format.lower()}", format=format, **options)
    data = ImageClassificationDataModule(
        path="imagefolder",
        data_dir=str(folder.parent),
        val_split="train",
        image_size=16,
        crop_pct=1.0,
        interpolation="bilinear",
        batch_size=len(written),
        num_workers=0,
        pin_memory=False,
        mean=(0, 0, 0),
        std=(1 / 255, 1 / 255, 1 / 255),
        cache_dir=str(tmp_path / "cache"),
    )
    (batch,) = list(data.val_dataloader())
    order = sorted(range(len(written)), key=lambda index: ("ab"[index % 2], f"{index}_"))  # folder order
    by_name = {list(written)[index]: batch["image"][position] for position, index in enumerate(order)}
    means = {name: image.mean(dim=(1, 2)) for name, image in by_name.items()}
    torch.testing.assert_close(means["grayscale"], torch.full((3,), 90.0), atol=0.5, rtol=0)
    torch.testing.assert_close(means["rgba"], torch.tensor(green, dtype=torch.float32), atol=0.5, rtol=0)
    torch.testing.assert_close(means["transparent"], torch.full((3,), 255.0), atol=0.5, rtol=0)  # over white
    assert means["cmyk"][0] < 10 and means["cmyk"][1:].min() > 245  # cyan
    torch.testing.assert_close(means["gray16"], torch.full((3,), 60.0), atol=0.5, rtol=0)  # scaled, not clipped
    torch.testing.assert_close(means["palette"], torch.tensor(blue, dtype=torch.float32), atol=0.5, rtol=0)
    upright = by_name["exif"]
    assert upright[0, :4].mean() > 190 and upright[2, -4:].mean() > 190  # red on top, blue at the bottom


# ---------------------------------------------------------------------------------------------
# segmentation data


@pytest.fixture
def ade20k(tmp_path: Path) -> Path:
    return write_ade20k_folder(tmp_path / "ADEChallengeData2016")


def segmentation_module(tmp_path: Path, **kwargs) -> SegmentationDataModule:
    defaults = dict(
        crop_size=32, resize_scale=(64, 32), batch_size=2, num_workers=0, pin_memory=False, reduce_zero_label=True
    )
    return SegmentationDataModule(**{**defaults, **kwargs})


def test_segmentation_bad_inputs_name_the_file(ade20k: Path, tmp_path: Path) -> None:
    annotations = ade20k / "annotations" / "training"
    Image.fromarray(np.ones((10, 12), np.uint8), mode="L").save(annotations / "ADE_training_00000001.png")
    labels = np.full((48, 56), 250, np.uint8)
    Image.fromarray(labels, mode="L").save(annotations / "ADE_training_00000002.png")
    (annotations / "ADE_training_00000003.png").write_bytes(b"\x89PNG truncated")
    data = segmentation_module(tmp_path, path="ade20k", data_dir=str(ade20k))
    data.setup("fit")
    train = data.datasets["train"]
    with pytest.raises(DataError, match=r"ADE_training_00000001\.png' is 12x10 .*ADE_training_00000001\.jpg' is 40x56"):
        train[1]
    with pytest.raises(InvalidLabelError, match=r"ADE_training_00000002\.png' holds label value\(s\) 250"):
        train[2]
    with pytest.raises(CorruptImageError, match=r"label map '.*ADE_training_00000003\.png'"):
        train[3]
    with pytest.raises(DataNotFoundError, match="no_such_folder"):
        segmentation_module(tmp_path, path="ade20k", data_dir=str(tmp_path / "no_such_folder")).num_classes
    with pytest.raises(ColumnNotFoundError, match=r"Column 'labels' does not exist.*`mask_column`"):
        parquet = tmp_path / "scenes.parquet"
        from conftest import write_segmentation_parquet

        write_segmentation_parquet(parquet)
        data = segmentation_module(
            tmp_path,
            path="parquet",
            data_files={"train": str(parquet), "validation": str(parquet)},
            num_classes=3,
            mask_column="labels",
        )
        data.setup("fit")
