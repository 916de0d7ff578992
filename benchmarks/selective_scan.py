"""The selective scan on CPU: our compiled kernel against our pure-PyTorch scan and VMamba's official one.

Rows `scan/<version>/stage<s>/<height>x<width>/<mode>/vs-<reference>`, at VMamba-T's scans of a
224x224 input (batch 16, 4 directions, so `channels = 4 * d_inner`, groups = directions):

- v0 (`vanilla_vmamba_tiny`): d_state 16, d_inner 192, 384, 768 at stages 1-3 (dims 96, 192, 384, ssm_ratio 2);
- v9 (`vmamba_tiny_s1l8`): d_state 1, d_inner 96, 192, 384 (ssm_ratio 1);

tokens 56², 28², 14²; softplus step sizes with a bias and the skip D, as VMamba calls it. `mode` is
`forward` (no autograd) or `forward+backward` (the gradients of every input). Times are
milliseconds per call for the whole batch; `ratio` is ours / reference (below 1: ours is faster),
the median of the rounds' ratios. References:

- `pytorch`: `chunked_selective_scan`, the pure-PyTorch path of `selective_scan` (one chunk on CPU);
- `vmamba`: `selective_scan_torch` from the official vmamba.py named by `--vmamba-file` or
  `$VMAMBA_FILE` (skipped with a note when not given).

Both references hold [batch, channels, tokens, state] tensors and take seconds per image, so they run
on `--reference-images` images (fewer where their tensors would pass `--reference-memory-gb`) and
their time is scaled up to the batch (every image is independent work), which the note says.
VMamba's backward is quadratic in the tokens (autograd gives every token's slice of its
[batch, channels, tokens, state] tensors a gradient of that full size: minutes per image at 56²), so
its forward+backward rows are measured up to `--vmamba-backward-tokens` tokens only.

    python benchmarks/selective_scan.py --vmamba-file /path/to/vmamba.py
    python benchmarks/selective_scan.py --versions v0 --stages 1 --rounds 2 --threads 2
"""

import argparse
import importlib.util
import json
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import Row, alternating_rates, rows_table  # noqa: E402

from mambaout_pl.analysis import machine_description  # noqa: E402
from mambaout_pl.models import selective_scan_kernel  # noqa: E402
from mambaout_pl.models.mixers.ssm import chunked_selective_scan, selective_scan  # noqa: E402

DIRECTIONS = 4
STAGE_TOKENS = (56, 28, 14)  # a 224x224 input after the 4x stem and each downsampling
VERSIONS = {"v0": (192, 16), "v9": (96, 1)}  # d_inner at stage 1, d_state
# Peak memory of each reference in [batch, channels, tokens, state] float32 tensors (the growth of the
# process's peak resident memory over one call, rounded up: 3.3, 7.4, 5.2 and 9.6 measured).
REFERENCE_FOOTPRINT = {("pytorch", False): 4, ("pytorch", True): 8, ("vmamba", False): 6, ("vmamba", True): 10}


@dataclass(frozen=True)
class ScanCase:
    version: str
    stage: int
    batch: int

    @property
    def d_inner(self) -> int:
        return VERSIONS[self.version][0] * 2 ** (self.stage - 1)

    @property
    def state(self) -> int:
        return VERSIONS[self.version][1]

    @property
    def side(self) -> int:
        return STAGE_TOKENS[self.stage - 1]

    @property
    def channels(self) -> int:
        return DIRECTIONS * self.d_inner

    def state_bytes_per_image(self) -> int:
        return self.channels * self.side**2 * self.state * 4


def scan_inputs(case: ScanCase, batch: int, requires_grad: bool) -> dict[str, torch.Tensor]:
    """VMamba's scan arguments: A from Mamba's initialisation, small step sizes with a bias."""
    generator = torch.Generator().manual_seed(0)
    length, channels, state = case.side**2, case.channels, case.state
    inputs = dict(
        u=torch.randn(batch, channels, length, generator=generator),
        delta=torch.randn(batch, channels, length, generator=generator) * 0.5 - 3.0,
        A=-torch.arange(1, state + 1, dtype=torch.float32).repeat(channels, 1),
        B=torch.randn(batch, DIRECTIONS, state, length, generator=generator),
        C=torch.randn(batch, DIRECTIONS, state, length, generator=generator),
        D=torch.ones(channels),
        delta_bias=torch.rand(channels, generator=generator) * 0.1,
    )
    return {name: t.requires_grad_(requires_grad) for name, t in inputs.items()}


