"""Resuming a task from a checkpoint: what a checkpoint records, what must fit, what may change.

A task checkpoint carries, beside Lightning's entries, a ``mambaout_pl`` entry (version, task
class, last metrics) and the random generators' states, so that ``fit --ckpt_path`` continues
exactly. Loading one written by another task, for another network or with other settings raises
:class:`CheckpointMismatchError` naming the file and the differences.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule

from mambaout_pl import __version__
from mambaout_pl.errors import CheckpointMismatchError

#: Key under which a task checkpoint records that mambaout-pl wrote it.
CHECKPOINT_KEY = "mambaout_pl"
#: Key under which a checkpoint keeps the random generators' states, for an exact resume.
RNG_STATES_KEY = "rng_states"
#: Hyper-parameters a resumed ``fit`` may change: where the first weights came from, and compilation.
RESUME_MAY_CHANGE = ("pretrained", "compile")


def task_name(task_class: type) -> str:
    """The dotted import path of a task class, as checkpoints record it."""
    return f"{task_class.__module__}.{task_class.__qualname__}"


def mark_checkpoint(task: LightningModule, checkpoint: dict[str, Any]) -> None:
    """Record mambaout-pl's version, the task class, its last metrics and the generators' states."""
    trainer = task._trainer
    metrics = (
        {
            name: float(value)
            for name, value in trainer.callback_metrics.items()
            if name.startswith(("val/", "test/")) and value.numel() == 1
        }
        if trainer is not None
        else {}
    )
    checkpoint[CHECKPOINT_KEY] = {"version": __version__, "task": task_name(type(task)), "metrics": metrics}
    checkpoint[RNG_STATES_KEY] = rng_states()


def restore_checkpoint(
    task: LightningModule, checkpoint: dict[str, Any], where: str, resuming: bool, check_weights: bool = True
) -> None:
    """Refuse a checkpoint that does not fit ``task``; when ``resuming`` a ``fit``, also one with other
    settings (except :data:`RESUME_MAY_CHANGE` and the task's ``output_settings``), then restore the random generators.

    ``check_weights=False``: the weights were loaded already (by a sharding strategy) and are not
    in ``checkpoint``; only the task class is checked.
    """
    check_checkpoint_fits(task, checkpoint, where, check_weights)
    if not resuming:
        return
    differing = differing_hyperparameters(checkpoint.get("hyper_parameters", {}), dict(task.hparams))
    for name in (*RESUME_MAY_CHANGE, *getattr(task, "output_settings", ())):
        differing.pop(name, None)
    if differing:
        raise CheckpointMismatchError(
            f"{where} was written with other model settings than this run's ({{name: (checkpoint, now)}}): "
            f"{differing}. Resume with the recipe that wrote it (its config.yaml is in that run's folder), "
            "or start a new run from its weights: `mambaout export` it and set `model.pretrained`."
        )
    if RNG_STATES_KEY in checkpoint:
        set_rng_states(checkpoint[RNG_STATES_KEY])


def check_checkpoint_fits(task: LightningModule, checkpoint: Any, where: str, check_weights: bool = True) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``checkpoint`` was written by ``task``'s class and
    (``check_weights``) holds ``task``'s weights."""
    if not isinstance(checkpoint, Mapping) or (check_weights and "state_dict" not in checkpoint):
        keys = sorted(checkpoint)[:10] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise CheckpointMismatchError(
            f"{where} has no 'state_dict' (it holds {keys}): it is not a checkpoint written by `fit`. "
            "Plain weight files go in `model.pretrained` instead of `--ckpt_path`."
        )
    recorded = (checkpoint.get(CHECKPOINT_KEY) or {}).get("task")
    mine = task_name(type(task))
    if recorded is not None and recorded != mine:
        raise CheckpointMismatchError(
            f"{where} was written by {recorded}, but this run's task is {mine}. Use a checkpoint of the same "
            "task, or set `model.class_path` to the task that wrote it."
        )
    if not check_weights:
        return
    theirs: Mapping[str, Any] = checkpoint["state_dict"]
    own = task.state_dict()
    missing = sorted(set(own) - set(theirs))
    unexpected = sorted(set(theirs) - set(own))
    shapes = [
        f"{key}: {tuple(theirs[key].shape)} in the checkpoint, {tuple(own[key].shape)} here"
        for key in sorted(set(own) & set(theirs))
        if hasattr(theirs[key], "shape") and tuple(theirs[key].shape) != tuple(own[key].shape)
    ]
    if not (missing or unexpected or shapes):
        return
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("different shapes", shapes)):
        if items:
            problems.append(f"{len(items)} {label} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})")
    differing = differing_hyperparameters(checkpoint.get("hyper_parameters", {}), dict(task.hparams))
    raise CheckpointMismatchError(
        f"{where} does not fit this run's network: {'; '.join(problems)}. "
        + (f"Model settings that differ from the checkpoint's: {differing}. " if differing else "")
        + "Resume with the recipe that wrote the checkpoint, or start a new run from its weights with "
        "`model.pretrained`."
    )


def differing_hyperparameters(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{name: (saved, current)}`` for the hyper-parameters whose values differ."""

    def normal(value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value

    names = (set(saved) | set(current)) - {"_instantiator", "_class_path"}
    return {
        name: (saved.get(name), current.get(name))
        for name in sorted(names)
        if not name.startswith("_") and normal(saved.get(name)) != normal(current.get(name))
    }


def saved_model_settings(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The task settings a checkpoint was written with, as a ``model`` entry of a LightningCLI config
    (``{"class_path", "dict_kwargs"}`` when the CLI recorded the class); None when it has none."""
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    hparams.pop("_instantiator", None)
    if not hparams:
        return None
    if "_class_path" in hparams:
        return {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
    return hparams


def rng_states() -> dict[str, Any]:
    """The states of ``random``, NumPy's and torch's (CPU and CUDA) global generators, as plain types and tensors."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
            "kind": str(kind),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_states` returned."""
    random.setstate(tuple(states["python"][:1]) + (tuple(states["python"][1]),) + tuple(states["python"][2:]))
    numpy_state = states["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
