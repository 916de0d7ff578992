"""Nothing lost, nothing written outside the root: a catalogue of outputs a run or an export must refuse.

Each case asserts on the message (it names the key or path at fault and the fix) and on what is
left on disk: an earlier run and an earlier export stay byte for byte, and nothing appears outside
the root folder. Runs use the real CLI on a generated image folder, a couple of CPU steps at most.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import tiny_fit_args as fit_args

from mambaout_pl.cli import main, run_cli
from mambaout_pl.errors import CheckpointError, OutputPathError, OutputWriteError
from mambaout_pl.training import AtomicCheckpointIO, atomic_torch_save

ROOT = Path(__file__).parents[1]
RECIPE = ROOT / "recipes" / "quickstart.yaml"


@pytest.fixture(scope="module")
def checkpoint(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real classification checkpoint of one training step."""
    root = tmp_path_factory.mktemp("fit")
    run_cli(fit_args(root, images))
    return root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder``: files by content, links by target, folders as such."""
    entries: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        entries[key] = f"-> {os.readlink(path)}" if path.is_symlink() else ("/" if path.is_dir() else path.read_bytes())
    return entries


def earlier_run(root: Path, checkpoint: Path) -> Path:
    """An earlier run in ``root`` of ``checkpoint``'s settings: its config, a checkpoint and the ``last.ckpt`` link."""
    run = root / "lightning_logs" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_bytes((checkpoint.parents[1] / "config.yaml").read_bytes())
    (run / "checkpoints" / "epoch000-step1.ckpt").write_bytes(checkpoint.read_bytes())
    (run / "checkpoints" / "last.ckpt").symlink_to("epoch000-step1.ckpt")
    return run


# ---------------------------------------------------------------------------------------------
# output paths: checked where they resolve, before anything is written


def logger(kind: str, root: Path, **options: str) -> str:
    init_args = json.dumps({"save_dir": str(root), **options})
    return f'--trainer.logger={{"class_path": "lightning.pytorch.loggers.{kind}", "init_args": {init_args}}}'


def profiler(**options: str) -> str:
    return f'--trainer.profiler={{"class_path": "lightning.pytorch.profilers.SimpleProfiler", "init_args": {json.dumps(options)}}}'


def prediction_writer(folder: Path) -> str:
    writer = {
        "class_path": "mambaout_pl.tasks.segmentation_outputs.SegmentationMaskWriter",
        "init_args": {"output_dir": str(folder)},
    }
    return f"--trainer.callbacks={json.dumps([writer])}"


# (id, extra fit arguments from (root, a folder outside it), key, value in the message)
OUTPUT_CASES: list[tuple[str, Callable[[Path, Path], list[str]], str, str]] = [
    (
        "TensorBoard logger name leading out",
        lambda r, o: [logger("TensorBoardLogger", r, name="../escaped")],
        "TensorBoardLogger.name",
        "../escaped",
    ),
    (
        "CSV logger version leading out",
        lambda r, o: [logger("CSVLogger", r, version="../../escaped")],
        "CSVLogger.version",
        "../../escaped",
    ),
    (
        "TensorBoard sub_dir leading out",
        lambda r, o: [logger("TensorBoardLogger", r, sub_dir="../../../escaped")],
        "TensorBoardLogger.sub_dir",
        "../../../escaped",
    ),
    (
        "checkpoint file name leading out",
        lambda r, o: ["--checkpoint.filename=../../../../escaped/best"],
        "ModelCheckpoint.filename",
        "../../../../escaped/best",
    ),
    (
        "latest checkpoint file name absolute",
        lambda r, o: [f"--latest_checkpoint.filename={o}/latest"],
        "ModelCheckpoint.filename",
        "{outside}/latest",
    ),
    (
        "profiler folder elsewhere",
        lambda r, o: [profiler(dirpath=str(o), filename="perf")],
        "SimpleProfiler.dirpath",
        "{outside}",
    ),
    (
        "profiler file name leading out",
        lambda r, o: [profiler(filename="../../../escaped")],
        "SimpleProfiler.filename",
        "../../../escaped",
    ),
    (
        "prediction writer folder elsewhere",
        lambda r, o: [prediction_writer(o)],
        "SegmentationMaskWriter.output_dir",
        "{outside}",
    ),
]


