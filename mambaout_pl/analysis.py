"""The paper's analyses: the long-sequence criterion per stage, and a backbone's parameters, MACs and throughput.

    mambaout analyze --model vit_small_patch16_224 mambaout_tiny
    mambaout analyze --model mambaout_tiny --image-size 512 512
    mambaout profile --model mambaout_femto mambaout_tiny --image-size 224 224
    mambaout profile --model mambaout_femto --model-args '{"token_mixer": "ssm", "scan": "cross"}'

Attention over L tokens of D channels costs `24·D²·L + 4·D·L²` FLOPs per layer (projections plus
scores and weighted sum), so its quadratic term dominates when `L > 6·D`: the paper's definition
of a long sequence. Models are built on the meta device for the analysis and the MAC count (no
weights, no compute); only the throughput runs a real model.
"""

import argparse
import copy
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mambaout_pl.models import MambaOut, create_model, list_models
from mambaout_pl.models.mixers import AttentionMixer, DepthwiseConvMixer, SelectiveScanMixer

__all__ = [
    "TASK_IMAGE_SIZES",
    "StageSequence",
    "ModelProfile",
    "build_model",
    "stage_shapes",
    "long_sequence_report",
    "count_macs",
    "measure_throughput",
    "profile_model",
    "check_memory",
    "largest_activation",
    "describe_token_mixers",
    "format_table",
    "machine_description",
    "analyze_main",
    "profile_main",
]

# Input sizes of the paper's three tasks (height, width).
TASK_IMAGE_SIZES: dict[str, tuple[int, int]] = {
    "ImageNet": (224, 224),
    "COCO": (800, 1280),
    "ADE20K": (512, 2048),
}


@dataclass(frozen=True)
class StageSequence:
    """Tokens and channels of one stage at one input size, judged by the long-sequence criterion."""

    task: str
    image_size: tuple[int, int]
    stage: str
    tokens: int
    channels: int

    @property
    def threshold(self) -> int:
        """Token count above which the sequence is long: 6·D."""
        return 6 * self.channels

    @property
    def attention_ratio(self) -> float:
        """Attention's quadratic over linear FLOPs, `4·D·L² / (24·D²·L) = L / (6·D)`."""
        return self.tokens / self.threshold

    @property
    def long_sequence(self) -> bool:
        return self.tokens > self.threshold


@dataclass(frozen=True)
class ModelProfile:
    """Size, cost and speed of a backbone at one input size."""

    model: str
    token_mixer: str
    image_size: tuple[int, int]
    params: int
    macs: int
    images_per_second: float | None = None

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9


def build_model(
    name: str,
    image_size: tuple[int, int] | None = None,
    device: str | torch.device = "meta",
    model_args: dict[str, Any] | None = None,
) -> nn.Module:
    """Build `name` (ours, timm's or a class path) without weights, on `device` (meta: no memory, no init).

    Models that take an `img_size` (timm's ViTs) are built for `image_size`.
    """
    model_args = dict(model_args or {})
    with torch.device(device):
        if image_size is not None and name not in list_models() and "img_size" not in model_args:
            try:
                return create_model(name, img_size=tuple(image_size), **model_args)
            except TypeError as e:
                if "img_size" not in str(e):
                    raise
        return create_model(name, **model_args)


def stage_shapes(model: nn.Module, image_size: tuple[int, int]) -> list[tuple[str, int, int, int]]:
    """`(stage, channels, height, width)` of each distinct stage output at `image_size`.

    Runs `forward_intermediates` on a meta-device image (shapes only); consecutive outputs of the
    same shape (a ViT's blocks) form one stage.
    """
    if not hasattr(model, "forward_intermediates"):
        raise ValueError(
            f"{type(model).__name__} has no forward_intermediates, so its stage outputs cannot be found; "
            "use one of our models or a timm model that has it (ViT, ConvNeXt, Swin, ResNet, ...)."
        )
    in_chans = getattr(model, "in_chans", 3)
    image = torch.empty(1, in_chans, *image_size, device="meta")
    if _device_of(model).type != "meta":
        model = copy.deepcopy(model).to("meta")
    with torch.no_grad():
        outputs = model.forward_intermediates(image, intermediates_only=True)
    info = getattr(model, "feature_info", None)
    names = [f["module"] for f in info] if isinstance(info, list) and len(info) == len(outputs) else None
    names = names or [str(i) for i in range(len(outputs))]

    stages: list[tuple[str, int, int, int]] = []
    first = 0
    for index in range(1, len(outputs) + 1):
        if index < len(outputs) and outputs[index].shape == outputs[first].shape:
            continue
        _, channels, height, width = outputs[first].shape
        stages.append((_stage_label(names[first], names[index - 1]), channels, height, width))
        first = index
    return stages


