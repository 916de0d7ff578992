"""Faults injected into real runs: pre-emption by SIGTERM / SIGINT and exact resume, a kill while a
checkpoint is written, non-finite losses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch import Callback, Trainer

from conftest import write_image_folder
from helpers import small_run_args

from mambaout_pl.checkpointing import AtomicCheckpointIO, CheckpointError, atomic_torch_save
from mambaout_pl.cli import run_cli
from mambaout_pl.tasks import ClassificationTask
from mambaout_pl.tasks.base import NonFiniteLossError

ROOT = Path(__file__).parents[1]
RECIPE = ROOT / "recipes" / "quickstart.yaml"
TINY_BACKBONE = '{"depths": [1, 1, 1, 1], "dims": [8, 8, 16, 16]}'
BATCHES_PER_EPOCH = 4  # of the 6 batches of 4 that the 24 training images of `write_image_folder` make


def fit_args(root: Path, image_folder: Path) -> list[str]:
    """Two short epochs of a tiny MambaOut with augmentation, drop path and EMA: everything a resume must restore."""
    return [
        "fit",
        f"--config={RECIPE}",
        *small_run_args(root, image_folder),
        "--trainer.max_epochs=2",
        f"--trainer.limit_train_batches={BATCHES_PER_EPOCH}",
        "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1",
        "--data.image_size=32",
        f"--model.backbone_args={TINY_BACKBONE}",
        "--model.drop_path_rate=0.1",
        "--model.ema_decay=0.9",
    ]


def last_checkpoint(root: Path, version: int) -> dict[str, Any]:
    path = root / "lightning_logs" / f"version_{version}" / "checkpoints" / "last.ckpt"
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same(a: Any, b: Any, where: str = "checkpoint") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{index}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_training_state(resumed: dict[str, Any], reference: dict[str, Any]) -> None:
    assert (resumed["epoch"], resumed["global_step"]) == (reference["epoch"], reference["global_step"]) == (1, 2 * BATCHES_PER_EPOCH)
    assert_same(resumed["state_dict"], reference["state_dict"], "state_dict")
    assert_same(resumed["optimizer_states"], reference["optimizer_states"], "optimizer_states")
    assert_same(resumed["lr_schedulers"], reference["lr_schedulers"], "lr_schedulers")
    (ema_key,) = [key for key in reference["callbacks"] if key.startswith("EMAWeightAveraging")]
    assert_same(resumed["callbacks"][ema_key], reference["callbacks"][ema_key], "EMA")
    assert resumed["mambaout_pl"]["metrics"] == reference["mambaout_pl"]["metrics"]
    assert {"val/top1", "val/loss"} <= set(reference["mambaout_pl"]["metrics"])


@contextmanager
def one_thread():
    """One intra-op thread, as the subprocess runs get through OMP_NUM_THREADS: same float reductions."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def reference_run(images: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("uninterrupted")
    image_folder = images
    with one_thread():
        run_cli(fit_args(root, image_folder))
    return last_checkpoint(root, 0)


