"""The depthwise 7x7 convolution's backward: our CPU paths against oneDNN's, and the training step with and without them.

Kernel rows, at the stage shapes of a 224x224 input (batch 16), float32 and bfloat16, in GFLOP/s
(2 x batch x channels x height x width x 49 per call, the same for the forward and both gradients):

- `dwconv/<variant>/<size>x<size>x<channels>/wgrad/<dtype>`: `mambaout_pl::depthwise_conv2d_weight_grad`
  against oneDNN's weight gradient (`aten.convolution_backward` on channels-last tensors, as the fused
  block called it); the note gives the forward convolution's rate, each one's rate as a share of the
  forward's (median of the rounds' ratios; 0.5 is "twice the forward's time") and oneDNN's rate on
  contiguous (NCHW) tensors.
- `.../igrad/<dtype>`: the input gradient as the forward convolution with the flipped kernel against
  oneDNN's input gradient, with the same shares of the forward's rate.
- `.../wgrad-candidates/<dtype>` (`--candidates`): the weight gradient as 49 shifted products in
  PyTorch, eager and through `torch.compile` (inductor's C++), against oneDNN.

Step rows, `dwconv/<variant>/train/<precision>`: our MambaOut's training step with the kernel
against the same step with `kernel_disabled()` (what a machine without a compiler runs).

    python benchmarks/depthwise_backward.py                       # femto, kernels and training step
    python benchmarks/depthwise_backward.py --variants mambaout_femto mambaout_tiny --threads 1
    python benchmarks/depthwise_backward.py --candidates --no-steps
"""

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import Row, alternating_rates, compare, rows_table  # noqa: E402
from model_speed import ModelCase, make_step  # noqa: E402

from mambaout_pl.analysis import machine_description  # noqa: E402
from mambaout_pl.models import create_model  # noqa: E402
from mambaout_pl.models.depthwise_conv_backward import (  # noqa: E402
    depthwise_conv2d_weight_grad,
    kernel_disabled,
    load_kernel,
)

KERNEL = 7
STAGE_SIZES = (56, 28, 14, 7)  # a 224x224 input after the stem and each downsampling


def stage_channels(variant: str) -> list[int]:
    """The depthwise convolution's channels at each stage of `variant`."""
    model = timm.create_model(variant, pretrained=False)
    return [stage.blocks[0].conv.out_channels for stage in model.stages]


