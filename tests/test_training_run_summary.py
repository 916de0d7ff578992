"""The summary `fit` prints at its end: scores, paths, and next commands that run as printed."""

from __future__ import annotations

import csv
import json
import shlex
from pathlib import Path

import pytest
from browser_helpers import quickstart_fit_args, run_folders

from mambaout_pl.cli import main, run_cli
from mambaout_pl.training.metrics_file import read_metrics_file


@pytest.mark.slow
def test_fit_prints_its_scores_and_commands_that_run_as_printed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)  # the printed paths are relative to where `fit` ran
    fit = run_cli(quickstart_fit_args(Path("runs")))
    printed = capsys.readouterr().out
    summary = printed[printed.index("Run finished: ") :].splitlines()

    (run,) = run_folders(Path("runs"))
    rows = read_metrics_file(run / "metrics.csv")
    checkpoint = fit.trainer.checkpoint_callback
    best = max(rows, key=lambda row: row["val/top1"])
    assert best["val/top1"] == pytest.approx(checkpoint.best_model_score.item(), abs=1e-7)
    assert summary[0] == f"Run finished: {run}"
    assert summary[1] == (
        f"  val/top1 (max is best): best {best['val/top1']:.4f} after epoch {best['epoch']} (step {best['step']}), "
        f"last {rows[-1]['val/top1']:.4f} after epoch 1 (step 4)"
    )
    best_path = Path(checkpoint.best_model_path)  # relative, as the root is
    assert best_path.name == f"best-epoch{best['epoch']:03d}-step{best['step']}.ckpt"
    assert f"  best checkpoint:   {best_path}" in summary
    assert f"  scalars per epoch: {run / 'metrics.csv'}" in summary
    commands = summary[summary.index("Next:") + 1 :]
    assert [line.split()[:2] for line in commands] == [
        ["mambaout", name] for name in ("validate", "predict", "export", "demo", "report")
    ]

    validate = run_cli(shlex.split(commands[0])[1:])
    assert validate.trainer.callback_metrics["val/top1"].item() == pytest.approx(best["val/top1"], abs=1e-6)

    assert main(shlex.split(commands[1])[1:]) is None
    predictions_files = sorted(Path("runs").glob("lightning_logs/version_*/predict/predictions.csv"))
    assert len(predictions_files) == 1
    with open(predictions_files[0], newline="") as file:
        predicted = list(csv.DictReader(file))
    assert len(predicted) == 1797  # every digit of the split the command names (the embedded set's one split)

    assert main(shlex.split(commands[2])[1:]) == 0
    export = run / "export"
    assert json.loads((export / "config.json").read_text())["label_names"] == [str(digit) for digit in range(10)]
    assert shlex.split(commands[3])[2] == str(export)  # the demo serves the export just written
    assert main(shlex.split(commands[4])[1:]) == 0
    assert (run / "report.html").is_file()
