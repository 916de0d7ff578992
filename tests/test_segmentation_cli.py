"""The CLI on segmentation recipes: every recipe fits on a tiny ADE20K-layout folder, the quick start learns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import TINY_BACKBONE, small_segmentation_args
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mambaout_pl.cli import run_cli
from mambaout_pl.data import ADE20K_CLASSES
from mambaout_pl.data.embedded import materialize
from mambaout_pl.models import create_model

ROOT = Path(__file__).parents[1]
SEGMENTATION_RECIPES = sorted(
    recipe
    for recipe in (ROOT / "recipes").glob("*.yaml")
    if yaml.safe_load(recipe.read_text())["model"]["class_path"].endswith(".SegmentationTask")
)


def test_there_are_segmentation_recipes():
    assert {recipe.stem for recipe in SEGMENTATION_RECIPES} >= {"ade20k_upernet_mambaout", "quickstart_segmentation"}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", SEGMENTATION_RECIPES, ids=[r.stem for r in SEGMENTATION_RECIPES])
def test_every_segmentation_recipe_fits_on_an_ade20k_layout_folder(
    recipe: Path, ade20k_folder: Path, tmp_path: Path
) -> None:
    written = yaml.safe_load(recipe.read_text())
    model_args = written["model"]["init_args"]
    extra = []
    if model_args.get("pretrained"):  # ImageNet weights: a file of the recipe's backbone
        weights = tmp_path / "imagenet.pth"
        torch.save(create_model(model_args["backbone"]).state_dict(), weights)
        extra.append(f"--model.pretrained={weights}")
    cli = run_cli(["fit", f"--config={recipe}", *small_segmentation_args(tmp_path / "run", ade20k_folder), *extra])

    assert cli.trainer.global_step == 2
    assert cli.trainer.checkpoint_callback.monitor == "val/mIoU" and cli.trainer.checkpoint_callback.mode == "max"
    assert {"val/mIoU", "val/mAcc", "val/aAcc", "val/loss", "train/loss"} <= set(cli.trainer.callback_metrics)
    (run,) = (tmp_path / "run" / "lightning_logs").iterdir()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["init_args"]["backbone"] == model_args["backbone"]
    assert saved["trainer"]["precision"] == written["trainer"]["precision"]
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    hyper_parameters = checkpoint["hyper_parameters"]
    assert hyper_parameters["num_classes"] == 150  # linked from the data module: ADE20K's classes
    assert hyper_parameters["label_names"] == list(ADE20K_CLASSES)
    assert checkpoint["state_dict"]["model.decode_head.classifier.weight"].shape[0] == 150
    events = EventAccumulator(str(run), size_guidance={"images": 0})
    events.Reload()
    assert "val/mIoU" in events.Tags()["scalars"]
    assert [tag for tag in events.Tags()["images"] if tag.startswith("val/examples/")]  # the pictures


def image_blind_loss(mask_folder: Path) -> float:
    """The lowest mean cross-entropy a prediction that ignores the image reaches on these label maps: the
    entropy of their pixels' class frequencies."""
    counts = sum(np.bincount(np.asarray(Image.open(path)).ravel(), minlength=256) for path in mask_folder.iterdir())
    frequencies = counts[counts > 0] / counts.sum()
    return float(-(frequencies * np.log(frequencies)).sum())


@pytest.mark.slow
def test_quickstart_segmentation_learns_and_validates_its_best_checkpoint(tmp_path: Path) -> None:
    recipe = ROOT / "recipes" / "quickstart_segmentation.yaml"
    quiet = ["--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}"]
    fit = run_cli(["fit", f"--config={recipe}", "--trainer.max_epochs=2", "--trainer.num_sanity_val_steps=0", *quiet])
    # The digits' identity shows in val/mIoU after about 6 epochs (the whole recipe reaches about 0.47);
    # where they are shows earlier in the loss. The all-background prediction scores mIoU 0.080.
    blind = image_blind_loss(materialize("builtin:digit_scenes") / "annotations" / "validation")
    assert blind == pytest.approx(0.625, abs=0.01)  # 88% background; 0.27 if only the digits' identity were unknown
    assert fit.trainer.callback_metrics["val/loss"].item() < 0.7 * blind  # 0.40 measured
    assert fit.trainer.callback_metrics["val/mIoU"].item() >= 0.080

    best = fit.trainer.checkpoint_callback
    (run,) = (tmp_path / "lightning_logs").iterdir()
    events = EventAccumulator(str(run))
    events.Reload()
    losses = [event.value for event in events.Scalars("val/loss")]
    assert len(losses) == 2 and losses[1] < losses[0]
    best_epoch = torch.load(best.best_model_path, map_location="cpu", weights_only=True)["epoch"]
    validate = run_cli(["validate", f"--config={recipe}", f"--ckpt_path={best.best_model_path}", *quiet])
    assert validate.trainer.callback_metrics["val/mIoU"].item() == pytest.approx(best.best_model_score.item(), abs=1e-6)
    assert validate.trainer.callback_metrics["val/loss"].item() == pytest.approx(losses[best_epoch], rel=1e-5)


