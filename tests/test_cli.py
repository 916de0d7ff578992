"""The CLI a user runs: every recipe, the three entry points, the quick start learning, bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from helpers import small_run_args, tiny_fit_args

from mambaout_pl.cli import main, run_cli

# Classification recipes (segmentation recipes run in test_segmentation_cli.py, on label maps).
RECIPES = sorted(
    recipe
    for recipe in (Path(__file__).parents[1] / "recipes").glob("*.yaml")
    if yaml.safe_load(recipe.read_text())["model"]["class_path"].endswith(".ClassificationTask")
)
ROOT = Path(__file__).parents[1]


@pytest.mark.slow
@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_recipe_fits_on_generated_images(recipe: Path, image_folder: Path, tmp_path: Path) -> None:
    main(["fit", f"--config={recipe}", *small_run_args(tmp_path, image_folder)])

    (run,) = (tmp_path / "lightning_logs").iterdir()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    written = yaml.safe_load(recipe.read_text())
    assert saved["model"]["init_args"]["backbone"] == written["model"]["init_args"]["backbone"]
    assert saved["trainer"]["precision"] == written["trainer"]["precision"]
    assert list(run.glob("events.out.tfevents.*")), "no TensorBoard log"
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    hyper_parameters = checkpoint["hyper_parameters"]
    assert hyper_parameters["num_classes"] == 3  # linked from the data module
    assert hyper_parameters["label_names"] == ["cat", "dog", "fish"]
    assert checkpoint["state_dict"]["model.head.fc.weight"].shape[0] == 3
    assert checkpoint["global_step"] >= 1


@pytest.mark.slow
def test_quickstart_learns_the_embedded_digits_and_validates_its_checkpoint(tmp_path: Path) -> None:
    recipe = ROOT / "recipes" / "quickstart.yaml"
    quiet = ["--trainer.enable_progress_bar=false"]
    fit = run_cli(
        ["fit", f"--config={recipe}", f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=2", *quiet]
    )
    best_score = fit.trainer.checkpoint_callback.best_model_score.item()
    best_path = fit.trainer.checkpoint_callback.best_model_path
    assert best_score > 0.8  # chance is 0.1 on ten digits

    validate = run_cli(
        ["validate", f"--config={recipe}", f"--trainer.default_root_dir={tmp_path}", f"--ckpt_path={best_path}", *quiet]
    )
    assert validate.trainer.callback_metrics["val/top1"].item() == pytest.approx(best_score, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "-m", "mambaout_pl"],
        [str(Path(sys.executable).parent / "mambaout")],
        [str(Path(sys.executable).parent / "lightning")],
    ],
    ids=["python-m", "mambaout", "lightning"],
)
def test_entry_points_print_the_recipe_with_linked_defaults(command: list[str]) -> None:
    result = subprocess.run(
        [*command, "fit", f"--config={ROOT / 'recipes' / 'imagenet_mambaout.yaml'}", "--print_config"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    config = yaml.safe_load(result.stdout)
    assert config["model"]["class_path"] == "mambaout_pl.tasks.ClassificationTask"
    assert config["model"]["init_args"]["backbone"] == "mambaout_tiny"
    assert config["model"]["init_args"]["lr"] == 4e-3
    assert config["data"]["init_args"]["auto_augment"] == "rand-m9-mstd0.5-inc1"
    assert (config["checkpoint"]["monitor"], config["checkpoint"]["mode"]) == (
        "auto",
        "auto",
    )  # the task's, at run time


def test_unknown_backbone_names_close_matches(image_folder: Path, tmp_path: Path) -> None:
    recipe = ROOT / "recipes" / "quickstart.yaml"
    # jsonargparse re-raises the task's UnknownModelError as a ValueError carrying its message.
    with pytest.raises(ValueError, match="Unknown model 'mambaout_fento'. Did you mean 'mambaout_femto'"):
        run_cli(
            ["fit", f"--config={recipe}", *small_run_args(tmp_path, image_folder), "--model.backbone=mambaout_fento"]
        )


def test_missing_recipe_file_exits_with_its_name(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "no_such_recipe.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", f"--config={missing}"])
    assert exit_info.value.code != 0
    assert "no_such_recipe.yaml" in capsys.readouterr().err


def test_unknown_config_key_exits_with_the_key(tmp_path: Path, capsys) -> None:
    recipe = ROOT / "recipes" / "quickstart.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", f"--config={recipe}", "--model.init_args.learning_rate=0.1"])
    assert exit_info.value.code != 0
    assert "learning_rate" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["ClassificationTask", "SegmentationTask"])
def test_help_shows_base_task_arguments_with_their_documentation(task: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.help", f"mambaout_pl.tasks.{task}"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--model.optimizer OPTIMIZER any ``timm.optim`` optimizer name. (type: str, default: adamw)" in text
    assert "--model.nonfinite_loss NONFINITE_LOSS on a NaN or infinite training loss" in text
    lr_default = "0.001" if task == "ClassificationTask" else "0.0001"
    assert f"--model.lr LR peak learning rate. (type: float, default: {lr_default})" in text


def test_a_finished_command_destroys_the_process_group_it_ran_in(image_folder: Path, tmp_path: Path) -> None:
    # Left to the interpreter's exit, gloo's threads can abort a process whose run succeeded.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert main(tiny_fit_args(tmp_path / "run", image_folder)) is None
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_the_progress_bar_of_a_fit_shows_its_metrics_without_the_loggers_version(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cli = run_cli([*tiny_fit_args(tmp_path, images), "--trainer.enable_progress_bar=true"])
    assert cli.trainer.logger is not None and cli.trainer.logger.version == 0  # what Lightning shows as v_num
    bar = cli.trainer.progress_bar_callback
    metrics = bar.get_metrics(cli.trainer, cli.model)
    assert "v_num" not in metrics
    assert {"train/loss", "val/top1"} <= set(metrics)
    assert "v_num" not in capsys.readouterr().out
