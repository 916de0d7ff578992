"""Errors a user can make when describing a comparison grid; each message names the value and what to do."""

from __future__ import annotations

from mambaout_pl.errors import OutputExistsError


class CompareError(ValueError):
    """A grid that cannot be run as described: an arm, a size, a seed count or an override."""


class ArmError(CompareError):
    """An arm that is not an overlay file nor a ``NAME:--model.KEY=VALUE ...`` list, or whose settings do not parse."""


class SizeError(CompareError):
    """An input size that is not a whole number of pixels the task can take."""


class GridMismatchError(CompareError, OutputExistsError):
    """The output folder holds runs made with other settings, or files that are not a comparison grid."""


def short_error(text: str, limit: int = 300) -> str:
    """An error message on one line: the first of the parser's ``- reason`` lines when there are any."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reasons = [index for index, line in enumerate(lines) if line.startswith("- ") and "Expected a" not in line]
    first = reasons[0] if reasons else 0
    chosen = lines[first : first + 1]
    if chosen and chosen[0].endswith(":") and first + 1 < len(lines):  # the reason is on the next line
        chosen.append(lines[first + 1])
    text = " ".join(" ".join(chosen).removeprefix("- ").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