def preempt(root: Path, image_folder: Path, signum: signal.Signals, stage: str, epoch: int, batch: int) -> tuple[int, str]:
    """Run `python -m mambaout_pl fit` until it reaches (stage, epoch, batch), then send it ``signum``."""
    marker = root / "reached"
    extra = root / "inject.yaml"
    extra.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "callbacks": [
                        {
                            "class_path": "fault_injection.WaitForSignal",
                            "init_args": {"marker": str(marker), "epoch": epoch, "batch": batch, "stage": stage},
                        }
                    ]
                }
            }
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [sys.executable, "-m", "mambaout_pl", *fit_args(root, image_folder), f"--config={extra}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 300
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if process.poll() is None:
        process.send_signal(signum)
    try:
        output, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    return process.returncode, output


@pytest.mark.parametrize(
    ("signum", "stage", "epoch", "batch", "saved_step"),
    [
        (signal.SIGTERM, "train", 1, 2, BATCHES_PER_EPOCH + 3),  # mid-epoch: after the third batch of epoch 1
        # during validation: saved when it ends, after a shortened epoch (limit_train_batches)
        (signal.SIGINT, "validation", 0, 0, BATCHES_PER_EPOCH),
    ],
    ids=["sigterm-mid-epoch", "sigint-during-validation"],
)
def test_preempted_run_saves_and_resumes_exactly_as_the_uninterrupted_run(
    signum, stage, epoch, batch, saved_step, reference_run, images, tmp_path
) -> None:
    image_folder = images
    returncode, output = preempt(tmp_path, image_folder, signum, stage, epoch, batch)
    assert returncode == 128 + signum, output[-3000:]
    assert f"Stopped by {signum.name}" in output
    checkpoints = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    saved = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == saved_step
    assert not list(checkpoints.glob(".*"))  # no temporary files left behind

    with one_thread():
        resumed = run_cli([*fit_args(tmp_path, image_folder), "--ckpt_path=last"])  # a new run version, same root
    assert Path(resumed.trainer.ckpt_path) == checkpoints / "last.ckpt"
    assert_same_training_state(last_checkpoint(tmp_path, 1), reference_run)


KILL_WHILE_SAVING = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import torch
    from mambaout_pl.checkpointing import AtomicCheckpointIO

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


# ---------------------------------------------------------------------------------------------
# non-finite losses


class PoisonedBatches(torch.utils.data.Dataset):
    """Colour-coded 16x16 images (4 classes); the images of batch ``poisoned`` hold a NaN."""

    def __init__(self, poisoned: int, batch_size: int = 4, batches: int = 3) -> None:
        generator = torch.Generator().manual_seed(0)
        self.labels = torch.arange(batch_size * batches) % 4
        self.images = torch.randn(len(self.labels), 3, 16, 16, generator=generator) + self.labels.view(-1, 1, 1, 1)
        self.images[poisoned * batch_size : (poisoned + 1) * batch_size, 0, 0, 0] = float("nan")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[index], "label": self.labels[index]}


def tiny_task(**kwargs: Any) -> ClassificationTask:
    import json

    return ClassificationTask(num_classes=4, backbone_args=json.loads(TINY_BACKBONE), lr=1e-2, **kwargs)


class WeightsAfterEachBatch(Callback):
    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.weights.append({name: tensor.clone() for name, tensor in pl_module.model.state_dict().items()})


def train(task: ClassificationTask, tmp_path: Path, poisoned: int, callbacks: list[Callback] = ()) -> Trainer:
    loader = torch.utils.data.DataLoader(PoisonedBatches(poisoned), batch_size=4)
    trainer = Trainer(
        default_root_dir=tmp_path, accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
    )
    trainer.fit(task, loader)
    return trainer


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_batch(tmp_path: Path) -> None:
    task = tiny_task()
    before = {name: tensor.clone() for name, tensor in task.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match=r"is nan at epoch 0, global step 1, batch 1 of the epoch.*nonfinite_loss: skip"):
        train(task, tmp_path, poisoned=1)
    after = task.state_dict()
    assert all(torch.isfinite(tensor).all() for tensor in after.values())  # stopped before the NaN reached the weights
    assert any(not torch.equal(before[name], after[name]) for name in before)  # batch 0 was trained on


def test_a_non_finite_loss_is_skipped_when_asked_and_leaves_the_weights_untouched(tmp_path: Path) -> None:
    task = tiny_task(nonfinite_loss="skip")
    recorder = WeightsAfterEachBatch()
    trainer = train(task, tmp_path, poisoned=1, callbacks=[recorder])
    assert task.skipped_batches == 1
    assert trainer.callback_metrics["train/skipped_batches"].item() == 1.0
    after_first, after_poisoned, after_third = recorder.weights
    assert_same(after_poisoned, after_first, "weights after the skipped batch")
    assert any(not torch.equal(after_third[name], after_poisoned[name]) for name in after_third)  # training goes on
    assert all(torch.isfinite(tensor).all() for tensor in after_third.values())


def test_nonfinite_loss_setting_is_checked() -> None:
    with pytest.raises(ValueError, match="nonfinite_loss='ignore' is not one of"):
        tiny_task(nonfinite_loss="ignore")