@pytest.mark.parametrize(
    ("build", "key", "value"), [case[1:] for case in OUTPUT_CASES], ids=[case[0] for case in OUTPUT_CASES]
)
def test_output_paths_outside_the_root_are_refused_before_writing(
    build: Callable[[Path, Path], list[str]], key: str, value: str, images: Path, checkpoint: Path, tmp_path: Path
) -> None:
    root = tmp_path / "work" / "runs"
    outside = tmp_path / "outside"
    earlier_run(root, checkpoint)
    before, around = snapshot(root), sorted(tmp_path.iterdir())
    with pytest.raises(OutputPathError) as raised:
        run_cli(fit_args(root, images, *build(root, outside)))
    message = str(raised.value)
    assert f"{key} = '{value.format(outside=outside)}' lies outside trainer.default_root_dir ('{root}')" in message
    assert "Give a path inside it" in message
    assert snapshot(root) == before  # not even a new version folder
    assert sorted(tmp_path.iterdir()) == around and not outside.exists()
    assert not list((tmp_path / "work").glob("escaped*")) and not list(tmp_path.glob("escaped*"))


# ---------------------------------------------------------------------------------------------
# export: --overwrite replaces only an earlier export


def test_overwrite_never_deletes_a_run_folder(checkpoint: Path, tmp_path: Path, capsys) -> None:
    run = earlier_run(tmp_path / "runs", checkpoint)
    before = snapshot(run)
    assert main(["export", str(checkpoint), str(run), "--overwrite"]) == 2
    message = capsys.readouterr().err
    assert (
        f"Export target '{run}' is not empty and is not an earlier export (it has no export_manifest.json)" in message
    )
    assert "'checkpoints/', 'config.yaml'" in message and "including checkpoints" in message
    assert "never replaces such a folder, --overwrite included" in message
    assert snapshot(run) == before
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]  # no staging folder left


def test_overwrite_keeps_files_an_export_did_not_write(checkpoint: Path, tmp_path: Path, capsys) -> None:
    target = tmp_path / "export"
    assert main(["export", str(checkpoint), str(target)]) == 0
    manifest = json.loads((target / "export_manifest.json").read_text())
    assert manifest["files"] == ["README.md", "config.json", "export_manifest.json", "model.safetensors"]
    (target / "notes.md").write_text("my notes")
    before = snapshot(target)
    assert main(["export", str(checkpoint), str(target), "--overwrite"]) == 2
    message = capsys.readouterr().err
    assert (
        f"Export target '{target}' holds an earlier export and 1 entries ('notes.md'), which that export did not write"
        in message
    )
    assert snapshot(target) == before
    (target / "notes.md").unlink()
    (target / "model.safetensors").write_bytes(b"stale")
    assert main(["export", str(checkpoint), str(target), "--overwrite"]) == 0  # an earlier export alone is replaced
    assert (target / "model.safetensors").read_bytes() != b"stale"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_export_onto_a_symbolic_link_is_refused_before_writing(checkpoint: Path, tmp_path: Path, capsys) -> None:
    real = tmp_path / "real_export"
    assert main(["export", str(checkpoint), str(real)]) == 0
    link = tmp_path / "link"
    link.symlink_to(real)
    before = snapshot(tmp_path)
    assert main(["export", str(checkpoint), str(link), "--overwrite"]) == 2
    message = capsys.readouterr().err
    assert f"Export target '{link}' is a symbolic link to '{real}'" in message and f"('{real.resolve()}')" in message
    assert snapshot(tmp_path) == before and link.is_symlink()


def test_export_under_a_file_names_the_target(checkpoint: Path, tmp_path: Path, capsys) -> None:
    blocking = tmp_path / "exports"
    blocking.write_text("a file where a folder should be")
    target = blocking / "model"
    assert main(["export", str(checkpoint), str(target)]) == 2
    message = capsys.readouterr().err
    assert f"Cannot write '{target}': '{blocking}' is a file, not a folder" in message
    assert "Move that file away or choose another output folder" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exports"] and blocking.read_text().startswith("a file")


# ---------------------------------------------------------------------------------------------
# write errors name the target, not a temporary file


