"""The quick starts' commands as README and the recipes write them, from a clone's root: ``fit``, then
``test`` of its checkpoint on the recipe's ``test_split``, and the detection recipe's own ``predict``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from markdown_blocks import code_blocks, shell_commands

from mambaout_pl.cli import main, run_cli

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
DETECTION = ROOT / "recipes" / "quickstart_detection.yaml"
# One training step, then one small evaluation batch, in this process (the CLI a user runs).
TINY = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=1",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.limit_predict_batches=1",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.batch_size=2",
    "--data.eval_batch_size=4",
    "--data.num_workers=0",
]
# The metrics `test` must repeat from the last validation: its test_split is the data fit validated on.
QUICKSTARTS = {
    "quickstart": ("top1", "top5", "loss"),
    "quickstart_segmentation": ("mIoU", "mAcc", "aAcc", "loss"),
    "quickstart_detection": ("bbox_mAP", "segm_mAP"),
}

pytestmark = pytest.mark.usefixtures("one_thread")


def readme_command(words: list[str]) -> list[str]:
    """README's bash command that is exactly ``words`` (comments aside), without the program."""
    commands = [command for block in code_blocks(README, "bash") for command in shell_commands(block.text)]
    assert words in commands, f"README has no command {' '.join(words)}"
    return words[1:]


def in_a_clone(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Work in ``folder`` as in a clone's root: the shipped recipes, and runs/ written here."""
    (folder / "recipes").symlink_to(ROOT / "recipes", target_is_directory=True)
    monkeypatch.chdir(folder)


def fit_and_test(name: str) -> None:
    """README's ``fit`` of quick start ``name`` (one step), then ``test`` of its last checkpoint: the same scores."""
    fit = run_cli([*readme_command(["mambaout", "fit", "--config", f"recipes/{name}.yaml"]), *TINY])
    validated = {key: value.item() for key, value in fit.trainer.callback_metrics.items() if key.startswith("val/")}
    checkpoint = f"runs/{name}/lightning_logs/version_0/checkpoints/last.ckpt"
    assert Path(checkpoint).is_file()

    command = ["mambaout", "test", "--config", f"recipes/{name}.yaml", "--ckpt_path", checkpoint]
    if name == "quickstart":
        readme_command(command)  # README's own
    test = run_cli([*command[1:], *TINY])

    tested = {key: value.item() for key, value in test.trainer.callback_metrics.items() if key.startswith("test/")}
    for metric in QUICKSTARTS[name]:
        assert tested[f"test/{metric}"] == pytest.approx(validated[f"val/{metric}"], abs=1e-6), metric


@pytest.mark.slow
@pytest.mark.parametrize("name", ["quickstart", "quickstart_segmentation"])
def test_test_of_a_quick_start_checkpoint_scores_the_data_fit_validated_on(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_a_clone(tmp_path, monkeypatch)
    fit_and_test(name)


def recipe_commands(recipe: Path) -> tuple[list[list[str]], str]:
    """The ``mambaout`` commands in a recipe's comments (one line each), and the comments' text."""
    comment = "\n".join(line[1:].strip() for line in recipe.read_text().splitlines() if line.startswith("#"))
    lines = [line for line in comment.splitlines() if line.startswith("mambaout ")]
    return [command for line in lines for command in shell_commands(line)], comment


@pytest.mark.slow
def test_the_detection_quick_start_tests_then_predicts_as_its_recipe_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_a_clone(tmp_path, monkeypatch)
    commands, comment = recipe_commands(DETECTION)
    assert ["mambaout", "fit", "--config", "recipes/quickstart_detection.yaml"] in commands  # README's, run here
    fit_and_test("quickstart_detection")
    (predict,) = [command for command in commands if command[1] == "predict"]

    assert main([*predict[1:], *TINY]) is None

    (stated,) = re.findall(r"(runs/\S+/version_N/predict/)", comment)  # where the comment says the results go
    (folder,) = Path().glob(stated.replace("version_N", "version_*"))
    results = json.loads((folder / "results.json").read_text())
    scenes = json.loads(Path(annotation_file()).read_text())
    assert {result["image_id"] for result in results} == {image["id"] for image in scenes["images"][:4]}
    assert {result["category_id"] for result in results} <= {category["id"] for category in scenes["categories"]}
    assert all(len(result["bbox"]) == 4 and "segmentation" in result for result in results)
    assert len(list((folder / "pictures").iterdir())) == 4


def annotation_file() -> str:
    """The COCO annotation file of the embedded detection set's ``val2017`` split."""
    from mambaout_pl.data.detection import DetectionDataModule

    data = DetectionDataModule(path="builtin:digit_detection", predict_split="val2017")
    data.prepare_data()
    return str(data.annotation_file("predict"))
