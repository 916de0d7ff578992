"""One folder per run: evaluations and resumes of a run write into its folder, ``--ckpt_path last`` picks the run
of the command's settings, a checkpoint's bytes are kept once, and exports are readable like the rest of the run."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import warnings
from pathlib import Path

import pytest
import yaml
from helpers import tiny_fit_args, tiny_run_args

from mambaout_pl.cli import main, run_cli
from mambaout_pl.export.hub import export_main
from mambaout_pl.training import read_checkpoint
from mambaout_pl.training.metrics_file import read_metrics_file

RECIPE = Path(__file__).parents[1] / "recipes" / "quickstart.yaml"


def evaluate_args(command: str, run: Path, checkpoint: Path, *extra: str) -> list[str]:
    return [command, f"--config={run / 'config.yaml'}", f"--ckpt_path={checkpoint}", *extra]


def names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_validate_test_and_predict_write_into_the_checkpoints_run(images: Path, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    run_cli(tiny_fit_args(root, images))
    runs = root / "lightning_logs"
    run = runs / "version_0"
    last = run / "checkpoints" / "last.ckpt"

    for command in ("validate", "validate", "test"):
        run_cli(evaluate_args(command, run, last))
    main(evaluate_args("predict", run, last, "--data.predict_split=validation"))

    assert names(runs) == ["version_0"]  # no version_1, _2 ...
    for folder in ("validate", "validate_1", "test", "predict"):
        assert (run / folder / "config.yaml").is_file() and len(list((run / folder).glob("events.out.*"))) == 1
    saved = yaml.safe_load((run / "validate" / "config.yaml").read_text())
    assert saved["ckpt_path"] == str(last)
    with (run / "predict" / "predictions.csv").open() as file:
        assert len(file.read().splitlines()) == 1 + 3  # a header and the 3 validation images, beside config.yaml
    assert read_metrics_file(run / "metrics.csv")[0]["step"] == 1  # the run's own file, untouched

    elsewhere = root / "copied.ckpt"  # a checkpoint outside any run folder: a new run folder, as before
    shutil.copyfile(last, elsewhere)
    run_cli(evaluate_args("validate", run, elsewhere))
    assert names(runs) == ["version_0", "version_1"]
    assert (runs / "version_1" / "config.yaml").is_file() and not (run / "validate_2").exists()


def test_a_resumed_fit_continues_its_run_folder(images: Path, tmp_path: Path, caplog) -> None:
    root = tmp_path / "runs"
    run_cli(tiny_fit_args(root, images))
    run = root / "lightning_logs" / "version_0"
    config = (run / "config.yaml").read_text()
    checkpoint = run / "checkpoints" / "last.ckpt"

    cli = run_cli(tiny_fit_args(root, images, "--trainer.max_epochs=2", f"--ckpt_path={checkpoint}"))
    assert cli.trainer.global_step == 2 and cli.trainer.log_dir == str(run)
    assert names(root / "lightning_logs") == ["version_0"]
    assert [(row["epoch"], row["step"]) for row in read_metrics_file(run / "metrics.csv")] == [(0, 1), (1, 2)]
    assert len(list(run.glob("events.out.tfevents.*"))) == 2  # the same TensorBoard run, one file per process
    assert (run / "config.yaml").read_text() == config  # how the run started, kept
    resumed = yaml.safe_load((run / "config-resume1.yaml").read_text())
    assert resumed["trainer"]["max_epochs"] == 2 and resumed["ckpt_path"] == str(checkpoint)

    # the same command again: that config matches, the run is resumed (nothing left to train) and nothing is added
    with caplog.at_level(logging.INFO):
        cli = run_cli(tiny_fit_args(root, images, "--trainer.max_epochs=2", "--ckpt_path=last"))
    assert cli.trainer.ckpt_path == str(run / "checkpoints" / "last.ckpt") and cli.trainer.global_step == 2
    lines = [record.getMessage() for record in caplog.records if "--ckpt_path last" in record.getMessage()]
    assert lines == [
        f"--ckpt_path last: resuming the run in '{run}' (started with this command's settings) from last.ckpt."
    ]
    assert names(root / "lightning_logs") == ["version_0"]
    assert sorted(path.name for path in run.glob("config*.yaml")) == ["config-resume1.yaml", "config.yaml"]


def test_ckpt_path_last_resumes_the_run_of_the_commands_settings(images: Path, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    runs = root / "lightning_logs"
    run_cli(tiny_fit_args(root, images))  # version_0
    run_cli(tiny_fit_args(root, images, "--model.lr=0.001"))  # version_1, the newest

    cli = run_cli(tiny_fit_args(root, images, "--trainer.enable_progress_bar=true", "--ckpt_path=last"))
    assert cli.trainer.ckpt_path == str(runs / "version_0" / "checkpoints" / "last.ckpt")
    assert cli.trainer.log_dir == str(runs / "version_0") and names(runs) == ["version_0", "version_1"]

    with pytest.warns(UserWarning) as warned:
        cli = run_cli(tiny_fit_args(root, images, "--model.lr=0.0005", "--ckpt_path=last"))
    (message,) = [str(warning.message) for warning in warned if "--ckpt_path last" in str(warning.message)]
    assert message.startswith(
        f"--ckpt_path last: no run under '{root.resolve()}' was started with this command's settings, so none is "
        "resumed and this run starts from scratch."
    )
    assert "version_0: {'model.init_args.lr': (0.002, 0.0005)}" in message
    assert "version_1: {'model.init_args.lr': (0.001, 0.0005)}" in message
    assert cli.trainer.ckpt_path is None and names(runs) == ["version_0", "version_1", "version_2"]


def test_best_and_last_checkpoints_of_one_epoch_share_their_bytes(images: Path, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    run_cli(
        tiny_fit_args(root, images, "--trainer.max_epochs=2", "--checkpoint.monitor=epoch", "--checkpoint.mode=min")
    )
    checkpoints = root / "lightning_logs" / "version_0" / "checkpoints"
    assert names(checkpoints) == ["best-epoch000-step1.ckpt", "epoch001-step2.ckpt", "last.ckpt"]
    assert os.stat(checkpoints / "best-epoch000-step1.ckpt").st_nlink == 1  # other epochs: their own files

    run_cli(tiny_fit_args(tmp_path / "one", images))
    checkpoints = tmp_path / "one" / "lightning_logs" / "version_0" / "checkpoints"
    best, last = checkpoints / "best-epoch000-step1.ckpt", checkpoints / "last.ckpt"
    assert os.readlink(last) == "epoch000-step1.ckpt"
    assert os.stat(last).st_ino == os.stat(best).st_ino and os.stat(best).st_nlink == 2
    # the file holds the state saved last: both callbacks know this epoch's files, and it resumes
    states = read_checkpoint(best)["callbacks"]
    paths = {state["best_model_path"] for key, state in states.items() if key.startswith("ModelCheckpoint")}
    assert paths == {str(best), str(checkpoints / "epoch000-step1.ckpt")}
    cli = run_cli(tiny_fit_args(tmp_path / "one", images, "--trainer.max_epochs=2", f"--ckpt_path={best}"))
    assert cli.trainer.global_step == 2


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield
    os.umask(previous)


def test_exports_have_the_permissions_of_plain_files(images: Path, tmp_path: Path, umask_027) -> None:
    root = tmp_path / "runs"
    run_cli(tiny_fit_args(root, images))
    checkpoint = root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert stat.S_IMODE(os.stat(checkpoint).st_mode) == 0o640
    for format, folder in (("hub", tmp_path / "hub"), ("pt2", tmp_path / "pt2")):
        assert export_main([str(checkpoint), str(folder), f"--format={format}"]) == 0
        assert stat.S_IMODE(folder.stat().st_mode) == 0o750
        modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in folder.iterdir()}
        assert modes and set(modes.values()) == {0o640}, modes  # model.safetensors included (safetensors: 0600)
    assert "model.safetensors" in names(tmp_path / "hub") and "model.pt2" in names(tmp_path / "pt2")


def test_an_export_names_its_training_data_not_imagenet(images: Path, tmp_path: Path) -> None:
    run_cli(tiny_fit_args(tmp_path / "runs", images))
    checkpoint = tmp_path / "runs" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert export_main([str(checkpoint), str(tmp_path / "export")]) == 0
    text = (tmp_path / "export" / "config.json").read_text()
    assert "in1k" not in text
    assert json.loads(text)["pretrained_cfg"]["tag"] == images.name.lower()  # the image folder's name

    args = ["fit", f"--config={RECIPE}", *tiny_run_args(tmp_path / "digits", images), "--data.path=builtin:digits"]
    run_cli([arg for arg in args if not arg.startswith("--data.data_dir")])
    checkpoint = tmp_path / "digits" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert export_main([str(checkpoint), str(tmp_path / "digits_export")]) == 0
    assert json.loads((tmp_path / "digits_export" / "config.json").read_text())["pretrained_cfg"]["tag"] == "digits"


def test_validate_of_a_runs_checkpoint_warns_about_nothing(images: Path, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    run_cli(tiny_fit_args(root, images))
    run = root / "lightning_logs" / "version_0"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_cli(evaluate_args("validate", run, run / "checkpoints" / "last.ckpt"))
    ours = [w for w in caught if "mambaout_pl" in w.filename or "dirpath" in str(w.message)]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]