def test_a_checkpoint_under_a_file_names_the_target(tmp_path: Path) -> None:
    blocking = tmp_path / "runs"
    blocking.write_text("not a folder")
    target = blocking / "checkpoints" / "last.ckpt"
    with pytest.raises(OutputWriteError) as raised:
        AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, target)
    assert str(raised.value).startswith(f"Cannot write '{target}': '{blocking}' is a file, not a folder")
    assert isinstance(raised.value, OSError) and raised.value.errno in (errno.ENOTDIR, errno.EEXIST)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_disk_full_names_the_target_and_keeps_the_previous_file(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "checkpoints" / "last.ckpt"
    atomic_torch_save({"step": torch.tensor(1)}, target)
    previous = target.read_bytes()

    def no_space(descriptor: int) -> None:  # the disk filling up while the data is flushed
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OutputWriteError) as raised:
        atomic_torch_save({"step": torch.tensor(2)}, target)
    message = str(raised.value)
    assert message.startswith(f"Cannot write '{target}': no space left on its disk") and ".tmp" not in message
    assert "Free space there" in message and raised.value.errno == errno.ENOSPC
    assert target.read_bytes() == previous and sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]


def test_read_only_folder_names_the_target(tmp_path: Path, monkeypatch) -> None:
    # Tests may run as root, whom permissions do not stop: the refusal of a read-only file system is
    # raised where the file would be created.
    target = tmp_path / "exports" / "config.json"

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(OutputWriteError) as raised:
        atomic_torch_save({}, target)
    assert str(raised.value).startswith(f"Cannot write '{target}': its folder '{target.parent}' is read-only")
    assert "Make it writable or choose another output folder" in str(raised.value)
    assert sorted(p.name for p in target.parent.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# runs started together, --ckpt_path last


@pytest.mark.slow
@pytest.mark.xdist_group("processes")
def test_two_runs_started_together_get_their_own_version_folders(images: Path, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "mambaout_pl", *fit_args(root, images)]
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environment) for _ in range(2)
    ]
    outputs = [process.communicate(timeout=300)[0].decode() for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    runs = sorted((root / "lightning_logs").iterdir())
    assert [run.name for run in runs] == ["version_0", "version_1"]
    for run in runs:
        assert (run / "config.yaml").is_file()
        assert len(list(run.glob("events.out.tfevents.*"))) == 1  # one process's log each
        assert (run / "checkpoints" / "last.ckpt").resolve().is_file()
        assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1


def test_ckpt_path_last_refuses_a_dangling_link(images: Path, checkpoint: Path, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    run = earlier_run(root, checkpoint)
    (run / "checkpoints" / "epoch000-step1.ckpt").unlink()
    before = snapshot(root)
    with pytest.raises(CheckpointError) as raised:
        run_cli(fit_args(root, images, "--ckpt_path=last"))
    message = str(raised.value)
    link = run / "checkpoints" / "last.ckpt"
    assert f"'{link}' links to 'epoch000-step1.ckpt', which no longer exists" in message
    assert "--ckpt_path PATH" in message and "delete the link to start this run from scratch" in message
    assert snapshot(root) == before


def test_ckpt_path_last_refuses_checkpoints_without_a_last_one(images: Path, checkpoint: Path, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    run = earlier_run(root, checkpoint)
    (run / "checkpoints" / "last.ckpt").unlink()
    before = snapshot(root)
    with pytest.raises(CheckpointError) as raised:
        run_cli(fit_args(root, images, "--ckpt_path=last"))
    message = str(raised.value)
    assert f"no last*.ckpt in '{root / 'lightning_logs' / '*' / 'checkpoints'}'" in message
    assert f"'{run / 'checkpoints' / 'epoch000-step1.ckpt'}'" in message and "--ckpt_path PATH" in message
    assert snapshot(root) == before


def test_ckpt_path_last_with_nothing_to_resume_warns_and_starts_over(images: Path, tmp_path: Path) -> None:
    root = tmp_path / "no_such_root"
    with pytest.warns(UserWarning) as warned:
        cli = run_cli(fit_args(root, images, "--ckpt_path=last"))
    messages = [str(warning.message) for warning in warned if "--ckpt_path last" in str(warning.message)]
    assert len(messages) == 1, [str(warning.message) for warning in warned]
    assert re.search(
        rf"no checkpoint to resume in '{re.escape(str(root / 'lightning_logs' / '*' / 'checkpoints'))}', and "
        rf"trainer.default_root_dir '{re.escape(str(root.resolve()))}' does not exist: this run starts from scratch",
        messages[0],
    )
    assert "--trainer.default_root_dir" in messages[0]
    assert cli.trainer.ckpt_path is None and cli.trainer.global_step == 1
    assert (root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt").is_file()
