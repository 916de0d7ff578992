"""Checkpoint files: atomic writes that survive a kill, one reader that refuses pickled objects and truncated files."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mambaout_pl.errors import CheckpointError, UnsafeCheckpointError
from mambaout_pl.training import (
    AtomicCheckpointIO,
    atomic_torch_save,
    read_checkpoint,
    staged_folder,
)

KILL_WHILE_SAVING = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import torch
    from mambaout_pl.training import AtomicCheckpointIO

    class KillWhenPickled:
        def __reduce__(self):
            os.kill(os.getpid(), signal.SIGKILL)  # dies with part of the new checkpoint written

    path = Path(sys.argv[1])
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.arange(4.0)}, "global_step": 1}, path)
    print("first save done", flush=True)
    io.save_checkpoint({"state_dict": {"w": torch.zeros(1_000_000)}, "global_step": 2, "x": KillWhenPickled()}, path)
    """
)


@pytest.mark.slow
def test_a_kill_while_saving_leaves_the_previous_checkpoint_intact(tmp_path: Path) -> None:
    script = tmp_path / "kill_while_saving.py"
    script.write_text(KILL_WHILE_SAVING)
    path = tmp_path / "checkpoints" / "last.ckpt"
    result = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert "first save done" in result.stdout
    checkpoint = AtomicCheckpointIO().load_checkpoint(path)
    assert checkpoint["global_step"] == 1 and torch.equal(checkpoint["state_dict"]["w"], torch.arange(4.0))
    # the interrupted write went to a temporary file that was never renamed into place (a plain
    # open(path, "wb") would have truncated last.ckpt at this point)
    assert len(list(path.parent.glob(".last.ckpt.*.tmp"))) == 1


def test_a_failed_save_removes_its_temporary_file_and_keeps_the_target(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, path)
    with pytest.raises(Exception):
        atomic_torch_save({"step": 2, "unpicklable": lambda: None}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_loading_refuses_pickled_objects_and_truncated_files(tmp_path: Path) -> None:
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "object": Path("x")}, pickled)  # an arbitrary class: refused by weights_only
    with pytest.raises(CheckpointError, match="pickled.ckpt.*Python objects other than tensors"):
        AtomicCheckpointIO().load_checkpoint(pickled)
    truncated = tmp_path / "truncated.ckpt"
    atomic_torch_save({"state_dict": {"w": torch.ones(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="truncated.ckpt.*truncated, or not written by torch.save"):
        AtomicCheckpointIO().load_checkpoint(truncated)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "missing.ckpt")


def test_one_reader_for_every_checkpoint_names_the_file_and_the_fix(tmp_path: Path) -> None:
    weights = tmp_path / "weights.pth"
    torch.save({"head.fc.weight": torch.zeros(3, 16)}, weights)
    with pytest.raises(
        CheckpointError, match=r"weights\.pth' is not a training checkpoint.*\['head\.fc\.weight'\].*model\.pretrained"
    ):
        read_checkpoint(weights)
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "object": Path("x")}, pickled)
    with pytest.raises(UnsafeCheckpointError, match="pickled.ckpt"):
        read_checkpoint(pickled)
    good = tmp_path / "good.ckpt"
    atomic_torch_save({"state_dict": {"w": torch.arange(3.0)}, "epoch": 2}, good)
    checkpoint = read_checkpoint(good)
    assert checkpoint["epoch"] == 2 and torch.equal(checkpoint["state_dict"]["w"], torch.arange(3.0))


def test_a_staged_folder_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "export"
    with pytest.raises(OSError, match="disk full"):
        with staged_folder(target) as staging:
            (staging / "model.safetensors").write_bytes(b"partial")
            raise OSError("disk full")
    assert list(tmp_path.iterdir()) == []
    with staged_folder(target) as staging:
        (staging / "a.txt").write_text("first")
    with staged_folder(target) as staging:  # kept: another writer got there first
        (staging / "a.txt").write_text("second")
    assert (target / "a.txt").read_text() == "first"
    with staged_folder(target, replace=True) as staging:
        (staging / "b.txt").write_text("third")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no staging or retired folder left