def long_sequence_report(
    model: str | nn.Module,
    image_sizes: dict[str, tuple[int, int]] | None = None,
    model_args: dict[str, Any] | None = None,
) -> list[StageSequence]:
    """Per task and stage: tokens L, channels D and the criterion `L > 6·D`.

    Args:
        model: A model name (built on the meta device) or a model.
        image_sizes: Task label -> (height, width); defaults to `TASK_IMAGE_SIZES`.
        model_args: Keyword arguments for `create_model` when `model` is a name.
    """
    rows = []
    for task, size in (image_sizes or TASK_IMAGE_SIZES).items():
        built = build_model(model, size, model_args=model_args) if isinstance(model, str) else model
        for stage, channels, height, width in stage_shapes(built, size):
            rows.append(StageSequence(task, tuple(size), stage, height * width, channels))
    return rows


def count_macs(model: nn.Module, image_size: tuple[int, int], batch_size: int = 1) -> int:
    """Multiply-accumulates of one forward pass per image (FLOPs / 2, `FlopCounterMode`), SSM scans included.

    Counted on a meta-device copy (no compute): `FlopCounterMode` counts matrix products and
    convolutions, and the selective scans by VMamba's formula (`selective_scan_macs`: 9 per token,
    channel and state, plus the skip), which the scan operator registers.
    """
    if _device_of(model).type != "meta":
        model = copy.deepcopy(model).to("meta")
    image = torch.empty(batch_size, getattr(model, "in_chans", 3), *image_size, device="meta")
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(image)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2 // batch_size


def measure_throughput(
    model: nn.Module,
    image_size: tuple[int, int],
    batch_size: int = 16,
    steps: int = 5,
    warmup: int = 2,
    mode: str = "infer",
    precision: str = "fp32",
) -> float:
    """Images per second over `steps` timed steps after `warmup` untimed ones, on the model's device.

    `mode='infer'`: forward passes under `torch.inference_mode`; `'train'`: forward, backward and
    an SGD step on the mean square of the output.
    """
    if mode not in ("infer", "train"):
        raise ValueError(f"mode must be 'infer' or 'train', got '{mode}'.")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got '{precision}'.")
    device = _device_of(model)
    images = torch.randn(batch_size, getattr(model, "in_chans", 3), *image_size, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    if mode == "infer":
        model.eval()

        def step() -> None:
            with torch.inference_mode(), autocast:
                model(images)
    else:
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

        def step() -> None:
            with autocast:
                loss = model(images).float().square().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    for _ in range(warmup):
        step()
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _synchronize(device)
    return steps * batch_size / (time.perf_counter() - start)


def profile_model(
    name: str,
    image_size: tuple[int, int] = (224, 224),
    model_args: dict[str, Any] | None = None,
    batch_size: int = 16,
    steps: int = 5,
    warmup: int = 2,
    mode: str = "infer",
    precision: str = "fp32",
    device: str | torch.device = "cpu",
) -> ModelProfile:
    """Parameters, MACs per image (meta device) and, if `steps > 0`, measured images per second of `name`."""
    check_profile_settings(batch_size, steps, warmup)
    meta_model = build_model(name, image_size, model_args=model_args)
    check_image_size(meta_model, name, image_size)
    if steps > 0:
        check_memory(meta_model, name, image_size, batch_size, precision, device)
    params = sum(p.numel() for p in meta_model.parameters())
    try:
        macs = count_macs(meta_model, image_size)
    except RuntimeError as error:
        raise ValueError(
            f"{name} does not run on {image_size[0]}x{image_size[1]} images: {str(error).splitlines()[0]}. "
            "Give a larger --image-size."
        ) from error
    speed = None
    if steps > 0:
        model = build_model(name, image_size, device=device, model_args=model_args)
        speed = measure_throughput(model, image_size, batch_size, steps, warmup, mode, precision)
    return ModelProfile(name, describe_token_mixers(meta_model), tuple(image_size), params, macs, speed)


def check_profile_settings(batch_size: int, steps: int, warmup: int) -> None:
    """Raise naming the setting when the batch is empty or a step count negative (0 timed steps: no speed)."""
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: a batch needs at least 1 image.")
    if steps < 0:
        raise ValueError(f"--steps {steps}: give a number of timed steps >= 1, or 0 to skip the throughput.")
    if warmup < 0:
        raise ValueError(f"--warmup {warmup}: give a number of untimed warm-up steps >= 0.")


def check_image_size(model: nn.Module, name: str, image_size: tuple[int, int]) -> None:
    """Raise when an image side is smaller than the model's total downsampling (its last stage would see padding only)."""
    info = getattr(model, "feature_info", None)
    reductions = [stage.get("reduction") for stage in info if isinstance(stage, dict)] if isinstance(info, list) else []
    reduction = max((value for value in reductions if isinstance(value, int)), default=1)
    if min(image_size) < reduction:
        raise ValueError(
            f"--image-size {image_size[0]} {image_size[1]} is too small for {name}: it downsamples by {reduction}, so "
            f"each side must be at least {reduction} pixels."
        )


def largest_activation(model: nn.Module, image_size: tuple[int, int]) -> int:
    """The element count of the largest output of any layer of ``model`` for one image (a meta-device pass)."""
    if _device_of(model).type != "meta":
        model = copy.deepcopy(model).to("meta")
    largest = 0

    def record(module: nn.Module, inputs: Any, output: Any) -> None:
        nonlocal largest
        for tensor in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(tensor, torch.Tensor):
                largest = max(largest, tensor.numel())

    leaves = [module for module in model.modules() if not any(True for _ in module.children())]
    handles = [module.register_forward_hook(record) for module in leaves]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.empty(1, getattr(model, "in_chans", 3), *image_size, device="meta"))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return largest