def onednn_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask: list[bool]) -> Callable[[], None]:
    channels = x.shape[1]

    def run() -> None:
        torch.ops.aten.convolution_backward(
            grad, x, weight, None, [1, 1], [KERNEL // 2] * 2, [1, 1], False, [0, 0], channels, mask
        )

    return run


def shifted_products(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The weight gradient as 49 products of `grad` with shifted windows of `x`, channels-last, in PyTorch."""
    grad, x = grad.permute(0, 2, 3, 1), x.permute(0, 2, 3, 1)
    height, width = x.shape[1:3]
    padded = F.pad(x, (0, 0, KERNEL // 2, KERNEL // 2, KERNEL // 2, KERNEL // 2))
    taps = [
        (grad * padded[:, i : i + height, j : j + width]).sum((0, 1, 2), dtype=torch.float32)
        for i in range(KERNEL)
        for j in range(KERNEL)
    ]
    return torch.stack(taps, -1).view(-1, 1, KERNEL, KERNEL)


def measure_kernels(
    variant: str, size: int, channels: int, dtype: torch.dtype, batch: int, rounds: int, steps: int, candidates: bool
) -> list[Row]:
    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size, dtype=dtype).contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(x)
    weight = torch.randn(channels, 1, KERNEL, KERNEL, dtype=dtype)
    x_nchw, grad_nchw = x.contiguous(), grad.contiguous()
    flipped = weight.flip((-2, -1))
    calls = {
        "forward": lambda: F.conv2d(x, weight, padding=KERNEL // 2, groups=channels),
        "wgrad": lambda: depthwise_conv2d_weight_grad(grad, x, KERNEL),
        "wgrad_onednn": onednn_backward(grad, x, weight, [False, True, False]),
        "wgrad_onednn_nchw": onednn_backward(grad_nchw, x_nchw, weight, [False, True, False]),
        "igrad": lambda: F.conv2d(grad, flipped, padding=KERNEL // 2, groups=channels),
        "igrad_onednn": onednn_backward(grad, x, weight, [True, False, False]),
    }
    if candidates:
        compiled = torch.compile(shifted_products, dynamic=False)
        calls["wgrad_shifted"] = lambda: shifted_products(grad, x)
        calls["wgrad_inductor"] = lambda: compiled(grad, x)
    gflop = 2 * x.numel() * KERNEL * KERNEL / 1e9
    rates = alternating_rates(calls, gflop, rounds, steps, warmup=1)
    name = f"dwconv/{variant.removeprefix('mambaout_')}/{size}x{size}x{channels}"
    precision = "fp32" if dtype == torch.float32 else "bf16"

    def median(key: str) -> float:
        return statistics.median(rates[key])

    def share_of_forward(key: str) -> float:
        return compare("", rates, "", key, "forward").ratio

    wgrad = compare(f"{name}/wgrad/{precision}", rates, "GFLOP/s", "wgrad", "wgrad_onednn")
    wgrad.note = (
        f"forward {median('forward'):.3g}, ours/forward {share_of_forward('wgrad'):.2f}, "
        f"oneDNN/forward {share_of_forward('wgrad_onednn'):.2f}; oneDNN NCHW {median('wgrad_onednn_nchw'):.3g}; "
        f"{wgrad.note}"
    )
    igrad = compare(f"{name}/igrad/{precision}", rates, "GFLOP/s", "igrad", "igrad_onednn")
    igrad.note = (
        f"ours/forward {share_of_forward('igrad'):.2f}, oneDNN/forward {share_of_forward('igrad_onednn'):.2f}; "
        f"{igrad.note}"
    )
    rows = [wgrad, igrad]
    if candidates:
        row = compare(f"{name}/wgrad-candidates/{precision}", rates, "GFLOP/s", "wgrad_inductor", "wgrad_onednn")
        row.note = f"ours: torch.compile'd shifted products; eager shifted products {median('wgrad_shifted'):.3g}"
        rows.append(row)
    return rows


def measure_step(variant: str, precision: str, batch: int, rounds: int, steps: int) -> Row:
    torch.manual_seed(0)
    model = create_model(variant)
    images = torch.randn(batch, 3, 224, 224)
    targets = torch.randint(0, model.num_classes, (batch,))
    step = make_step(model, ModelCase(variant, "train", precision, 224, batch), images, targets)

    def without_kernel() -> None:
        with kernel_disabled():
            step()

    rates = alternating_rates({"ours": step, "reference": without_kernel}, batch, rounds, steps, warmup=1)
    row = compare(f"dwconv/{variant}/train/{precision}", rates, "img/s")
    row.note = f"reference: kernel_disabled(); {row.note}"
    return row


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["mambaout_femto"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed calls per round (training steps: 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch decides)")
    parser.add_argument("--candidates", action="store_true", help="also the PyTorch and torch.compile candidates")
    parser.add_argument("--no-steps", action="store_true", help="kernel rows only")
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    kernel = load_kernel()
    print(f"# {machine_description('cpu')}; kernel SIMD level {kernel.simd_level} ({kernel.path.name})", flush=True)
    rows: list[Row] = []
    for variant in args.variants:
        for dtype in (torch.float32, torch.bfloat16):
            for size, channels in zip(STAGE_SIZES, stage_channels(variant)):
                for row in measure_kernels(
                    variant, size, channels, dtype, args.batch_size, args.rounds, args.steps, args.candidates
                ):
                    rows.append(row)
                    print(f"{row.name}: ours {row.ours:.4g}, oneDNN {row.reference:.4g}, {row.note}", flush=True)
        for precision in () if args.no_steps else ("fp32", "bf16"):
            row = measure_step(variant, precision, args.batch_size, args.rounds, 2)
            rows.append(row)
            print(f"{row.name}: ours {row.ours:.4g}, reference {row.reference:.4g}, ratio {row.ratio:.3f}", flush=True)
    print()
    print(rows_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([row.as_json() for row in rows], indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
