"""Model speed: our MambaOut against timm's, same variant, same weights, same input, same precision.

Training steps are forward + backward + an SGD step on cross-entropy; inference steps a forward
pass under `torch.inference_mode`. Row names: `model/<variant>/<train|infer>/<precision>[/cl][/compile]`.
"""

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace

import timm
import torch
import torch.nn.functional as F
from common import Row, alternating_rates, compare
from torch import nn

from mambaout_pl.models import create_model


@dataclass(frozen=True)
class ModelCase:
    variant: str
    mode: str  # 'train' or 'infer'
    precision: str  # 'fp32' or 'bf16' (autocast)
    image_size: int = 224
    batch_size: int = 16
    channels_last: bool = False
    compile: bool = False
    reference_precision: str | None = None  # timm's precision when it differs from ours

    @property
    def name(self) -> str:
        name = f"model/{self.variant}/{self.mode}/{self.precision}"
        if self.reference_precision:
            name += f"-vs-timm-{self.reference_precision}"
        if self.image_size != 224:
            name += f"/{self.image_size}px"
        return name + ("/cl" if self.channels_last else "") + ("/compile" if self.compile else "")


def make_step(
    model: nn.Module,
    case: ModelCase,
    images: torch.Tensor,
    targets: torch.Tensor,
) -> Callable[[], None]:
    """A closure running one training or inference step of `model` on the fixed batch."""
    device_type = images.device.type
    autocast = torch.autocast(device_type, dtype=torch.bfloat16) if case.precision == "bf16" else nullcontext()
    if case.channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if case.compile else model
    if case.mode == "infer":
        model.eval()

        def infer_step() -> None:
            with torch.inference_mode(), autocast:
                forward(images)

        return infer_step

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def train_step() -> None:
        with autocast:
            loss = F.cross_entropy(forward(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return train_step


def measure_model(
    case: ModelCase,
    device: torch.device,
    rounds: int,
    steps_per_round: int,
    warmup: int,
) -> Row:
    torch.manual_seed(0)
    reference = timm.create_model(case.variant, pretrained=False).to(device)
    ours = create_model(case.variant).to(device)
    ours.load_state_dict(reference.state_dict(), strict=True)
    images = torch.randn(case.batch_size, 3, case.image_size, case.image_size, device=device)
    if case.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, reference.num_classes, (case.batch_size,), device=device)
    steps = {
        "ours": make_step(ours, case, images, targets),
        "reference": make_step(
            reference, replace(case, precision=case.reference_precision or case.precision), images, targets
        ),
    }
    rates = alternating_rates(steps, case.batch_size, rounds, steps_per_round, warmup, device)
    return compare(case.name, rates, "img/s")


def cpu_cases(quick: bool, image_size: int, batch_size: int) -> list[ModelCase]:
    variants = ("mambaout_femto",) if quick else ("mambaout_femto", "mambaout_tiny")
    cases = []
    for variant in variants:
        for precision in ("fp32", "bf16"):
            for mode in ("train", "infer"):
                cases.append(ModelCase(variant, mode, precision, image_size, batch_size))
        cases.append(ModelCase(variant, "train", "bf16", image_size, batch_size, reference_precision="fp32"))
    return cases


def gpu_cases(quick: bool, batch_size: int) -> list[ModelCase]:
    variants = ("mambaout_tiny",) if quick else ("mambaout_tiny", "mambaout_small", "mambaout_base")
    cases = []
    for variant in variants:
        for mode in ("train", "infer"):
            cases.append(ModelCase(variant, mode, "bf16", 224, batch_size))
            cases.append(ModelCase(variant, mode, "bf16", 224, batch_size, channels_last=True))
            cases.append(ModelCase(variant, mode, "bf16", 224, batch_size, channels_last=True, compile=True))
    return cases