def available_memory(device: str | torch.device) -> int | None:
    """Bytes that can be allocated now on ``device`` (free GPU memory; on CPU the kernel's MemAvailable), or None."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_memory(
    model: nn.Module,
    name: str,
    image_size: tuple[int, int],
    batch_size: int,
    precision: str = "fp32",
    device: str | torch.device = "cpu",
) -> None:
    """Raise when the timed steps cannot fit on ``device``: the input batch and the largest layer output alone
    (a lower bound of what a forward pass holds at once, from a meta-device pass) exceed its free memory."""
    available = available_memory(device)
    if available is None:
        return
    image_bytes = batch_size * getattr(model, "in_chans", 3) * image_size[0] * image_size[1] * 4
    activation_bytes = batch_size * largest_activation(model, image_size) * (2 if precision == "bf16" else 4)
    needed = image_bytes + activation_bytes
    if needed > available:
        gib = 2**30
        raise ValueError(
            f"--image-size {image_size[0]} {image_size[1]} with --batch-size {batch_size} is too large for {name} on "
            f"{torch.device(device)}: the input batch and its largest layer output alone take {needed / gib:.1f} GiB, "
            f"and {available / gib:.1f} GiB are free. Give a smaller --image-size or --batch-size, or --steps 0 to "
            "count parameters and GMACs only."
        )


def describe_token_mixers(model: nn.Module) -> str:
    """The token mixer of each stage of our MambaOut, e.g. 'ssm(cross)' or 'gated_conv,gated_conv,attention,attention'."""
    if not isinstance(model, MambaOut):
        return "-"
    stages = [_describe_mixer(stage.blocks[0].conv) for stage in model.stages if len(stage.blocks)]
    return stages[0] if len(set(stages)) == 1 else ",".join(stages)


def _describe_mixer(mixer: nn.Module) -> str:
    if isinstance(mixer, SelectiveScanMixer):
        return f"ssm({mixer.scan})"
    if isinstance(mixer, AttentionMixer):
        details = ["causal" if mixer.causal else "full"]
        if mixer.window_size is not None:
            details.append(f"window {mixer.window_size}")
        return f"attention({', '.join(details)})"
    if isinstance(mixer, DepthwiseConvMixer):
        return "gated_conv(causal)" if mixer.causal else "gated_conv"
    return type(mixer).__name__


def _stage_label(first: str, last: str) -> str:
    if first == last:
        return first
    prefix, _, index = last.rpartition(".")
    return f"{first}-{index}" if prefix and first.startswith(prefix + ".") else f"{first}-{last}"


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[bool]) -> str:
    """A plain-text table; `right[i]` right-aligns column i."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        lines.append("  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def machine_description(device: str | torch.device = "cpu") -> str:
    """The hardware, library versions and time, for writing figures down."""
    device = torch.device(device)
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = f"{_cpu_name()}, {torch.get_num_threads()} threads"
    return (
        f"{hardware}; torch {torch.__version__}, timm {timm.__version__}; "
        f"{datetime.datetime.now().isoformat(timespec='minutes')}"
    )


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# Command-line entry points (`mambaout analyze`, `mambaout profile`).


