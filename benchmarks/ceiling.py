"""Ceiling: achieved FLOP/s of a training step as a share of the machine's matrix-multiply rate.

The training step's FLOPs are three times the forward pass's, as counted by torch's flop counter
(matrix products and convolutions; the backward computes two products per forward one). The
counter is not run over the backward itself: it counts a grouped convolution's backward as if it
were dense (for MambaOut-Femto at 224², 12.4 GFLOP per image for the convolutions' backward
against 0.36 for their forward). Times the measured steps per second, this gives the achieved
rate, compared with a large square matrix product in the same precision on the same machine.
"""

import statistics
import time
from contextlib import nullcontext

import timm
import torch
import torch.nn.functional as F
from common import Row
from torch.utils.flop_counter import FlopCounterMode

from mambaout_pl.models import create_model


def matmul_flops_per_second(precision: str, size: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """The best of `repeats` timings of a `size`-square matrix product, in FLOP/s."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def training_step_flops(model: torch.nn.Module, images: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images)
    return 3 * counter.get_total_flops()


def measure_ceiling(variant: str, precision: str, image_size: int, batch_size: int, steps: int, rounds: int) -> Row:
    torch.manual_seed(0)
    models = {"ours": create_model(variant), "timm": timm.create_model(variant)}
    images = torch.randn(batch_size, 3, image_size, image_size)
    targets = torch.randint(0, 1000, (batch_size,))
    flops = training_step_flops(models["ours"], images)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    rates = {name: [] for name in models}
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for name, m in models.items()}

    def step(name: str) -> None:
        with autocast:
            loss = F.cross_entropy(models[name](images), targets)
        optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[name].step()

    for name in models:
        step(name)
    peak = []
    for round_index in range(rounds):
        peak.append(matmul_flops_per_second(precision))
        for name in models if round_index % 2 == 0 else reversed(list(models)):
            start = time.perf_counter()
            for _ in range(steps):
                step(name)
            rates[name].append(flops * steps / (time.perf_counter() - start))
    ours, reference, timm_rate = (
        statistics.median(rates["ours"]),
        statistics.median(peak),
        statistics.median(rates["timm"]),
    )
    return Row(
        f"ceiling/{variant}/train/{precision}",
        ours / 1e9,
        reference / 1e9,
        ours / reference,
        "GFLOP/s",
        f"ratio = share of the matmul rate; timm {timm_rate / reference:.3f}",
    )
