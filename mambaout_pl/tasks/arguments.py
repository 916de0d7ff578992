"""Checks of a task's constructor arguments, so that a mistyped recipe fails when the task is built."""

from __future__ import annotations

import difflib
import math
from typing import Any

from timm.optim import list_optimizers

#: ``timm.scheduler.create_scheduler_v2`` names that can be stepped per optimizer update (``plateau`` steps per epoch).
SCHEDULERS = ("cosine", "tanh", "step", "multistep", "constant", "poly", "wsd", "rsqrt")

_LOOKAHEAD = "lookahead_"


def check_optimizer(name: str) -> None:
    """Raise unless ``name`` is a ``timm.optim`` optimizer (optionally ``lookahead_<name>``)."""
    known = list_optimizers()
    base = name.lower().removeprefix(_LOOKAHEAD)
    if base in known:
        return
    close = difflib.get_close_matches(base, known, n=5)
    hint = f" Close names: {close}." if close else ""
    raise ValueError(
        f"optimizer={name!r} is not a timm optimizer.{hint} Accepted: any of timm.optim.list_optimizers() "
        f"({len(known)} names, e.g. 'adamw', 'sgd', 'lamb'), optionally prefixed with 'lookahead_'."
    )


def check_scheduler(name: str) -> None:
    """Raise unless ``name`` is a timm schedule that steps per optimizer update."""
    if name not in SCHEDULERS:
        extra = " ('plateau' steps once per epoch, and schedules here step per update)" if name == "plateau" else ""
        raise ValueError(f"scheduler={name!r} is not one of {list(SCHEDULERS)}{extra}.")


def check_positive(key: str, value: Any) -> None:
    """Raise unless ``value`` is a finite number above 0."""
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{key}={value!r} must be a finite number above 0.")


def check_drop_path_rate(value: float) -> None:
    """Raise unless ``value`` is a stochastic depth rate in [0, 1)."""
    if not 0.0 <= value < 1.0:
        raise ValueError(
            f"drop_path_rate={value!r} must be in [0, 1): it is the probability of dropping the last block's "
            "residual branch (the paper uses 0.025 to 0.6 by model size; 0 turns stochastic depth off)."
        )