def _parse_model_args(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f'--model-args must be a JSON object such as \'{{"token_mixer": "ssm"}}\', got {text!r}: {e}.'
        ) from e
    if not isinstance(value, dict):
        raise ValueError(f"--model-args must be a JSON object (keyword arguments of create_model), got {text!r}.")
    return value


def _image_size(parser: argparse.ArgumentParser, size: list[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if any(s < 1 for s in size):
        parser.error(f"--image-size must be two positive numbers (height width), got {size}.")
    return size[0], size[1]


def analyze_main(argv: Sequence[str] | None = None) -> int:
    """`mambaout analyze`: per stage, tokens L, channels D, L/(6D) and whether the sequence is long."""
    parser = argparse.ArgumentParser(
        prog="mambaout analyze",
        description="The paper's long-sequence criterion per stage: attention's quadratic FLOPs term "
        "4·D·L² exceeds its linear term 24·D²·L when L > 6·D.",
    )
    parser.add_argument(
        "--model", nargs="+", required=True, help="model names: ours (mambaout_tiny) or timm's (vit_small_patch16_224)"
    )
    parser.add_argument(
        "--image-size",
        nargs=2,
        type=int,
        metavar=("H", "W"),
        help="input height and width; default: ImageNet 224x224, COCO 800x1280 and ADE20K 512x2048",
    )
    parser.add_argument("--model-args", default=None, help="JSON keyword arguments for create_model")
    args = parser.parse_args(argv)
    size = _image_size(parser, args.image_size)
    image_sizes = {f"{size[0]}x{size[1]}": size} if size else TASK_IMAGE_SIZES

    try:
        model_args = _parse_model_args(args.model_args)
        reports = [(name, long_sequence_report(name, image_sizes, model_args)) for name in args.model]
    except ValueError as e:
        print(f"mambaout analyze: error: {e}", file=sys.stderr)
        return 2

    print("Long sequence: L > 6·D, where attention's 4·D·L² term outweighs its 24·D²·L term.")
    for name, rows in reports:
        print(f"\n{name}")
        table = [
            (
                row.task,
                f"{row.image_size[0]}x{row.image_size[1]}",
                row.stage,
                row.tokens,
                row.channels,
                row.threshold,
                f"{row.attention_ratio:.3g}",
                "yes" if row.long_sequence else "no",
            )
            for row in rows
        ]
        headers = ("task", "input", "stage", "tokens L", "channels D", "6D", "L/(6D)", "long")
        print(format_table(headers, table, right=(False, False, False, True, True, True, True, False)))
    return 0


def profile_main(argv: Sequence[str] | None = None) -> int:
    """`mambaout profile`: parameters, GMACs and measured throughput of backbones, as a table."""
    parser = argparse.ArgumentParser(
        prog="mambaout profile",
        description="Parameters, GMACs (FlopCounterMode FLOPs / 2, per image) and measured images per second.",
    )
    parser.add_argument("--model", nargs="+", required=True, help="model names: ours or timm's")
    parser.add_argument("--image-size", nargs=2, type=int, default=[224, 224], metavar=("H", "W"))
    parser.add_argument(
        "--model-args",
        default=None,
        help='JSON keyword arguments for create_model, e.g. \'{"token_mixer": "ssm", "scan": "cross"}\'',
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed steps; 0 skips the throughput")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    parser.add_argument("--mode", choices=("infer", "train"), default="infer")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch decides)")
    args = parser.parse_args(argv)
    size = _image_size(parser, args.image_size)
    try:
        check_profile_settings(args.batch_size, args.steps, args.warmup)
    except ValueError as e:
        parser.error(str(e))
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads {args.threads}: give at least 1 thread, or leave it out to let torch decide.")
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"# {machine_description(args.device)}")
    if args.steps > 0:
        print(
            f"# {size[0]}x{size[1]}, batch {args.batch_size}, {args.mode}, {args.precision}, "
            f"{args.steps} timed steps after {args.warmup} warm-up steps"
        )
    headers = ("model", "mixer", "params", "GMACs", "img/s")
    rows = []
    try:
        model_args = _parse_model_args(args.model_args)
        for name in args.model:
            result = profile_model(
                name, size, model_args, args.batch_size, args.steps, args.warmup, args.mode, args.precision, args.device
            )
            speed = "-" if result.images_per_second is None else f"{result.images_per_second:.1f}"
            rows.append((name, result.token_mixer, f"{result.params:,}", f"{result.gmacs:.3f}", speed))
    except ValueError as e:
        print(f"mambaout profile: error: {e}", file=sys.stderr)
        return 2
    print(format_table(headers, rows, right=(False, False, True, True, True)))
    return 0
