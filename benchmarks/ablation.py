"""Token-mixer ablation: a recipe under every overlay in recipes/ablation/, through `mambaout compare`.

Each recipe is one comparison grid (`mambaout compare`) in `--root/<recipe>`: every overlay is an arm,
at the recipe's own input size unless `--sizes` are given, one seed unless `--seeds`. The grid's
`report.md` (metric with seed intervals beside parameters, GMACs, training img/s, peak memory and
the first stage's L/6D) and `results.csv` are written there; the first table is printed here. A grid
run again skips its finished runs.

    python benchmarks/ablation.py                      # the quick start under every overlay, its own epochs
    python benchmarks/ablation.py --epochs 3 --seeds 3 # shorter, three seeds
    python benchmarks/ablation.py --recipes recipes/quickstart_segmentation.yaml --overlays recipes/ablation/ssm_*.yaml
    python benchmarks/ablation.py --threads 1 --epochs 1 -- --trainer.limit_train_batches=5   # CLI overrides
"""

import argparse
import sys
from pathlib import Path

from mambaout_pl.compare import compare_main

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPES = [ROOT / "recipes" / "quickstart.yaml"]
DEFAULT_OVERLAYS = sorted((ROOT / "recipes" / "ablation").glob("*.yaml"))


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra: list[str] = []
    if "--" in argv:
        argv, extra = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", type=Path, default=DEFAULT_RECIPES, help="recipe YAMLs to run")
    parser.add_argument("--overlays", nargs="+", type=Path, default=DEFAULT_OVERLAYS, help="the arms")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipes' max_epochs")
    parser.add_argument("--sizes", nargs="+", default=None, help="input sizes (default: the recipe's own)")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1, help="runs at once")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per run")
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "ablation", help="folder of the grids")
    return parser.parse_args(argv), extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else list(argv))
    status = 0
    for recipe in args.recipes:
        out = args.root / recipe.stem
        command = ["--config", str(recipe), "--arms", *map(str, args.overlays), "--out", str(out)]
        command += ["--seeds", str(args.seeds), "--jobs", str(args.jobs)]
        command += ["--sizes", *args.sizes] if args.sizes else []
        command += ["--threads", str(args.threads)] if args.threads else []
        overrides = [f"--trainer.max_epochs={args.epochs}"] if args.epochs else []
        status = max(status, compare_main([*command, "--", *overrides, *extra]))
        report = out / "report.md"
        if report.is_file():
            print(report.read_text().split("\n## ")[1].split("\n", 1)[1])
    return status


if __name__ == "__main__":
    raise SystemExit(main())
