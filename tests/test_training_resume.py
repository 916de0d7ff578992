"""Resume rules: what a task checkpoint records, which settings may change, exact random generators."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mambaout_pl.errors import CheckpointMismatchError
from mambaout_pl.tasks import ClassificationTask
from mambaout_pl.training.resume import (
    CHECKPOINT_KEY,
    RESUME_MAY_CHANGE,
    differing_hyperparameters,
    mark_checkpoint,
    restore_checkpoint,
    rng_states,
    saved_model_settings,
    set_rng_states,
)

TINY_BACKBONE = {"depths": [1, 1, 1, 1], "dims": [8, 8, 16, 16]}


def tiny_task(**kwargs) -> ClassificationTask:
    return ClassificationTask(num_classes=4, backbone_args=dict(TINY_BACKBONE), **kwargs)


def checkpoint_of(task: ClassificationTask) -> dict:
    checkpoint = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    mark_checkpoint(task, checkpoint)
    return checkpoint


def test_random_generators_continue_exactly_after_a_restore() -> None:
    states = rng_states()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(3)  # move on, as training would
    set_rng_states(states)
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])


def test_differing_hyperparameters_treat_tuples_as_lists_and_missing_as_none() -> None:
    saved = {"betas": [0.9, 0.999], "lr": 0.002, "_instantiator": "x"}
    current = {"betas": (0.9, 0.999), "lr": 0.5, "warmup_steps": None}
    assert differing_hyperparameters(saved, current) == {"lr": (0.002, 0.5)}


def test_resuming_fit_refuses_other_settings_except_those_that_may_change() -> None:
    task = tiny_task(lr=0.002)
    checkpoint = checkpoint_of(task)
    assert checkpoint[CHECKPOINT_KEY]["task"] == "mambaout_pl.tasks.classification.ClassificationTask"
    assert set(RESUME_MAY_CHANGE) == {"pretrained", "compile"}
    checkpoint["hyper_parameters"]["pretrained"] = "imagenet.pth"
    restore_checkpoint(task, checkpoint, "Checkpoint 'a.ckpt'", resuming=True)  # pretrained may change
    writes_elsewhere = tiny_task(lr=0.002, predict_dir="elsewhere", predict_top_k=2, predict_format="jsonl")
    restore_checkpoint(writes_elsewhere, checkpoint, "Checkpoint 'a.ckpt'", resuming=True)  # output settings too
    other = tiny_task(lr=0.5)
    with pytest.raises(
        CheckpointMismatchError,
        match=r"Checkpoint 'a\.ckpt' was written with other model settings.*'lr': \(0\.002, 0\.5\)",
    ):
        restore_checkpoint(other, checkpoint, "Checkpoint 'a.ckpt'", resuming=True)
    restore_checkpoint(other, checkpoint, "Checkpoint 'a.ckpt'", resuming=False)  # validate/test: weights only


def test_saved_model_settings_become_a_cli_model_entry() -> None:
    hparams = {"_class_path": "mambaout_pl.tasks.ClassificationTask", "_instantiator": "x", "lr": 0.1}
    assert saved_model_settings({"hyper_parameters": hparams}) == {
        "class_path": "mambaout_pl.tasks.ClassificationTask",
        "dict_kwargs": {"lr": 0.1},
    }
    assert saved_model_settings({"hyper_parameters": {"lr": 0.1}}) == {"lr": 0.1}
    assert saved_model_settings({"state_dict": {}}) is None
