"""``mambaout demo EXPORT_OR_CHECKPOINT [--port P] [--host H]``: serve a trained network's Gradio page on this machine."""

from __future__ import annotations

import argparse
import sys

from mambaout_pl.errors import CheckpointError
from mambaout_pl.models import UnknownModelError, UntrustedNameError, allow_import_path


def demo_main(argv: list[str]) -> int:
    """Entry point of ``mambaout demo``."""
    parser = argparse.ArgumentParser(
        prog="mambaout demo",
        description="Serve a web page on this machine where an uploaded image gets the network's answer: its top-5 "
        "classes (classification), its coloured label map with a legend (segmentation), or its boxes, labels and "
        'masks (detection). Needs Gradio: pip install -e ".[demo]".',
    )
    parser.add_argument(
        "source", help="a checkpoint written by `mambaout fit` or a folder written by `mambaout export`"
    )
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default: 7860)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1, this machine only)"
    )
    parser.add_argument("--top-k", type=int, default=5, help="classes shown for a classifier (default: 5)")
    parser.add_argument(
        "--score-threshold", type=float, default=0.5, help="lowest score of a detection shown (default: 0.5)"
    )
    parser.add_argument(
        "--allow-import-path",
        action="append",
        default=[],
        metavar="PATH",
        help="a class or module of your own that the checkpoint or export may name, e.g. my_pkg.tasks.MyTask",
    )
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error(f"--top-k {args.top_k}: give at least 1 class.")
    from mambaout_pl.demo.app import import_gradio, launch_demo
    from mambaout_pl.demo.predictor import load_predictor

    try:
        import_gradio()
        allow_import_path(*args.allow_import_path)
        predictor = load_predictor(args.source)
    except (ImportError, CheckpointError, FileNotFoundError, UntrustedNameError, UnknownModelError) as error:
        print(f"mambaout demo: error: {error}", file=sys.stderr)
        return 2
    print(f"Serving the {predictor.kind} demo of {args.source} at http://{args.host}:{args.port} (Ctrl+C stops it)")
    launch_demo(predictor, args.host, args.port, block=True, top_k=args.top_k, score_threshold=args.score_threshold)
    return 0