@pytest.mark.slow
def test_best_checkpoint_follows_the_task_monitor_without_a_recipe_override(
    ade20k_folder: Path, tmp_path: Path
) -> None:
    recipe = ROOT / "recipes" / "quickstart_segmentation.yaml"
    assert "checkpoint" not in yaml.safe_load(recipe.read_text())
    three_validations = ["--trainer.max_epochs=3", "--trainer.max_steps=6", "--trainer.num_sanity_val_steps=0"]
    cli = run_cli(
        ["fit", f"--config={recipe}", *small_segmentation_args(tmp_path / "run", ade20k_folder), *three_validations]
    )
    best = cli.trainer.checkpoint_callback
    assert (best.monitor, best.mode) == ("val/mIoU", "max")
    (run,) = (tmp_path / "run" / "lightning_logs").iterdir()
    events = EventAccumulator(str(run))
    events.Reload()
    scores = [event.value for event in events.Scalars("val/mIoU")]
    assert len(scores) == 3
    assert best.best_model_score.item() == pytest.approx(max(scores), abs=1e-6)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["checkpoint"]["monitor"], saved["checkpoint"]["mode"]) == ("val/mIoU", "max")

    explicit = run_cli(
        [
            "fit",
            f"--config={recipe}",
            *small_segmentation_args(tmp_path / "explicit", ade20k_folder),
            "--checkpoint.monitor=val/loss",
        ]
    )
    assert (explicit.trainer.checkpoint_callback.monitor, explicit.trainer.checkpoint_callback.mode) == (
        "val/loss",
        "min",
    )


def test_missing_annotations_folder_stops_the_cli_with_its_name(ade20k_folder: Path, tmp_path: Path) -> None:
    for mask in (ade20k_folder / "annotations" / "training").iterdir():
        mask.unlink()
    (ade20k_folder / "annotations" / "training").rmdir()
    recipe = ROOT / "recipes" / "quickstart_segmentation.yaml"
    with pytest.raises(Exception, match=r"annotations/training' does not exist"):
        run_cli(["fit", f"--config={recipe}", *small_segmentation_args(tmp_path, ade20k_folder)])


def test_a_two_epoch_fit_prints_the_per_class_table_once_at_its_end_in_the_bars_unit(
    ade20k_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = ROOT / "recipes" / "quickstart_segmentation.yaml"
    two_epochs = ["--trainer.max_epochs=2", "--trainer.max_steps=4", "--trainer.enable_progress_bar=true"]
    tiny = [f"--model.backbone_args={TINY_BACKBONE}", "--model.decode_channels=8", "--model.aux_channels=8"]
    cli = run_cli(["fit", f"--config={recipe}", *small_segmentation_args(tmp_path, ade20k_folder), *two_epochs, *tiny])

    assert cli.trainer.current_epoch == 2
    out = capsys.readouterr().out
    assert out.count("Per-class val") == 1 and "Per-class val (epoch 1) scores:" in out  # the last validation's
    table = out[out.index("Per-class val") :]
    assert out.index("Per-class val") < out.index("Run finished:")  # before the run's summary
    mean_row = next(line for line in table.splitlines() if line.startswith("mean "))
    mean_iou = float(mean_row.split()[1])
    assert mean_iou == pytest.approx(
        cli.trainer.callback_metrics["val/mIoU"].item(), abs=5e-5
    )  # a fraction, as the bar
