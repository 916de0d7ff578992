"""``--match-macs ARM``: give every other arm's backbone the GMACs of ARM's at each size, within 5%.

The backbone (``FeatureBackbone`` of the arm's ``backbone`` and ``backbone_args``, no task head) is
counted on the meta device at the size's input (:func:`mambaout_pl.analysis.count_macs`). Its width
(``dims``, every stage scaled by one factor and rounded to 8 channels) is changed first; where no width comes
within the tolerance, the depth of its deepest stage (``depths``) is changed too. What was changed is
returned for the run's record.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from mambaout_pl.analysis import count_macs
from mambaout_pl.compare.errors import CompareError
from mambaout_pl.models.backbones import FeatureBackbone

__all__ = ["TOLERANCE", "WIDTH_STEP", "backbone_gmacs", "backbone_input_size", "match_backbone_macs"]

TOLERANCE = 0.05
WIDTH_STEP = 8
#: Width factors tried: multiples of 1/32 from 1/4 to 4.
SCALE_STEPS = 32
#: A detector pads its batch to a multiple of this (torchvision's ``GeneralizedRCNNTransform``).
DETECTION_PADDING = 32


def _scaled(dims: list[int], factor: float) -> list[int]:
    return [max(WIDTH_STEP, round(d * factor / WIDTH_STEP) * WIDTH_STEP) for d in dims]


def backbone_input_size(kind: str, size: int) -> tuple[int, int]:
    """The backbone's input at ``size`` for a square image: a detector pads it to a multiple of 32."""
    if kind == "detection":
        size = math.ceil(size / DETECTION_PADDING) * DETECTION_PADDING
    return size, size


def _build(backbone: str, backbone_args: Mapping[str, Any]) -> FeatureBackbone:
    with torch.device("meta"):
        return FeatureBackbone(backbone, **backbone_args)


def backbone_gmacs(backbone: str, backbone_args: Mapping[str, Any], input_size: tuple[int, int]) -> float:
    """GMACs per image of the backbone (no head) at ``input_size``, counted on the meta device."""
    return count_macs(_build(backbone, backbone_args), input_size) / 1e9


def _model_of(settings: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    arguments = settings["model"]["init_args"]
    return arguments["backbone"], dict(arguments.get("backbone_args") or {})


def _closest(
    count: Callable[[int], float | None], start: int, lowest: int, highest: int, target: float
) -> tuple[int, float] | None:
    """The value from ``lowest`` to ``highest`` whose count is closest to ``target``, walking from ``start`` while
    the count (increasing with the value) gets closer; values that cannot be built (None) are stepped over."""
    best: tuple[int, float] | None = None
    start = min(max(start, lowest), highest)
    for direction in (1, -1):
        value, misses = start if direction == 1 else start - 1, 0
        while lowest <= value <= highest and misses < 3:
            gmacs = count(value)
            if gmacs is None:
                misses += 1
            else:
                misses = 0
                if best is None or abs(gmacs - target) < abs(best[1] - target):
                    best = (value, gmacs)
                if (gmacs > target) == (direction == 1):  # passed the target going this way
                    break
            value += direction
    return best


def match_backbone_macs(
    settings: Mapping[str, Any],
    reference: Mapping[str, Any],
    kind: str,
    size: int,
    arm: str,
    reference_arm: str,
) -> dict[str, Any]:
    """The ``backbone_args`` that bring ``settings``' backbone within 5% of ``reference``'s GMACs at ``size``.

    Returns ``backbone_args``, ``changed`` (``{"dims": {"from": ..., "to": ...}, "depths": ...}``, empty
    when nothing had to change), ``backbone_gmacs``, ``target_gmacs`` and ``reference``. Raises
    :class:`CompareError` naming the arm and size when the backbone takes no ``dims`` or no width and
    depth comes within the tolerance.
    """
    input_size = backbone_input_size(kind, size)
    target = backbone_gmacs(*_model_of(reference), input_size)
    name, arguments = _model_of(settings)
    built = _build(name, arguments)
    own = count_macs(built, input_size) / 1e9
    record = {"reference": reference_arm, "target_gmacs": target, "backbone_gmacs": own, "changed": {}}
    if abs(own / target - 1) <= TOLERANCE:
        return {**record, "backbone_args": arguments}

    dims = list(arguments.get("dims") or built.channels)
    depths = list(arguments.get("depths") or [len(stage.blocks) for stage in getattr(built.model, "stages", [])])
    deepest = max(range(len(depths)), key=depths.__getitem__) if depths else 0
    # Every stage scaled by one factor, each rounded to 8 channels: the distinct widths, narrowest first.
    widths = list(
        dict.fromkeys(tuple(_scaled(dims, step / SCALE_STEPS)) for step in range(SCALE_STEPS // 4, 4 * SCALE_STEPS + 1))
    )
    counts: dict[tuple[int, int | None], float | None] = {}

    def candidate(width: int, depth: int | None) -> dict[str, Any]:
        changed = copy.deepcopy(arguments)
        changed["dims"] = list(widths[width])
        if depth is not None:
            changed["depths"] = [depth if i == deepest else d for i, d in enumerate(depths)]
        return changed

    def count(width: int, depth: int | None = None) -> float | None:
        if (width, depth) not in counts:
            try:
                counts[width, depth] = backbone_gmacs(name, candidate(width, depth), input_size)
            except TypeError as error:
                raise CompareError(
                    f"--match-macs: the width of arm '{arm}' (backbone {name}) cannot be changed: it takes no "
                    f"dims ({error}). Match it by hand, or leave it out of --match-macs."
                ) from error
            except ValueError:  # e.g. attention heads that do not divide the width
                counts[width, depth] = None
        return counts[width, depth]

    # MACs grow about with the square of the width: start the walk there.
    guess = _scaled(dims, math.sqrt(target / own))
    start = min(
        range(len(widths)), key=lambda index: abs(widths[index][0] - guess[0]) + abs(widths[index][-1] - guess[-1])
    )
    found = _closest(count, start, 0, len(widths) - 1, target)
    if found is None:
        raise CompareError(f"--match-macs: no width of arm '{arm}' at size {size} can be built (backbone {name}).")
    width, gmacs = found
    depth = None
    if abs(gmacs / target - 1) > TOLERANCE and depths:
        deeper = _closest(lambda d: count(width, d), depths[deepest], 1, 3 * depths[deepest], target)
        if deeper is not None and abs(deeper[1] - target) < abs(gmacs - target):
            depth, gmacs = deeper
    if abs(gmacs / target - 1) > TOLERANCE:
        raise CompareError(
            f"--match-macs: arm '{arm}' at size {size} comes no closer than {gmacs:.4f} GMACs to {reference_arm}'s "
            f"{target:.4f} (more than {TOLERANCE:.0%} off) by width and depth. Match it by hand, or leave it out."
        )
    matched = candidate(width, depth)
    changed = {"dims": {"from": dims, "to": matched["dims"]}}
    if depth is not None:
        changed["depths"] = {"from": depths, "to": matched["depths"]}
    return {**record, "backbone_gmacs": gmacs, "changed": changed, "backbone_args": matched}
