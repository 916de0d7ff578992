"""A catalogue of bad inputs, third round (continued): damaged files, a disk that fills, what failed and killed
commands leave behind, `mambaout profile` inputs too large, label maps damaged by JPEG, stray log lines on a
stop, and the segmentation scores on degenerate inputs against an independent re-implementation of
mmsegmentation's `IoUMetric`.

Each case asserts on the message (the file, the cause and what to do) and on what is left on disk. A full
disk is simulated at the write boundary (see `fault_injection.FullDisk` and `full_disk_on_safetensors`): a
small tmpfs cannot be mounted where the tests run. One test kills a real `mambaout export` with SIGKILL.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import fault_injection
import numpy as np
import pytest
import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp
import yaml
from data_helpers import make_segmentation_module
from helpers import tiny_fit_args
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lightning.pytorch import Callback
from PIL import Image
from safetensors import SafetensorError

from mambaout_pl.cli import main, run_cli
from mambaout_pl.command_errors import VERBOSE_VARIABLE
from mambaout_pl.data import InvalidLabelError
from mambaout_pl.data.label_damage import DamagedLabelMapWarning
from mambaout_pl.errors import CheckpointError, OutputWriteError
from mambaout_pl.models import create_model, from_pretrained, load_pretrained
from mambaout_pl.tasks.segmentation_metrics import confusion_scores, segmentation_metrics
from mambaout_pl.training import PreemptionCheckpoint
from mambaout_pl.training.atomic import atomic_torch_save
from mambaout_pl.training.checkpoint_io import read_checkpoint
from mambaout_pl.training.unused_run_folders import is_unused_run_folder

TESTS = Path(__file__).parent


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder``: files by content, folders as such, links by target."""
    entries: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        entries[name] = f"-> {os.readlink(path)}" if path.is_symlink() else "/" if path.is_dir() else path.read_bytes()
    return entries


