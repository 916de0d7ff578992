"""Every benchmark, side by side with its reference, in one run: one table, optionally JSON rows.

    python benchmarks/run.py --quick                  # under ~3 minutes on a 2-core CPU
    python benchmarks/run.py --json results.json      # the full CPU set
    python benchmarks/run.py --gpu                    # CUDA: tiny/small/base, bf16, channels_last, compile
    python benchmarks/run.py --sections model ceiling

Sections (see each module's docstring): `model` (model_speed.py: our MambaOut against timm's),
`overhead` (framework_overhead.py: Trainer.fit against a plain loop), `data` (data_pipeline.py:
our HF DataModule against torchvision's ImageFolder, and the loader's share of step time),
`ceiling` (ceiling.py: achieved FLOP/s against the matmul rate). Every row is
`{"name", "ours", "reference", "ratio", "unit"}`; ratios come from alternating rounds in this run.
"""

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import Row, rows_table  # noqa: E402

from mambaout_pl.analysis import machine_description  # noqa: E402

SECTIONS = ("model", "overhead", "data", "ceiling")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer cases and rounds (femto only)")
    parser.add_argument(
        "--gpu", action="store_true", help="measure on CUDA (model section and an ImageNet-recipe step)"
    )
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--image-size", type=int, default=224, help="model and ceiling input size")
    parser.add_argument("--batch-size", type=int, default=16, help="model and ceiling batch size")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3 quick, 5 full)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round (default 2 quick, 4 full)")
    parser.add_argument("--jpegs", type=int, default=None, help="generated JPEGs for the data section")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch decides)")
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> list[Row]:
    rounds = args.rounds or (3 if args.quick else 5)
    steps = args.steps or (2 if args.quick else 4)
    rows: list[Row] = []

    def emit(row: Row) -> None:
        rows.append(row)
        print(
            f"{row.name}: ours {row.ours:.4g} {row.unit}, reference {row.reference:.4g}, ratio {row.ratio:.3f}",
            flush=True,
        )

    if args.gpu:
        from gpu import end_to_end_step_rate
        from model_speed import gpu_cases, measure_model

        device = torch.device("cuda")
        for case in gpu_cases(args.quick, batch_size=max(args.batch_size, 64)):
            emit(measure_model(case, device, rounds, steps, warmup=3))
        emit(end_to_end_step_rate(device, batch_size=max(args.batch_size, 64), steps=steps * rounds))
        return rows

    if "model" in args.sections:
        from model_speed import cpu_cases, measure_model

        for case in cpu_cases(args.quick, args.image_size, args.batch_size):
            emit(measure_model(case, torch.device("cpu"), rounds, steps, warmup=1))
    if "overhead" in args.sections:
        from framework_overhead import measure_overhead

        size = min(args.image_size, 64)
        for precision in ("fp32",) if args.quick else ("fp32", "bf16"):
            emit(
                measure_overhead(
                    size,
                    batch_size=32,
                    steps_per_epoch=8 if args.quick else 20,
                    rounds=rounds,
                    warmup=1,
                    precision=precision,
                )
            )
    if "data" in args.sections:
        from data_pipeline import jpeg_folder, measure_loader_wait, measure_pipeline

        jpegs = args.jpegs or (64 if args.quick else 256)
        with jpeg_folder(jpegs) as folder:
            emit(measure_pipeline(Path(folder), batch_size=min(16, max(1, jpegs // 4)), rounds=rounds))
            emit(
                measure_loader_wait(Path(folder), batch_size=args.batch_size, steps=6 if args.quick else 16, workers=1)
            )
    if "ceiling" in args.sections:
        from ceiling import measure_ceiling

        for precision in ("fp32", "bf16"):
            emit(measure_ceiling("mambaout_femto", precision, args.image_size, args.batch_size, steps, rounds))
    return rows


def main(argv: Sequence[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {machine_description('cuda' if args.gpu else 'cpu')}", flush=True)
    rows = run(args)
    print()
    print(rows_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([row.as_json() for row in rows], f, indent=2)
            f.write("\n")
    return rows


if __name__ == "__main__":
    main()
