"""PreemptionCheckpoint in real runs: SIGTERM / SIGINT save ``last.ckpt``, and ``fit --ckpt_path last``
continues exactly as the uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import write_image_folder
from helpers import small_run_args

from mambaout_pl.cli import run_cli

# Several processes each: one xdist worker runs them all, one after another.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("processes")]

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
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{index}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_training_state(resumed: dict[str, Any], reference: dict[str, Any]) -> None:
    assert (
        (resumed["epoch"], resumed["global_step"])
        == (reference["epoch"], reference["global_step"])
        == (1, 2 * BATCHES_PER_EPOCH)
    )
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


def preempt(
    root: Path,
    image_folder: Path,
    signum: signal.Signals,
    stage: str,
    epoch: int,
    batch: int,
    group: bool = False,
    extra_args: tuple[str, ...] = (),
    launcher: tuple[str, ...] = (),
) -> tuple[int, str]:
    """Run `python -m mambaout_pl fit` until it reaches (stage, epoch, batch), then send ``signum``.

    ``group``: to the run's whole process group (workers and other ranks too, as ``timeout``,
    ``kill -- -PGID`` and cluster schedulers do), else to the main process only. Returns once every
    process of the group has exited. ``launcher``: Python arguments that start the run
    (``-m torch.distributed.run ...``) in place of running it directly.
    """
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
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    }
    process = subprocess.Popen(
        [
            sys.executable,
            *launcher,
            "-m",
            "mambaout_pl",
            *fit_args(root, image_folder),
            f"--config={extra}",
            *extra_args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,  # its own process group, led by the main process
    )
    deadline = time.monotonic() + 300
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if process.poll() is None:
        if group:
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)
    try:
        output, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
    assert group_exits(process.pid), "processes of the run outlived it"
    return process.returncode, output


def group_exits(pgid: int, timeout: float = 60.0) -> bool:
    """Wait until no process of group ``pgid`` is left (other ranks, dataloader workers); kill them after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    os.killpg(pgid, signal.SIGKILL)
    return False


WORKERS = ("--data.num_workers=2", "--data.persistent_workers=false")  # workers forked anew for each pass


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
    assert "weights_only" not in output  # Lightning's "`weights_only` was not set" of a save without it
    checkpoints = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    saved = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == saved_step
    assert not list(checkpoints.glob(".*"))  # no temporary files left behind

    with one_thread():
        # the same command (its armed callback finds the marker), continuing the run's own folder
        resumed = run_cli(
            [*fit_args(tmp_path, image_folder), f"--config={tmp_path / 'inject.yaml'}", "--ckpt_path=last"]
        )
    assert Path(resumed.trainer.ckpt_path) == checkpoints / "last.ckpt"
    assert sorted(path.name for path in (tmp_path / "lightning_logs").iterdir()) == ["version_0"]
    assert_same_training_state(last_checkpoint(tmp_path, 0), reference_run)


@pytest.mark.parametrize(
    ("signum", "stage", "epoch", "batch", "saved_step"),
    [
        (signal.SIGTERM, "train", 1, 1, BATCHES_PER_EPOCH + 2),
        (signal.SIGINT, "validation", 0, 0, BATCHES_PER_EPOCH),  # Ctrl+C in a terminal signals the foreground group
    ],
    ids=["sigterm-mid-epoch", "sigint-during-validation"],
)
def test_signal_to_the_whole_process_group_with_dataloader_workers_saves_and_resumes(
    signum, stage, epoch, batch, saved_step, images, tmp_path
) -> None:
    returncode, output = preempt(tmp_path, images, signum, stage, epoch, batch, group=True, extra_args=WORKERS)
    assert returncode == 128 + signum, output[-3000:]
    assert f"Stopped by {signum.name}" in output
    assert "weights_only" not in output  # Lightning's "`weights_only` was not set" of a save without it
    checkpoints = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    saved = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == saved_step

    with one_thread():
        resumed = run_cli(
            [*fit_args(tmp_path, images), f"--config={tmp_path / 'inject.yaml'}", *WORKERS, "--ckpt_path=last"]
        )
    assert Path(resumed.trainer.ckpt_path) == checkpoints / "last.ckpt"
    assert (resumed.trainer.current_epoch, resumed.trainer.global_step) == (2, 2 * BATCHES_PER_EPOCH)


def test_signal_during_the_sanity_check_saves_before_the_first_step_and_exits_143(images, tmp_path) -> None:
    returncode, output = preempt(tmp_path, images, signal.SIGTERM, "sanity", 0, 0, group=True, extra_args=WORKERS)
    assert returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "Stopped by SIGTERM at epoch 0, global step 0" in output
    saved = torch.load(
        tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert (saved["epoch"], saved["global_step"]) == (0, 0)


def test_two_process_ddp_run_signalled_as_a_group_stops_every_rank_at_the_same_batch(images, tmp_path) -> None:
    # 24 training images on 2 ranks in batches of 4: 3 batches per rank and epoch.
    ddp = ("--trainer.devices=2", "--trainer.strategy=ddp", *WORKERS)
    returncode, output = preempt(tmp_path, images, signal.SIGTERM, "train", 1, 1, group=True, extra_args=ddp)
    assert returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "Stopped by SIGTERM at epoch 1, global step 5" in output
    saved = torch.load(
        tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert (saved["epoch"], saved["global_step"]) == (1, 5)
    (data_state,) = [state for key, state in saved.items() if key.endswith("DataModule")]
    assert data_state["train_loader"] == {"epoch": 1, "consumed": 2}


def test_two_process_torchrun_run_signalled_as_a_group_saves_at_the_same_batch_on_every_rank(images, tmp_path) -> None:
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2")
    ddp = ("--trainer.devices=2", "--trainer.strategy=ddp", *WORKERS)
    returncode, output = preempt(
        tmp_path, images, signal.SIGTERM, "train", 1, 1, group=True, extra_args=ddp, launcher=torchrun
    )
    # torchrun forwards the signal to the ranks, waits for them, then reports its own signal as a failure.
    assert returncode != 0
    assert "Stopped by SIGTERM at epoch 1, global step 5" in output, output[-3000:]
    saved = torch.load(
        tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert (saved["epoch"], saved["global_step"]) == (1, 5)
