"""``trainer.precision`` that Lightning replaces on CPU: the run warns and its saved config says what ran."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import small_run_args

from mambaout_pl.cli import run_cli

pytestmark = pytest.mark.slow  # runs of the CLI

ROOT = Path(__file__).parents[1]
TINY_BACKBONE = '{"depths": [1, 1, 1, 1], "dims": [8, 8, 16, 16]}'


def fit(root: Path, image_folder: Path, precision: str):
    return run_cli(
        [
            "fit",
            f"--config={ROOT / 'recipes' / 'quickstart.yaml'}",
            *small_run_args(root, image_folder),
            "--trainer.limit_train_batches=1",
            "--data.image_size=32",
            f"--model.backbone_args={TINY_BACKBONE}",
            f"--trainer.precision={precision}",
        ]
    )


def saved_precision(root: Path) -> str:
    (run,) = (root / "lightning_logs").iterdir()
    return yaml.safe_load((run / "config.yaml").read_text())["trainer"]["precision"]


def test_fp16_mixed_precision_on_cpu_warns_and_saves_the_bf16_it_runs_at(image_folder: Path, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"precision='16-mixed'.*not supported on CPU.*bf16-mixed"):
        cli = fit(tmp_path, image_folder, "16-mixed")
    assert cli.trainer.precision == "bf16-mixed"
    assert saved_precision(tmp_path) == "bf16-mixed"


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_a_precision_that_runs_as_given_is_saved_as_given(precision: str, image_folder: Path, tmp_path: Path) -> None:
    cli = fit(tmp_path, image_folder, precision)
    assert cli.trainer.precision == precision
    assert saved_precision(tmp_path) == precision
