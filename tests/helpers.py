"""Command-line arguments shared by the tests that run recipes through the CLI."""

from __future__ import annotations

from pathlib import Path


def cpu_trainer_args(root: Path) -> list[str]:
    """Run a recipe on one CPU process under ``root``, without a progress bar."""
    return [
        f"--trainer.default_root_dir={root}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.strategy=auto",
        "--trainer.num_nodes=1",
        "--trainer.enable_progress_bar=false",
    ]


def small_run_args(root: Path, image_folder: Path) -> list[str]:
    """Swap a classification recipe's data for a generated image folder and keep the run to a few CPU steps."""
    return [
        *cpu_trainer_args(root),
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--data.path=imagefolder",
        f"--data.data_dir={image_folder}",
        "--data.image_size=64",
        "--data.batch_size=4",
        "--data.num_workers=0",
    ]


def small_segmentation_args(root: Path, ade20k_folder: Path) -> list[str]:
    """Swap a segmentation recipe's data for the generated ADE20K-layout folder; two CPU steps, then validation."""
    return [
        *cpu_trainer_args(root),
        "--trainer.sync_batchnorm=false",
        "--trainer.max_epochs=1",
        "--trainer.max_steps=2",
        "--trainer.limit_train_batches=2",
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=2",
        "--data.path=ade20k",
        f"--data.data_dir={ade20k_folder}",
        "--data.reduce_zero_label=true",
        "--data.crop_size=32",
        "--data.resize_scale=[64,32]",
        "--data.batch_size=2",
        "--data.eval_batch_size=1",
        "--data.num_workers=0",
        "--model.slide_crop_size=[24,24]",
        "--model.slide_stride=[16,16]",
    ]


TINY_BACKBONE = '{"depths": [1, 1, 1, 1], "dims": [8, 8, 16, 16]}'


def tiny_run_args(root: Path, images: Path, *extra: str) -> list[str]:
    """Settings over the classification quick start: one 32x32 step of a one-block-per-stage femto on ``images``."""
    return [
        *cpu_trainer_args(root),
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=1",
        "--trainer.limit_val_batches=1",
        "--data.path=imagefolder",
        f"--data.data_dir={images}",
        "--data.image_size=32",
        "--data.batch_size=2",
        "--data.num_workers=0",
        f"--model.backbone_args={TINY_BACKBONE}",
        *extra,
    ]


def tiny_fit_args(root: Path, images: Path, *extra: str) -> list[str]:
    """`fit` of the classification quick start with :func:`tiny_run_args`."""
    return [
        "fit",
        f"--config={Path(__file__).parents[1] / 'recipes' / 'quickstart.yaml'}",
        *tiny_run_args(root, images, *extra),
    ]
