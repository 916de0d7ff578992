"""Command-line arguments shared by the tests that run recipes through the CLI."""

from __future__ import annotations

from pathlib import Path


def small_run_args(root: Path, image_folder: Path) -> list[str]:
    """Swap a classification recipe's data for a generated image folder and keep the run to a few CPU steps."""
    return [
        f"--trainer.default_root_dir={root}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.strategy=auto",
        "--trainer.num_nodes=1",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--data.path=imagefolder",
        f"--data.data_dir={image_folder}",
        "--data.image_size=64",
        "--data.batch_size=4",
        "--data.num_workers=0",
    ]
