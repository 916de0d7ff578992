"""metrics.csv: one row per epoch of a real run, equal to what TensorBoard received, and whole after a resume."""

from __future__ import annotations

from pathlib import Path

import pytest
from browser_helpers import quickstart_fit_args, run_folders
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mambaout_pl.cli import main
from mambaout_pl.training.metrics_file import best_row, metrics_csv, read_metrics_file

EVERY_STEP = "--trainer.log_every_n_steps=1"


def scalars(run: Path) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` of the run's TensorBoard event file."""
    events = EventAccumulator(str(run)).Reload()
    return {tag: {event.step: event.value for event in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


@pytest.mark.slow
def test_rows_hold_what_tensorboard_logged_and_a_resumed_run_keeps_the_earlier_epochs(tmp_path: Path) -> None:
    main(quickstart_fit_args(tmp_path / "whole", EVERY_STEP))
    (run,) = run_folders(tmp_path / "whole")
    rows = read_metrics_file(run / "metrics.csv")
    logged = scalars(run)

    assert [(row["epoch"], row["step"]) for row in rows] == [(0, 2), (1, 4)]
    assert list(rows[0]) == [
        "epoch",
        "step",
        "train/loss",
        "lr",
        "val/loss",
        "val/top1",
        "val/top5",
    ]  # no per-step lr-*
    for row in rows:
        step = row["step"] - 1  # Lightning logs an epoch's validation at its last training step
        for name in ("val/loss", "val/top1", "val/top5"):
            assert row[name] == logged[name][step]  # both float32 values
        epoch_losses = [logged["train/loss"][s] for s in range(row["step"] - 2, row["step"])]
        assert row["train/loss"] == pytest.approx(sum(epoch_losses) / 2, rel=1e-6)
    (learning_rate,) = [tag for tag in logged if tag.startswith("lr-")][-1:]
    assert rows[0]["lr"] == pytest.approx(logged[learning_rate][2], rel=1e-6)  # the rate after the epoch's updates

    main(quickstart_fit_args(tmp_path / "resumed", EVERY_STEP, "--trainer.max_epochs=1"))
    (run,) = run_folders(tmp_path / "resumed")
    (before,) = read_metrics_file(run / "metrics.csv")
    main(quickstart_fit_args(tmp_path / "resumed", EVERY_STEP, f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"))
    assert run_folders(tmp_path / "resumed") == [run]  # the resumed run continues its folder and its file
    resumed = read_metrics_file(run / "metrics.csv")
    assert [(row["epoch"], row["step"]) for row in resumed] == [(0, 2), (1, 4)]
    assert resumed[0] == before  # the earlier epoch, restored from the checkpoint (its 1-epoch schedule's lr)
    assert before["lr"] != rows[0]["lr"]
    assert sorted(scalars(run)["train/loss"]) == [0, 1, 2, 3]  # one TensorBoard run of both starts
    *_, newest = sorted(run.glob("events.out.tfevents.*"), key=lambda path: path.stat().st_mtime_ns)
    resumed_losses = scalars(newest)["train/loss"]
    assert sorted(resumed_losses) == [2, 3]  # the resumed run trained steps 3 and 4 only
    assert resumed[1]["train/loss"] == pytest.approx(sum(resumed_losses.values()) / 2, rel=1e-6)


def test_rows_with_other_columns_are_written_under_one_header_and_read_back(tmp_path: Path) -> None:
    rows = [
        {"epoch": 0, "step": 5, "train/loss": 2.5},  # an epoch without validation
        {"epoch": 1, "step": 10, "train/loss": 2.0, "lr": 1e-3, "val/mIoU": 0.125, "val/IoU/wall": 0.25},
        {"epoch": 1, "step": 12, "lr": 5e-4, "val/mIoU": 0.5, "val/IoU/sky": 1 / 3},
    ]
    path = tmp_path / "metrics.csv"
    path.write_text(metrics_csv(rows))

    assert path.read_text().splitlines()[0] == "epoch,step,train/loss,lr,val/mIoU,val/IoU/wall,val/IoU/sky"
    assert path.read_text().splitlines()[1] == "0,5,2.5,,,,"
    assert read_metrics_file(path) == rows  # every value exactly, empty cells left out
    assert best_row(rows, "val/mIoU", "max") is rows[2]
    assert best_row(rows, "val/mIoU", "min") is rows[1]
    assert best_row(rows, "val/top1", "max") is None
