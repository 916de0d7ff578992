"""Token-mixer ablation: train a recipe under every overlay in recipes/ablation/ and print one table.

Each overlay swaps the token mixer of the recipe it is given after; network, data and schedule stay. For each one the
table gives the parameters, GMACs per image at the recipe's input size (and at 224x224, where the
mixers' costs part; a detector's backbone only, marked so), the training throughput (the training steps of the fit itself, data loading
excluded, the first three left out as warm-up), the wall time of the fit, the epochs run and the
best validation score of the checkpoint callback's monitor.

    python benchmarks/ablation.py                      # the quick start under every overlay, its own epochs
    python benchmarks/ablation.py --epochs 3           # shorter
    python benchmarks/ablation.py --recipes recipes/quickstart_segmentation.yaml --overlays recipes/ablation/ssm_*.yaml --json ablation.json
    python benchmarks/ablation.py --threads 1 --epochs 1 -- --trainer.limit_train_batches=5   # CLI overrides
"""

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer

from mambaout_pl.analysis import count_macs, describe_token_mixers, format_table, machine_description
from mambaout_pl.cli import MambaOutCLI
from mambaout_pl.models import MambaOut
from mambaout_pl.tasks import BaseTask

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPES = [ROOT / "recipes" / "quickstart.yaml"]
DEFAULT_OVERLAYS = sorted((ROOT / "recipes" / "ablation").glob("*.yaml"))


class TrainThroughput(Callback):
    """Images per second over the training steps of a fit (batch start to batch end), after `warmup` steps."""

    def __init__(self, warmup: int = 3):
        self.warmup = warmup
        self.steps = 0
        self.images = 0
        self.seconds = 0.0
        self._start = 0.0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.steps += 1
        if self.steps > self.warmup:
            self.images += len(batch_images(batch))
            self.seconds += time.perf_counter() - self._start

    @property
    def images_per_second(self) -> float | None:
        return self.images / self.seconds if self.seconds else None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", type=Path, default=DEFAULT_RECIPES, help="recipe YAMLs to run")
    parser.add_argument(
        "--overlays",
        nargs="+",
        type=Path,
        default=DEFAULT_OVERLAYS,
        help="token-mixer overlays, each given after each recipe",
    )
    parser.add_argument("--epochs", type=int, default=None, help="override the recipes' max_epochs")
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "ablation", help="folder for the runs' logs")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch decides)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows to this JSON file")
    parser.add_argument(
        "extra", nargs="*", help="further CLI overrides for every run, e.g. --trainer.limit_train_batches=5"
    )
    return parser.parse_args()


def run_recipe(recipe: Path, overlay: Path, epochs: int | None, root: Path, extra: list[str]) -> dict[str, Any]:
    """Fit one recipe with one overlay through the CLI, timing its training steps, and measure the network."""
    name = f"{recipe.stem}_{overlay.stem}"
    args = [
        f"--config={recipe}",
        f"--config={overlay}",
        f"--trainer.default_root_dir={root / name}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.callbacks=[]",
        *([f"--trainer.max_epochs={epochs}"] if epochs else []),
        *extra,
    ]
    cli = MambaOutCLI(
        BaseTask, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, args=args, run=False
    )
    throughput = TrainThroughput()
    cli.trainer.callbacks.append(throughput)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = time.perf_counter() - start

    network = cli.model.model
    batch = next(iter(cli.datamodule.val_dataloader()))
    image_size = tuple(batch_images(batch)[0].shape[-2:])
    # A detector's forward (proposals, NMS) cannot run on the meta device: count its backbone there.
    counted = network if isinstance(batch_images(batch), torch.Tensor) else _backbone(network)
    meta_network = copy.deepcopy(counted).to("meta")
    best = next(c for c in cli.trainer.checkpoint_callbacks if c.monitor)
    return {
        "recipe": name,
        "mixer": describe_token_mixers(_backbone(network)),
        "params": sum(p.numel() for p in network.parameters()),
        "gmacs": count_macs(meta_network, image_size) / 1e9,
        "gmacs_224": count_macs(meta_network, (224, 224)) / 1e9,
        "image_size": list(image_size),
        "gmacs_of": "network" if counted is network else "backbone",
        "train_images_per_second": throughput.images_per_second,
        "fit_seconds": seconds,
        "epochs": cli.trainer.current_epoch,
        "monitor": best.monitor,
        "best_score": best.best_model_score.item() if best.best_model_score is not None else None,
    }


def batch_images(batch: Any) -> torch.Tensor | list[torch.Tensor]:
    """The images of a batch: a tensor (classification, segmentation) or a list (detection)."""
    if isinstance(batch, dict):
        return batch["image"] if "image" in batch else batch["images"]
    return batch[0]


def _backbone(network: torch.nn.Module) -> torch.nn.Module:
    """The MambaOut inside a segmentor (or the network itself)."""
    if isinstance(network, MambaOut):
        return network
    return next((m for m in network.modules() if isinstance(m, MambaOut)), network)


def _shown(path: Path) -> Path:
    resolved = path.resolve()
    return resolved.relative_to(ROOT) if resolved.is_relative_to(ROOT) else path


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {machine_description('cpu')}", flush=True)
    rows = []
    for recipe in args.recipes:
        for overlay in args.overlays:
            print(f"# fitting {_shown(recipe)} + {_shown(overlay)}", file=sys.stderr, flush=True)
            rows.append(run_recipe(recipe, overlay, args.epochs, args.root, args.extra))
            print(f"# {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=2) + "\n")

    table = [
        (
            row["recipe"],
            row["mixer"],
            f"{row['params']:,}",
            "x".join(str(s) for s in row["image_size"]),
            f"{row['gmacs']:.4f}" + ("" if row["gmacs_of"] == "network" else " (backbone)"),
            f"{row['gmacs_224']:.3f}",
            "-" if row["train_images_per_second"] is None else f"{row['train_images_per_second']:.0f}",
            f"{row['fit_seconds']:.0f}",
            row["epochs"],
            row["monitor"],
            "-" if row["best_score"] is None else f"{row['best_score']:.4f}",
        )
        for row in rows
    ]
    headers = (
        "recipe",
        "mixer",
        "params",
        "input",
        "GMACs",
        "GMACs@224",
        "train img/s",
        "fit s",
        "epochs",
        "metric",
        "best",
    )
    print(format_table(headers, table, right=(False, False, True, False) + (True,) * 5 + (False, True)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
