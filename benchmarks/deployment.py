"""Deployment: onnxruntime inference on the exported ONNX file against PyTorch eager inference, same weights and input.

    python benchmarks/deployment.py --threads 2
    python benchmarks/deployment.py --variants mambaout_femto --batch-sizes 1 --rounds 3

Each model is exported with ``mambaout_pl.export.deploy.export_onnx`` (batch size dynamic) and run by
onnxruntime's CPU provider with ``--threads`` intra-op threads; PyTorch runs the same network
under ``torch.inference_mode`` with as many threads. Both are timed in alternating rounds in this
process. Row names: ``deploy/<variant>/<size>px/b<batch>``; ``ours`` is onnxruntime, ``reference``
PyTorch eager, ``ratio`` onnxruntime / eager.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnxruntime  # noqa: E402
import torch  # noqa: E402
from common import Row, alternating_rates, compare, rows_table  # noqa: E402

from mambaout_pl.analysis import machine_description  # noqa: E402
from mambaout_pl.export.deploy import INPUT_NAME, export_onnx  # noqa: E402
from mambaout_pl.models import create_model  # noqa: E402


def inference_steps(
    session: onnxruntime.InferenceSession, model: torch.nn.Module, images: torch.Tensor
) -> dict[str, Callable[[], None]]:
    """One inference of ``images`` by onnxruntime (``ours``) and by PyTorch eager (``reference``)."""
    feed = {INPUT_NAME: images.numpy()}

    def run_onnxruntime() -> None:
        session.run(None, feed)

    def run_eager() -> None:
        with torch.inference_mode():
            model(images)

    return {"ours": run_onnxruntime, "reference": run_eager}


def measure_deployment(
    variant: str,
    image_size: int,
    batch_sizes: list[int],
    threads: int,
    rounds: int,
    steps: int,
    warmup: int = 2,
) -> list[Row]:
    """One row per batch size: images per second of onnxruntime and of PyTorch eager on ``variant``."""
    torch.manual_seed(0)
    model = create_model(variant).eval()
    with tempfile.TemporaryDirectory(prefix="mambaout-deploy-") as folder:
        path = Path(folder) / "model.onnx"
        export_onnx(model, path, image_size)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rows = []
    for batch_size in batch_sizes:
        images = torch.randn(batch_size, 3, image_size, image_size)
        steps_per_round = max(1, steps * 16 // batch_size)
        rates = alternating_rates(inference_steps(session, model, images), batch_size, rounds, steps_per_round, warmup)
        row = compare(f"deploy/{variant}/{image_size}px/b{batch_size}", rates, "img/s")
        row.note = f"onnxruntime / eager; {row.note}" if row.note else "onnxruntime / eager"
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=["mambaout_femto", "mambaout_tiny"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--threads", type=int, default=2, help="threads of onnxruntime and of torch")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    parser.add_argument("--steps", type=int, default=2, help="timed batches of 16 images per round (more at batch 1)")
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# {machine_description('cpu')}; onnxruntime {onnxruntime.__version__}", flush=True)
    rows: list[Row] = []
    for variant in args.variants:
        for row in measure_deployment(
            variant, args.image_size, args.batch_sizes, args.threads, args.rounds, args.steps
        ):
            print(f"{row.name}: onnxruntime {row.ours:.4g} img/s, eager {row.reference:.4g}, ratio {row.ratio:.3f}")
            rows.append(row)
    print()
    print(rows_table(rows))
    if args.json:
        with open(args.json, "w") as file:
            json.dump([row.as_json() for row in rows], file, indent=2)
            file.write("\n")
    return rows


if __name__ == "__main__":
    main()
