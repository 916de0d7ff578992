"""The model summary `fit` prints counts the network's FLOPs on an input of the training data's size."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import write_image_folder
from detection_helpers import SMALL_TASK
from helpers import tiny_fit_args
from lightning.pytorch.utilities.model_summary import get_human_readable_count, summarize
from torch.utils.flop_counter import FlopCounterMode

from mambaout_pl.cli import run_cli
from mambaout_pl.tasks import ClassificationTask, InstanceSegmentationTask, SegmentationTask

TINY_BACKBONE = {"depths": [1, 1, 1, 1], "dims": [8, 8, 16, 16]}


def flops_of(forward: Callable[[], Any]) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        forward()
    return counter.get_total_flops()


def test_fit_prints_the_flops_of_the_training_image_size(tmp_path, capsys) -> None:
    images = write_image_folder(tmp_path / "images", train_per_class=2, val_per_class=1)
    cli = run_cli(tiny_fit_args(tmp_path / "runs", images, "--trainer.enable_progress_bar=true"))
    network = cli.model.model.eval()
    expected = flops_of(lambda: network(torch.zeros(1, 3, 32, 32)))  # --data.image_size=32
    assert expected > 2 * 14_000  # more than two FLOPs per weight: the convolutions slide over the image
    assert f"Total FLOPs: {get_human_readable_count(expected)}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("build", "data_hparams", "input_shape"),
    [
        (lambda: ClassificationTask(num_classes=3, backbone_args=TINY_BACKBONE), {"image_size": 48}, (1, 3, 48, 48)),
        (
            lambda: ClassificationTask(num_classes=3, backbone_args={**TINY_BACKBONE, "in_chans": 1}),
            {},  # no image size from the data: the network's default input
            (1, 1, 224, 224),
        ),
        (
            lambda: SegmentationTask(num_classes=4, backbone_args=TINY_BACKBONE, decode_channels=8, aux_channels=8),
            {"crop_size": [40, 56]},
            (1, 3, 40, 56),
        ),
        (lambda: InstanceSegmentationTask(**SMALL_TASK), {"min_size": 64}, (3, 64, 96)),  # the detector's resize
    ],
    ids=["classification", "classification without image size", "segmentation", "detection"],
)
def test_every_task_gives_the_summary_an_input_it_counts(build, data_hparams, input_shape) -> None:
    torch.manual_seed(0)
    task = build().eval()
    example = task.example_input(data_hparams)
    shape = example[0][0].shape if isinstance(example, tuple) else example.shape
    assert tuple(shape) == input_shape
    task.example_input_array = example
    counted = summarize(task).total_flops
    expected = flops_of(lambda: task(*example) if isinstance(example, tuple) else task(example))
    assert counted == expected > 0


def test_the_summary_input_follows_the_weights_dtype() -> None:
    """True half precision converts the weights before the summary runs; the input must follow."""
    task = ClassificationTask(num_classes=3, backbone_args=TINY_BACKBONE)
    task.example_input_array = task.example_input({"image_size": 32})
    full = summarize(task).total_flops
    task = task.to(torch.bfloat16)
    assert task.example_input_array.dtype == torch.bfloat16
    assert summarize(task).total_flops == full
