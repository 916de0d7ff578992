"""What every benchmark section shares: result rows, alternating timed rounds, the printed table."""

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch

from mambaout_pl.analysis import format_table


@dataclass
class Row:
    """One measured comparison; `ratio` is `ours / reference` unless the section says otherwise."""

    name: str
    ours: float
    reference: float
    ratio: float
    unit: str
    note: str = ""

    def as_json(self) -> dict[str, object]:
        row = asdict(self)
        if not row["note"]:
            del row["note"]
        return row


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternating_rates(
    steps: Mapping[str, Callable[[], None]],
    items_per_step: int,
    rounds: int,
    steps_per_round: int,
    warmup: int,
    device: torch.device | None = None,
) -> dict[str, list[float]]:
    """Items per second of each step function, timed in alternating rounds whose order flips each round.

    Noisy machines drift; alternating the order and comparing round by round keeps the drift out
    of the ratios. ``device`` (default CPU) is synchronised around each timed round.
    """
    device = device or torch.device("cpu")
    for step in steps.values():
        for _ in range(warmup):
            step()
    synchronize(device)
    names = list(steps)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        for name in names if round_index % 2 == 0 else reversed(names):
            start = time.perf_counter()
            for _ in range(steps_per_round):
                steps[name]()
            synchronize(device)
            rates[name].append(steps_per_round * items_per_step / (time.perf_counter() - start))
    return rates


def compare(
    name: str,
    rates: Mapping[str, Sequence[float]],
    unit: str,
    ours: str = "ours",
    reference: str = "reference",
) -> Row:
    """A row from alternating rounds: median rates and the median of the per-round ratios."""
    ratios = [o / r for o, r in zip(rates[ours], rates[reference])]
    spread = f"rounds {min(ratios):.3f}-{max(ratios):.3f}" if len(ratios) > 1 else ""
    return Row(
        name,
        statistics.median(rates[ours]),
        statistics.median(rates[reference]),
        statistics.median(ratios),
        unit,
        spread,
    )


def rows_table(rows: Sequence[Row]) -> str:
    return format_table(
        ("name", "ours", "reference", "ratio", "unit", "note"),
        [(r.name, f"{r.ours:.4g}", f"{r.reference:.4g}", f"{r.ratio:.3f}", r.unit, r.note) for r in rows],
        right=(False, True, True, True, False, False),
    )