def load_vmamba_scan(path: str | None) -> Callable[..., torch.Tensor] | None:
    """`selective_scan_torch` of the official vmamba.py at `path`, or None without a path."""
    if not path:
        return None
    if not Path(path).is_file():
        raise FileNotFoundError(f"--vmamba-file {path}: no such file (a copy of the official VMamba vmamba.py)")
    spec = importlib.util.spec_from_file_location("vmamba_official", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its decorators look the module up
    spec.loader.exec_module(module)
    return module.selective_scan_torch


def make_call(scan: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor], backward: bool) -> Callable[[], None]:
    grad = torch.ones(inputs["u"].shape)

    def call() -> None:
        if backward:
            for t in inputs.values():
                t.grad = None
            scan(**inputs, delta_softplus=True).backward(grad)
        else:
            with torch.no_grad():
                scan(**inputs, delta_softplus=True)

    return call


def reference_batch(case: ScanCase, name: str, backward: bool, images: int, memory_bytes: float) -> int:
    per_image = REFERENCE_FOOTPRINT[(name, backward)] * case.state_bytes_per_image()
    return max(1, min(case.batch, images, int(memory_bytes // per_image)))


def measure_case(
    case: ScanCase,
    rounds: int,
    steps: int,
    vmamba_scan: Callable[..., torch.Tensor] | None,
    reference_images: int = 1,
    memory_bytes: float = 3 * 2**30,
    vmamba_backward_tokens: int = 196,
) -> list[Row]:
    rows = []
    for backward in (False, True):
        references: dict[str, Callable[..., torch.Tensor]] = {"pytorch": chunked_selective_scan}
        if vmamba_scan is not None and (not backward or case.side**2 <= vmamba_backward_tokens):
            references["vmamba"] = vmamba_scan
        batches = {"ours": case.batch} | {
            name: reference_batch(case, name, backward, reference_images, memory_bytes) for name in references
        }
        scans = {"ours": selective_scan} | references
        calls = {name: make_call(scans[name], scan_inputs(case, batches[name], backward), backward) for name in scans}
        rates = alternating_rates(calls, 1, rounds, steps, warmup=1)  # calls per second
        del calls
        times = {name: [case.batch / batches[name] / rate for rate in rates[name]] for name in rates}
        mode = "forward+backward" if backward else "forward"
        for name in references:
            ratios = [ours / reference for ours, reference in zip(times["ours"], times[name])]
            note = f"{1 / statistics.median(ratios):.1f}x faster"
            if batches[name] < case.batch:
                note += f"; reference on {batches[name]} image(s), time x{case.batch / batches[name]:g}"
            if len(ratios) > 1:
                note += f"; rounds {min(ratios):.3f}-{max(ratios):.3f}"
            rows.append(
                Row(
                    f"scan/{case.version}/stage{case.stage}/{case.side}x{case.side}/{mode}/vs-{name}",
                    1e3 * statistics.median(times["ours"]),
                    1e3 * statistics.median(times[name]),
                    statistics.median(ratios),
                    "ms",
                    note,
                )
            )
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vmamba-file", default=os.environ.get("VMAMBA_FILE"), help="official vmamba.py")
    parser.add_argument("--versions", nargs="+", choices=list(VERSIONS), default=list(VERSIONS))
    parser.add_argument("--stages", nargs="+", type=int, choices=(1, 2, 3), default=[1, 2, 3])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1, help="timed calls per round")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch decides)")
    parser.add_argument("--reference-images", type=int, default=1, help="images the references scan per call")
    parser.add_argument(
        "--reference-memory-gb", type=float, default=3.0, help="the references' budget: beyond it, fewer images"
    )
    parser.add_argument(
        "--vmamba-backward-tokens", type=int, default=196, help="longest scan for VMamba's forward+backward rows"
    )
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not selective_scan_kernel.kernel_available():
        raise SystemExit("the selective scan kernel did not build (see the warning); nothing to compare")
    vmamba_scan = load_vmamba_scan(args.vmamba_file)
    kernel = selective_scan_kernel._kernel()
    print(
        f"# {machine_description('cpu')}; kernel SIMD level {kernel.simd_level} ({kernel.path.name})",
        flush=True,
    )
    if vmamba_scan is None:
        print("# no --vmamba-file (or $VMAMBA_FILE): the vs-vmamba rows are skipped", flush=True)
    else:
        print(f"# VMamba's forward+backward up to {args.vmamba_backward_tokens} tokens (quadratic beyond)", flush=True)
    rows: list[Row] = []
    for version in args.versions:
        for stage in args.stages:
            for row in measure_case(
                ScanCase(version, stage, args.batch_size),
                args.rounds,
                args.steps,
                vmamba_scan,
                args.reference_images,
                args.reference_memory_gb * 2**30,
                args.vmamba_backward_tokens,
            ):
                rows.append(row)
                print(f"{row.name}: ours {row.ours:.4g} ms, reference {row.reference:.4g} ms, {row.note}", flush=True)
    print()
    print(rows_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([row.as_json() for row in rows], indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