def last_error_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def export(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run's checkpoint exported in timm's format (config.json with `architecture`, model.safetensors)."""
    folder = tmp_path_factory.mktemp("exports") / "export"
    assert main(["export", str(run / "checkpoints" / "last.ckpt"), str(folder)]) == 0
    return folder


def truncated_copy(source: Path, target: Path, keep: int | float) -> Path:
    """``target``: the first ``keep`` bytes (or share of the bytes) of ``source``, as a copy cut short leaves it."""
    content = source.read_bytes()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(content[: keep if isinstance(keep, int) else int(len(content) * keep)])
    return target


# ---------------------------------------------------------------------------------------------
# damaged files: the file and the cause as the last line, nothing written


def sharded_folder(folder: Path) -> Path:
    """A checkpoint folder as ModelParallelStrategy writes it (``torch.distributed.checkpoint`` shards, ``.metadata``
    index, Lightning's ``meta.pt``), written by one process."""
    state = {"state_dict": {"weight": torch.arange(4096.0).reshape(64, 64), "bias": torch.arange(64.0)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=str(folder))
    torch.save({"epoch": 1, "global_step": 7, "mambaout_pl": {"task": "x"}}, folder / "meta.pt")
    return folder


def shard_of(folder: Path) -> Path:
    (shard,) = folder.glob("*.distcp")
    return shard


def cut_shard(folder: Path) -> str:
    shard = shard_of(folder)
    size = shard.stat().st_size
    truncated_copy(shard, shard, 100)
    return rf"Shard '{re.escape(str(shard))}' of checkpoint folder '.*' is truncated: it holds 100 bytes, and its index places data up to byte {size}\. Copy the folder again"


def drop_shard(folder: Path) -> str:
    shard = shard_of(folder)
    shard.unlink()
    return rf"Shard '{re.escape(str(shard))}' of checkpoint folder '.*' is missing \(its index '\.metadata' lists it\)"


def cut_index(folder: Path) -> str:
    truncated_copy(folder / ".metadata", folder / ".metadata", 50)
    return rf"Cannot read the index '{re.escape(str(folder / '.metadata'))}' of checkpoint folder .*: it is truncated or damaged \(pickle data was truncated\)"


def drop_index(folder: Path) -> str:
    (folder / ".metadata").unlink()
    return (
        r"has no index '\.metadata' \(written last, with the shards\): it was not saved to the end or not copied whole"
    )


def scramble_shard(folder: Path) -> str:
    """Same length, damaged bytes: only reading the shard shows it."""
    shard = shard_of(folder)
    content = bytearray(shard.read_bytes())
    content[-300:-100] = bytes(200)
    shard.write_bytes(bytes(content))
    return r"Cannot read the shards of '.*': RuntimeError: PytorchStreamReader failed reading zip archive"


@pytest.mark.parametrize(
    "damage",
    [cut_shard, drop_shard, cut_index, drop_index, scramble_shard],
    ids=["truncated shard", "missing shard", "truncated index", "missing index", "damaged shard"],
)
def test_consolidating_a_damaged_checkpoint_folder_names_the_file(damage, tmp_path: Path, capsys) -> None:
    folder = sharded_folder(tmp_path / "epoch001-step7.ckpt")
    pattern = damage(folder)
    before = snapshot(tmp_path)
    assert main(["consolidate", str(folder), str(tmp_path / "model.ckpt")]) == 1
    line = last_error_line(capsys)
    assert line.startswith("error: ") and re.search(pattern, line), line
    assert snapshot(tmp_path) == before  # no model.ckpt, no staging folder beside it


def test_the_intact_folder_of_the_catalogue_consolidates(tmp_path: Path, capsys) -> None:
    folder = sharded_folder(tmp_path / "epoch001-step7.ckpt")
    assert main(["consolidate", str(folder), str(tmp_path / "model.ckpt")]) == 0
    checkpoint = torch.load(tmp_path / "model.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 7 and torch.equal(checkpoint["state_dict"]["bias"], torch.arange(64.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch001-step7.ckpt", "model.ckpt"]


def test_consolidating_onto_a_full_disk_names_the_output_and_the_cause(tmp_path: Path, capsys, monkeypatch) -> None:
    folder = sharded_folder(tmp_path / "epoch001-step7.ckpt")
    disk = fault_injection.FullDisk()
    disk.free = 3000  # the consolidated file (~18 kB) does not fit
    monkeypatch.setattr(os, "fdopen", disk.fdopen(os.fdopen))
    before = snapshot(tmp_path)
    assert main(["consolidate", str(folder), str(tmp_path / "model.ckpt")]) == 1
    assert last_error_line(capsys) == (
        f"error: Cannot write '{tmp_path / 'model.ckpt'}': no space left on its disk (No space left on device). Free "
        "space there (e.g. delete old checkpoints) or choose an output folder on another disk."
    )
    assert snapshot(tmp_path) == before  # the partial file is gone


def truncated_checkpoint(run: Path, scratch: Path) -> Path:
    return truncated_copy(run / "checkpoints" / "last.ckpt", scratch / "cut.ckpt", 0.6)


def folder_with_truncated_meta(run: Path, scratch: Path) -> Path:
    folder = scratch / "sharded.ckpt"
    truncated_copy(run / "checkpoints" / "last.ckpt", folder / "meta.pt", 0.5)
    return folder


@pytest.mark.parametrize(
    ("command", "make", "pattern"),
    [
        (
            "validate",
            truncated_checkpoint,
            r"^error: Cannot read checkpoint '.*cut\.ckpt' \(truncated, or not written by torch\.save\): "
            r"PytorchStreamReader failed reading zip archive: failed finding central directory\. Use another "
            r"checkpoint, e\.g\. the previous epoch's\.$",
        ),
        ("fit", truncated_checkpoint, r"^error: Cannot read checkpoint '.*cut\.ckpt' \(truncated"),
        (
            "validate",
            folder_with_truncated_meta,
            r"^error: Cannot read '.*sharded\.ckpt/meta\.pt' \(truncated, or not written by torch\.save\)",
        ),
    ],
    ids=["validate a truncated file", "resume a truncated file", "validate a folder with a truncated meta.pt"],
)
def test_a_truncated_checkpoint_ends_with_the_file_and_the_cause(
    command: str, make, pattern: str, images: Path, run: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.delenv(VERBOSE_VARIABLE, raising=False)
    scratch, root = tmp_path / "scratch", tmp_path / "runs"
    checkpoint = make(run, scratch)
    before = snapshot(scratch)
    with pytest.raises(SystemExit) as raised:
        main([command, *tiny_fit_args(root, images)[1:], f"--ckpt_path={checkpoint}"])
    assert raised.value.code == 2
    line = last_error_line(capsys)
    assert re.search(pattern, line), line
    assert "internal miniz error" not in line  # torch's advice is not repeated
    assert snapshot(scratch) == before and not root.exists()  # read before a run folder is made


def test_loading_truncated_weights_names_the_file(run: Path, export: Path, tmp_path: Path) -> None:
    model = create_model("mambaout_femto", num_classes=3, depths=[1, 1, 1, 1], dims=[8, 8, 16, 16])
    cut = truncated_copy(run / "checkpoints" / "last.ckpt", tmp_path / "cut.pth", 0.7)
    with pytest.raises(CheckpointError, match=r"'.*cut\.pth' as a PyTorch checkpoint: it is truncated or damaged \("):
        load_pretrained(model, cut)
    size = (export / "model.safetensors").stat().st_size
    folder = Path(shutil.copytree(export, tmp_path / "cut_export"))
    truncated_copy(export / "model.safetensors", folder / "model.safetensors", size - 1000)
    message = rf"'{re.escape(str(folder / 'model.safetensors'))}' is truncated: it holds {size - 1000} bytes, and its header places tensors up to byte {size}\. Download or export it again"
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(model, folder)  # an export folder given as weights
    with pytest.raises(CheckpointError, match=message):
        from_pretrained(folder)  # timm's format: timm's reader would say only "incomplete metadata"
    truncated_copy(export / "model.safetensors", folder / "model.safetensors", 4)
    with pytest.raises(CheckpointError, match=r"is truncated: it holds 4 bytes, which do not cover its safetensors"):
        load_pretrained(model, folder / "model.safetensors")


def test_fit_from_truncated_pretrained_weights_stops_before_training(
    images: Path, export: Path, tmp_path: Path, capsys
) -> None:
    weights = truncated_copy(export / "model.safetensors", tmp_path / "weights" / "model.safetensors", 0.5)
    with pytest.raises(SystemExit):
        main(tiny_fit_args(tmp_path / "runs", images, f"--model.pretrained={weights}"))
    line = last_error_line(capsys)
    assert re.search(rf"^error: .*'{re.escape(str(weights))}' is truncated: it holds \d+ bytes", line), line
    assert not list((tmp_path / "runs").rglob("*.ckpt"))


def test_a_disk_that_fills_during_fit_keeps_the_earlier_checkpoints(
    images: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """Epoch 0's checkpoints are written; then the disk fills: epoch 1's cannot be, and epoch 0's stay whole."""
    monkeypatch.setattr(fault_injection.DISK, "free", None)
    monkeypatch.setattr(os, "fdopen", fault_injection.DISK.fdopen(os.fdopen))
    fill = tmp_path / "fill.yaml"
    callback = {"class_path": "fault_injection.FillDisk", "init_args": {"epoch": 1, "free": 50_000}}
    fill.write_text(yaml.safe_dump({"trainer": {"callbacks": [callback]}}))
    with pytest.raises(SystemExit) as raised:
        main(tiny_fit_args(tmp_path, images, "--trainer.max_epochs=2", f"--config={fill}"))
    assert raised.value.code == 2
    checkpoints = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    line = last_error_line(capsys)
    assert re.fullmatch(
        rf"error: Cannot write '{re.escape(str(checkpoints))}/(best-)?epoch001-step2\.ckpt': no space left on its "
        r"disk \(No space left on device\)\. Free space there \(e\.g\. delete old checkpoints\) or choose an output "
        r"folder on another disk\.",
        line,
    ), line
    names = sorted(path.name for path in checkpoints.iterdir())
    assert names == ["best-epoch000-step1.ckpt", "epoch000-step1.ckpt", "last.ckpt"]  # no partial file
    assert os.readlink(checkpoints / "last.ckpt") == "epoch000-step1.ckpt"
    assert read_checkpoint(checkpoints / "last.ckpt")["global_step"] == 1  # whole: it loads


def test_torch_save_onto_a_full_disk_reports_the_cause_not_torchs_position_error(tmp_path: Path) -> None:
    """`torch.save` turns the failed write into "unexpected pos ..."; the OSError it came from is what is reported."""
    target = tmp_path / "model.ckpt"
    atomic_torch_save({"weight": torch.zeros(10)}, target)
    before = target.read_bytes()
    disk = fault_injection.FullDisk()
    disk.free = 2000
    real = os.fdopen
    os.fdopen = disk.fdopen(real)
    try:
        with pytest.raises(RuntimeError, match="unexpected pos"):  # what torch says by itself
            with tempfile.TemporaryFile(dir=tmp_path) as plain, os.fdopen(os.dup(plain.fileno()), "wb") as file:
                torch.save({"weight": torch.zeros(100_000)}, file)
        disk.free = 2000
        with pytest.raises(OutputWriteError, match=r"'.*model\.ckpt': no space left on its disk \(No space left"):
            atomic_torch_save({"weight": torch.zeros(100_000)}, target)
    finally:
        os.fdopen = real
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"]


def full_disk_on_safetensors(monkeypatch, kept: float = 0.5) -> None:
    """A full disk where safetensors writes (its Rust writer bypasses Python's files): write the first part of the
    file, then fail with the very error safetensors raises on a full disk (seen on a full tmpfs)."""

    def save_file(tensors, filename, metadata=None) -> None:
        content = safetensors.torch.save(tensors, metadata=metadata)
        Path(filename).write_bytes(content[: int(len(content) * kept)])
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def test_a_disk_that_fills_during_export_overwrite_keeps_the_earlier_export(
    run: Path, export: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    target = Path(shutil.copytree(export, tmp_path / "export"))
    before = snapshot(tmp_path)
    full_disk_on_safetensors(monkeypatch)
    assert main(["export", str(run / "checkpoints" / "last.ckpt"), str(target), "--overwrite"]) == 2
    assert last_error_line(capsys) == (
        f"mambaout export: error: Cannot write '{target}': no space left on its disk (No space left on device). Free "
        "space there (e.g. delete old checkpoints) or choose an output folder on another disk."
    )
    assert snapshot(tmp_path) == before  # the earlier export whole, no staging folder, no lock


# ---------------------------------------------------------------------------------------------
# leftovers: what killed exports leave beside their target, folders of failed commands


@pytest.mark.slow
@pytest.mark.xdist_group("processes")
def test_an_export_killed_while_replacing_leaves_the_earlier_export_for_the_next(
    run: Path, export: Path, tmp_path: Path, capsys
) -> None:
    """SIGKILL between the two renames of `export --overwrite` (the earlier export moved aside, the new one not yet
    in place): the next export puts the earlier one back, then replaces it only with --overwrite."""
    target = Path(shutil.copytree(export, tmp_path / "export"))
    with (target / "README.md").open("a") as card:
        card.write("\nThe earlier export.\n")  # to tell it from the new one, which is otherwise the same
    earlier = snapshot(target)
    marker = tmp_path / "renamed"
    script = (
        "import sys, fault_injection; "
        f"fault_injection.pause_after_rename('.replaced-', {str(marker)!r}); "
        "from mambaout_pl.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    process = subprocess.Popen(
        [sys.executable, "-c", script, "export", str(best), str(target), "--overwrite"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 240
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), process.communicate()[0][-3000:]
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    left = sorted(path.name for path in tmp_path.iterdir())
    assert "export" not in left and any(name.startswith(".export.replaced-") for name in left), left
    assert any(re.fullmatch(r"\.export\.[a-z0-9_]{8}\.staging", name) for name in left), left  # the new one, whole
    assert ".export.export.lock" in left  # the killed command's reservation

    with pytest.warns(UserWarning) as caught:
        assert main(["export", str(best), str(target)]) == 2
    messages = " ".join(str(warning.message) for warning in caught)
    assert f"An export to '{target}' was killed while it replaced the earlier export there" in messages
    assert f"that earlier export is back in '{target}'" in messages
    assert re.search(
        r"Removed what exports to '.*export' that were killed left beside it: '\.export\.\w{8}\.staging'", messages
    )
    assert last_error_line(capsys) == (
        f"mambaout export: error: Export target '{target}' holds an earlier export; pass --overwrite to replace it."
    )
    assert snapshot(target) == earlier  # put back byte for byte
    assert sorted(path.name for path in tmp_path.iterdir()) == ["export", "renamed"]  # nothing beside it

    assert main(["export", str(best), str(target), "--overwrite"]) == 0
    assert "The earlier export." not in (target / "README.md").read_text()  # the new export replaced it
    assert sorted(path.name for path in tmp_path.iterdir()) == ["export", "renamed"]


def leftover_staging(target: Path) -> Path:
    """A staging folder exactly as `staged_folder` names it, with the part of an export a kill left there."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".staging", dir=target.parent))
    (staging / "model.safetensors").write_bytes(b"part of an export")
    return staging


def leftover_replaced(target: Path) -> Path:
    """An earlier export moved aside by `--overwrite` whose removal was killed (the new export is in place)."""
    replaced = target.with_name(f".{target.name}.replaced-0123abcd")
    shutil.copytree(target, replaced)
    return replaced


@pytest.mark.parametrize("leave", [leftover_staging, leftover_replaced], ids=["staging folder", "replaced export"])
def test_the_next_export_removes_what_a_killed_one_left_beside_its_target(
    leave, run: Path, export: Path, tmp_path: Path
) -> None:
    target = Path(shutil.copytree(export, tmp_path / "export"))
    leftover = leave(target)
    others = [
        tmp_path / ".export.v2.abcdefgh.staging",  # another target's ("export.v2"), in the same folder
        tmp_path / ".exports.replaced-0123abcd",  # another target's ("exports")
        tmp_path / "notes",  # the user's
    ]
    for folder in others:
        folder.mkdir()
        (folder / "keep.txt").write_text("mine")
    with pytest.warns(UserWarning, match=rf"Removed what exports to '.*export' that were killed .*'{leftover.name}'"):
        assert main(["export", str(run / "checkpoints" / "last.ckpt"), str(target), "--overwrite"]) == 0
    assert not leftover.exists()
    assert all((folder / "keep.txt").read_text() == "mine" for folder in others)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["export", *(f.name for f in others)])
    assert json.loads((target / "export_manifest.json").read_text())["library_name"] == "mambaout-pl"


def test_a_refused_export_never_touches_the_staging_folder_of_the_export_running_now(
    run: Path, tmp_path: Path, capsys
) -> None:
    from mambaout_pl.export.target import staged_export

    target = tmp_path / "export"
    with staged_export(target, overwrite=False) as staging:  # an export under way: it holds the reservation
        (staging / "model.safetensors").write_bytes(b"being written")
        assert main(["export", str(run / "checkpoints" / "last.ckpt"), str(target), "--overwrite"]) == 2
        assert "is reserved by another command that is running now" in last_error_line(capsys)
        assert (staging / "model.safetensors").read_bytes() == b"being written"
    assert (target / "model.safetensors").read_bytes() == b"being written"


def corrupt_copy(images: Path, scratch: Path) -> Path:
    """The image folder with its validation images replaced by files that are no images."""
    folder = Path(shutil.copytree(images, scratch / "broken"))
    for path in (folder / "validation").rglob("*.png"):
        path.write_bytes(b"\x89PNG cut short")
    return folder


def test_a_fit_that_fails_on_its_data_leaves_no_version_folder(images: Path, tmp_path: Path, capsys) -> None:
    broken, root = corrupt_copy(images, tmp_path / "scratch"), tmp_path / "runs"
    with pytest.raises(SystemExit):
        main(tiny_fit_args(root, broken))
    assert "cat_0.png" in last_error_line(capsys)
    assert list((root / "lightning_logs").iterdir()) == []  # no version_0 with an events file, hparams, config
    run_cli(tiny_fit_args(root, images))  # the next run takes the number
    assert [path.name for path in (root / "lightning_logs").iterdir()] == ["version_0"]
    assert (root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt").exists()


def test_a_validate_of_a_run_that_fails_leaves_the_run_as_it_was(
    images: Path, run: Path, tmp_path: Path, capsys
) -> None:
    root = Path(shutil.copytree(run.parent.parent, tmp_path / "root"))
    copied = root / "lightning_logs" / "version_0"
    broken = corrupt_copy(images, tmp_path / "scratch")
    before = snapshot(root)
    with pytest.raises(SystemExit):
        main(["validate", *tiny_fit_args(root, broken)[1:], f"--ckpt_path={copied / 'checkpoints' / 'last.ckpt'}"])
    assert "cat_0.png" in last_error_line(capsys)
    assert snapshot(root) == before  # no version_0/validate folder left, nothing else changed


def test_a_predict_that_fails_leaves_no_folder(images: Path, run: Path, tmp_path: Path, capsys) -> None:
    broken, root = corrupt_copy(images, tmp_path / "scratch"), tmp_path / "runs"
    with pytest.raises(SystemExit):
        main(
            [
                "predict",
                f"--config={run / 'config.yaml'}",
                f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
                f"--data.predict_images={broken / 'validation'}",
                f"--trainer.default_root_dir={root}",
            ]
        )
    assert "cat_0.png" in last_error_line(capsys)
    assert [path for path in root.rglob("*") if not path.is_dir()] == []  # no predictions.csv, no events file


@pytest.mark.parametrize(
    ("files", "unused"),
    [
        (
            {"events.out.tfevents.1.host.1.0": b"x", "hparams.yaml": b"a: 1", "config.yaml": b"b: 2", "predict/": None},
            True,
        ),
        ({"events.out.tfevents.1.host.1.0": b"x", "metrics.csv": b"epoch,step,train/loss\n"}, True),
        ({"events.out.tfevents.1.host.1.0": b"x", "metrics.csv": b"epoch,step,train/loss\n0,1,0.5\n"}, False),
        ({"events.out.tfevents.1.host.1.0": b"x", "checkpoints/last.ckpt": b"weights"}, False),
        ({"config.yaml": b"b: 2", "predict/predictions.csv": b"index,label\n"}, False),
        ({"config.yaml": b"b: 2", ".fit.lock": b"{}"}, False),  # another command's reservation
    ],
    ids=["starting files", "metrics header", "metrics rows", "a checkpoint", "a predictions file", "a lock"],
)
def test_which_run_folders_count_as_unused(files: dict[str, bytes | None], unused: bool, tmp_path: Path) -> None:
    folder = tmp_path / "version_3"
    for name, content in files.items():
        path = folder / name
        if content is None:
            path.mkdir(parents=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
    assert is_unused_run_folder(folder) is unused


# ---------------------------------------------------------------------------------------------
# small ones: profile inputs too large, skip_corrupt through the CLI, the stray line on a stop


def test_profile_refuses_an_input_too_large_for_memory_before_running_it(capsys) -> None:
    assert main(["profile", "--model", "mambaout_femto", "--image-size", "100000", "100000", "--warmup", "0"]) == 2
    captured = capsys.readouterr()
    line = captured.err.strip().splitlines()[-1]
    assert re.fullmatch(
        r"mambaout profile: error: --image-size 100000 100000 with --batch-size 16 is too large for mambaout_femto "
        r"on cpu: the input batch and its largest layer output alone take \d+\.\d GiB, and \d+\.\d GiB are free\. "
        r"Give a smaller --image-size or --batch-size, or --steps 0 to count parameters and GMACs only\.",
        line,
    ), line
    needed = float(re.search(r"take (\d+\.\d) GiB", line).group(1))
    assert needed > 16 * 3 * 100000**2 * 4 / 2**30  # more than the input batch alone
    assert "img/s" not in captured.out  # no table: nothing was timed
    assert main(["profile", "--model", "mambaout_femto", "--image-size", "100000", "100000", "--steps", "0"]) == 0


def test_skip_corrupt_through_the_cli_names_the_file_and_the_real_count(images: Path, tmp_path: Path, capsys) -> None:
    broken = corrupt_copy(images, tmp_path / "scratch")
    with pytest.raises(SystemExit), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one "Skipped" warning per image
        main(tiny_fit_args(tmp_path / "runs", broken, "--data.skip_corrupt=true"))
    line = last_error_line(capsys)
    assert "none of the 3 images of split 'validation' can be decoded" in line and "consecutive" not in line
    assert re.search(r"broken/validation/\w+/\w+_0\.png", line), line


class SignalAfterFirstStep(Callback):
    """Send this process a real SIGTERM after the first training step, once PreemptionCheckpoint handles it."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        (preemption,) = [cb for cb in trainer.callbacks if isinstance(cb, PreemptionCheckpoint)]
        assert signal.getsignal(signal.SIGTERM) == preemption._on_signal  # never signal pytest itself
        signal.raise_signal(signal.SIGTERM)


def test_a_run_stopped_by_sigterm_saves_without_lightnings_weights_only_line(
    images: Path, tmp_path: Path, monkeypatch
) -> None:
    """The line came from saving, not loading: `trainer.save_checkpoint` without `weights_only` logs that it
    defaulted to False (a whole, resumable checkpoint). PreemptionCheckpoint says False itself."""
    records: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: records.append(record.getMessage())
    connector = logging.getLogger("lightning.pytorch.trainer.connectors.checkpoint_connector")
    monkeypatch.setattr(connector, "level", logging.INFO)
    connector.addHandler(handler)
    hold = tmp_path / "signal.yaml"
    hold.write_text(yaml.safe_dump({"trainer": {"callbacks": [{"class_path": f"{__name__}.SignalAfterFirstStep"}]}}))
    try:
        with pytest.raises(SystemExit) as raised:
            run_cli(tiny_fit_args(tmp_path, images, "--trainer.max_epochs=3", f"--config={hold}"))
    finally:
        connector.removeHandler(handler)
    assert raised.value.code == 128 + signal.SIGTERM
    assert not [message for message in records if "weights_only" in message], records
    saved = read_checkpoint(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == 1 and saved["optimizer_states"] and saved["loops"]  # whole: it resumes


# ---------------------------------------------------------------------------------------------
# label maps once saved as JPEG


def jpeg_damaged(labels: np.ndarray, quality: int = 75) -> np.ndarray:
    """``labels`` compressed as JPEG and read back: what a label map saved as JPEG once, then as PNG, holds."""
    buffer = io.BytesIO()
    Image.fromarray(labels.astype(np.uint8), mode="L").save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer)).astype(np.uint8)


def banded_labels(width: int, height: int, values: tuple[int, ...]) -> np.ndarray:
    """Diagonal bands of ``values``: edges across JPEG's 8x8 blocks (whose ringing fills the gaps between values)."""
    rows, columns = np.indices((height, width))
    band = (rows + columns) * len(values) // (height + width - 1)
    return np.asarray(values, dtype=np.uint8)[band]


def replace_training_label_maps(ade20k_folder: Path, make) -> list[Path]:
    paths = sorted((ade20k_folder / "annotations" / "training").glob("*.png"))
    for path in paths:
        width, height = Image.open(path).size
        Image.fromarray(make(width, height), mode="L").save(path)
    return paths


def test_a_label_map_damaged_by_jpeg_warns_naming_the_file_and_the_values(ade20k_folder: Path, tmp_path: Path) -> None:
    paths = replace_training_label_maps(ade20k_folder, lambda w, h: jpeg_damaged(banded_labels(w, h, (1, 40, 90))))
    damaged = np.asarray(Image.open(paths[0]))
    assert set(np.unique(damaged)) - {1, 40, 90} and damaged.max() <= 150  # every value a class of ADE20K
    dm = make_segmentation_module(tmp_path, path="ade20k", data_dir=str(ade20k_folder), reduce_zero_label=True)
    dm.setup("fit")
    with pytest.warns(DamagedLabelMapWarning) as caught:
        first, second = dm.datasets["train"][0], dm.datasets["train"][1]
    (warning,) = caught  # one per split, not one per file
    message = str(warning.message)
    assert message.startswith(f"Label map '{paths[0]}' looks damaged by lossy (JPEG) compression: label value(s) ")
    values = sorted(set(np.unique(damaged).tolist()) - {0, 1, 40, 90})  # 0: ignored (reduce_zero_label)
    listed = re.search(
        r"label value\(s\) ([\d, .]+) \((\d+) values, (\d+) pixels\) occur only along the edges", message
    )
    assert (
        listed and int(listed.group(2)) == len(values) and int(listed.group(3)) == int(np.isin(damaged, values).sum())
    )
    assert listed.group(1).startswith(", ".join(str(v) for v in values[:3]))
    assert "Recreate the label maps from the original labels, saved losslessly (PNG)" in message
    assert first["mask"].shape == second["mask"].shape  # a warning, not a refusal: the data still loads


def test_a_jpeg_damaged_label_map_with_values_that_are_no_class_is_refused_with_the_cause(
    ade20k_folder: Path, tmp_path: Path
) -> None:
    paths = replace_training_label_maps(ade20k_folder, lambda w, h: jpeg_damaged(banded_labels(w, h, (1, 40, 90))))
    dm = make_segmentation_module(tmp_path, path="ade20k", data_dir=str(ade20k_folder), num_classes=91)
    dm.setup("fit")
    assert np.asarray(Image.open(paths[0])).max() > 90  # the ringing overshoots the 91 classes
    with pytest.raises(InvalidLabelError) as raised:
        dm.datasets["train"][0]
    message = str(raised.value)
    assert message.startswith(f"Label map '{paths[0]}' holds label value(s) ")
    assert "occur only along the edges between regions, as lossy (JPEG) compression leaves them" in message
    assert "no class in [0, 91) nor the ignore index 255: it was saved as JPEG at some point" in message


def test_thin_objects_in_a_clean_label_map_raise_no_warning(ade20k_folder: Path, tmp_path: Path) -> None:
    def thin(width: int, height: int) -> np.ndarray:
        labels = banded_labels(width, height, (1, 40))
        labels[:, 5] = 7  # a pole, one pixel wide
        labels[20, :] = 9  # a wire
        return labels

    replace_training_label_maps(ade20k_folder, thin)
    dm = make_segmentation_module(tmp_path, path="ade20k", data_dir=str(ade20k_folder), reduce_zero_label=True)
    dm.setup("fit")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DamagedLabelMapWarning)
        sample = dm.datasets["train"][0]
    assert sample["mask"].ndim == 2


# ---------------------------------------------------------------------------------------------
# the segmentation scores at the edges, against mmsegmentation's IoUMetric re-implemented here
#
# What IoUMetric does (mmseg/evaluation/metrics/iou_metric.py), re-implemented independently in numpy:
# per image, pixels labelled ignore_index are dropped; the intersection, prediction and label areas are
# torch.histc histograms with num_classes bins over [0, num_classes - 1] (values outside the range are not
# counted); union = prediction + label - intersection. The areas are summed over the images (float32).
# aAcc = sum(intersection) / sum(label), IoU = intersection / union, Acc = intersection / label (0 / 0 is
# NaN), and mIoU, mAcc are np.nanmean of IoU and Acc (NaN when all are NaN). The reported numbers are these
# times 100, rounded to 2 decimals; the comparison here is before that rounding.


def mmseg_scores(predictions: list[np.ndarray], labels: list[np.ndarray], num_classes: int, ignore_index: int):
    def histogram(values: np.ndarray) -> np.ndarray:
        inside = values[(values >= 0) & (values <= num_classes - 1)]
        return np.bincount(inside.astype(np.int64), minlength=num_classes).astype(np.float32)

    totals = np.zeros((4, num_classes), dtype=np.float32)
    for prediction, label in zip(predictions, labels, strict=True):
        kept = label != ignore_index
        prediction, label = prediction[kept], label[kept]
        intersection = histogram(prediction[prediction == label])
        predicted, labelled = histogram(prediction), histogram(label)
        totals += np.stack([intersection, predicted + labelled - intersection, predicted, labelled])
    intersection, union, _, labelled = totals
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "Mean of empty slice"
        iou, accuracy = intersection / union, intersection / labelled
        return {
            "aAcc": np.float32(intersection.sum()) / np.float32(labelled.sum()),
            "mIoU": np.nanmean(iou),
            "mAcc": np.nanmean(accuracy),
            "IoU": iou,
            "Acc": accuracy,
        }


def our_scores(predictions: list[np.ndarray], labels: list[np.ndarray], num_classes: int, ignore_index: int):
    metrics = segmentation_metrics(num_classes, ignore_index)
    for prediction, label in zip(predictions, labels, strict=True):
        metrics.update(torch.from_numpy(prediction)[None], torch.from_numpy(label)[None])
    results = metrics.compute()
    scores = confusion_scores(results["val/confusion"])
    return {**{name: value.numpy() for name, value in scores.items()}, "logged mIoU": results["val/mIoU"].numpy()}


def assert_equal_scores(ours: dict, theirs: dict) -> None:
    """Equal to float32 rounding (mmsegmentation sums in float32, we count exactly), NaN exactly where theirs is."""
    for name in ("aAcc", "mIoU", "mAcc", "IoU", "Acc"):
        np.testing.assert_allclose(
            np.asarray(ours[name], dtype=np.float64), theirs[name], rtol=1e-6, atol=0, equal_nan=True, err_msg=name
        )
    np.testing.assert_allclose(ours["logged mIoU"], theirs["mIoU"], rtol=1e-6, equal_nan=True, err_msg="logged")


PREDICTION = np.array([[0, 1, 2], [1, 1, 0]])
EDGE_CASES = [
    ("no valid pixel at all", [PREDICTION], [np.full((2, 3), 255)], 255),
    ("ignore_index inside the class range", [PREDICTION], [np.array([[0, 1, 1], [2, 1, 0]])], 1),
    ("labels outside the class range", [PREDICTION], [np.array([[0, 7, 2], [1, -1, 0]])], 255),
    ("one image without a valid pixel among others", [PREDICTION, PREDICTION], [np.full((2, 3), 255), PREDICTION], 255),
]


@pytest.mark.parametrize(
    ("predictions", "labels", "ignore_index"), [case[1:] for case in EDGE_CASES], ids=[c[0] for c in EDGE_CASES]
)
def test_segmentation_scores_equal_mmsegmentations_at_the_edges(predictions, labels, ignore_index: int) -> None:
    theirs = mmseg_scores(predictions, labels, 3, ignore_index)
    assert_equal_scores(our_scores(predictions, labels, 3, ignore_index), theirs)


def test_the_edge_cases_are_what_they_say() -> None:
    """The reference's values on the cases above, by hand: the cases are degenerate the way their names say."""
    nothing = mmseg_scores(*EDGE_CASES[0][1:3], 3, 255)
    assert all(math.isnan(float(nothing[name])) for name in ("aAcc", "mIoU", "mAcc"))
    ignored = mmseg_scores(*EDGE_CASES[1][1:3], 3, 1)  # class 1 is never labelled, but predicted at pixel (1, 0)
    np.testing.assert_allclose(ignored["IoU"], [1.0, 0.0, 0.0])
    assert math.isnan(ignored["Acc"][1]) and ignored["mIoU"] == pytest.approx(1 / 3)  # class 1 in the mean, as 0
    outside = mmseg_scores(*EDGE_CASES[2][1:3], 3, 255)  # labels 7 and -1: their predictions count, their labels not
    np.testing.assert_allclose(outside["IoU"], [1.0, 1 / 3, 1.0], rtol=1e-6)  # class 1 predicted there: union 3
    assert outside["aAcc"] == 1.0  # the 4 pixels labelled with a class are all right


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_classes=st.integers(2, 6),
    ignore=st.sampled_from(["255", "inside"]),
    seed=st.integers(0, 2**32 - 1),
    images=st.integers(1, 3),
    empty=st.floats(0.0, 1.0),
)
def test_segmentation_scores_equal_mmsegmentations_on_random_degenerate_inputs(
    num_classes: int, ignore: str, seed: int, images: int, empty: float
) -> None:
    rng = np.random.default_rng(seed)
    ignore_index = 255 if ignore == "255" else int(rng.integers(0, num_classes))
    predictions, labels = [], []
    for _ in range(images):
        shape = tuple(rng.integers(1, 6, size=2))
        labels_drawn = rng.integers(-1, num_classes + 2, size=shape)  # some outside the classes
        labels_drawn[rng.random(shape) < empty] = ignore_index  # up to nothing scored
        predictions.append(rng.integers(0, num_classes, size=shape))
        labels.append(labels_drawn)
    theirs = mmseg_scores(predictions, labels, num_classes, ignore_index)
    assert_equal_scores(our_scores(predictions, labels, num_classes, ignore_index), theirs)


def test_the_task_logs_the_scores_mmsegmentation_gives_with_ignore_index_a_class(tmp_path: Path) -> None:
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    from mambaout_pl.tasks import SegmentationTask

    labels = np.array([[[0, 1, 1, 2], [2, 1, 0, 0]]])
    predictions = np.array([[[0, 1, 2, 2], [1, 1, 0, 2]]])

    class Fixed(SegmentationTask):
        def predict_log_probabilities(self, batch):
            scores = torch.nn.functional.one_hot(torch.from_numpy(predictions), 3).permute(0, 3, 1, 2).float()
            return list((scores * 0.98 + 0.01).log())

    task = Fixed(
        backbone="mambaout_femto", decode_channels=16, aux_channels=8, num_classes=3, ignore_index=1, num_val_images=0
    )
    trainer = Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    batch = {"image": torch.zeros(1, 3, 2, 4), "mask": torch.from_numpy(labels)}
    logged = trainer.validate(task, DataLoader([batch], batch_size=None), verbose=False)[0]
    theirs = mmseg_scores(list(predictions), list(labels), 3, 1)
    for name in ("mIoU", "mAcc", "aAcc"):
        assert logged[f"val/{name}"] == pytest.approx(float(theirs[name]), rel=1e-6), name
    assert logged["val/mIoU"] != pytest.approx(np.mean(theirs["IoU"][[0, 2]]))  # class 1 is not dropped from the mean
