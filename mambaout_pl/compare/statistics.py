"""Seed statistics of a comparison: mean, standard deviation, t-based 95% interval, paired-by-seed differences.

Over n seeds the interval is ``mean ± t(0.975, n - 1) · std / √n`` with the sample standard
deviation (n - 1 in the denominator). Two arms are compared on the seeds both have finished: the
per-seed differences are summarised the same way, and a difference is significant only when their
interval excludes 0. One seed gives a mean and no interval.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scipy.stats import t as student_t

__all__ = ["CONFIDENCE", "Summary", "Difference", "summarize", "paired_difference", "t_quantile"]

CONFIDENCE = 0.95


def t_quantile(probability: float, degrees_of_freedom: int) -> float:
    """The ``probability`` quantile of Student's t distribution."""
    return float(student_t.ppf(probability, degrees_of_freedom))


@dataclass(frozen=True)
class Summary:
    """n values: their mean, sample standard deviation and the t-based interval (None for one value)."""

    n: int
    mean: float
    std: float | None
    low: float | None
    high: float | None

    @property
    def half_width(self) -> float | None:
        return None if self.high is None else (self.high - self.low) / 2


def summarize(values: Sequence[float], confidence: float = CONFIDENCE) -> Summary:
    """Mean, sample standard deviation and the ``confidence`` t-interval of the mean of ``values``."""
    values = [float(value) for value in values]
    if not values:
        raise ValueError("summarize needs at least one value.")
    n = len(values)
    mean = math.fsum(values) / n
    if n == 1:
        return Summary(1, mean, None, None, None)
    std = math.sqrt(math.fsum((value - mean) ** 2 for value in values) / (n - 1))
    half = t_quantile(1 - (1 - confidence) / 2, n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


@dataclass(frozen=True)
class Difference:
    """``arm - reference`` over the seeds both finished."""

    seeds: tuple[int, ...]
    summary: Summary

    @property
    def significant(self) -> bool | None:
        """Whether the interval excludes 0; None without an interval (fewer than two shared seeds)."""
        if self.summary.low is None:
            return None
        return self.summary.low > 0 or self.summary.high < 0


def paired_difference(
    arm: Mapping[int, float], reference: Mapping[int, float], confidence: float = CONFIDENCE
) -> Difference | None:
    """The per-seed differences ``arm[seed] - reference[seed]`` summarised; None when no seed is shared."""
    seeds = tuple(sorted(set(arm) & set(reference)))
    if not seeds:
        return None
    return Difference(seeds, summarize([arm[seed] - reference[seed] for seed in seeds], confidence))
