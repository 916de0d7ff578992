"""The token-mixer ablation overlays: each one swaps a quick start's mixer, and each pairing fits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from mambaout_pl.cli import main

ROOT = Path(__file__).parents[1]
OVERLAYS = sorted((ROOT / "recipes" / "ablation").glob("*.yaml"))

# Overlay -> (backbone_args, a state-dict key suffix only that mixer has, a key part it must not have).
MIXERS = {
    "gated_conv": ({"token_mixer": "gated_conv"}, "stages.0.blocks.0.conv.weight", "conv.A_log"),
    "gated_conv_k15": (
        {"token_mixer": "gated_conv", "kernel_size": 15},
        "stages.0.blocks.0.conv.weight",
        "conv.A_log",
    ),
    "ssm_cross": ({"token_mixer": "ssm", "scan": "cross"}, "stages.0.blocks.0.conv.A_log", "conv.qkv"),
    "ssm_raster": ({"token_mixer": "ssm", "scan": "raster"}, "stages.0.blocks.0.conv.A_log", "conv.qkv"),
    "ssm_bidirectional": ({"token_mixer": "ssm", "scan": "bidirectional"}, "stages.0.blocks.0.conv.A_log", "conv.qkv"),
    "attention_causal": (
        {"token_mixer": "attention", "causal": True},
        "stages.0.blocks.0.conv.qkv.weight",
        "conv.A_log",
    ),
    "attention_full": (
        {"token_mixer": "attention", "causal": False},
        "stages.0.blocks.0.conv.qkv.weight",
        "conv.A_log",
    ),
}
# Quick start -> CLI overrides that shrink a run to a few CPU steps.
QUICKSTARTS = {
    "quickstart_segmentation": [
        "--data.batch_size=2",
        "--data.eval_batch_size=1",
        "--data.crop_size=32",
        "--data.resize_scale=[64,32]",
        "--data.num_workers=0",
    ],
    "quickstart": ["--data.batch_size=8", "--data.num_workers=0"],
}
RUNS = [(quickstart, overlay) for quickstart in QUICKSTARTS for overlay in OVERLAYS]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_mixer_has_an_overlay_and_the_overlays_set_only_the_mixer() -> None:
    assert {overlay.stem for overlay in OVERLAYS} == set(MIXERS)
    for overlay in OVERLAYS:
        assert yaml.safe_load(overlay.read_text()) == {
            "model": {"init_args": {"backbone_args": MIXERS[overlay.stem][0]}}
        }


@pytest.mark.slow
@pytest.mark.parametrize(("quickstart", "overlay"), RUNS, ids=[f"{q}+{o.stem}" for q, o in RUNS])
def test_overlay_fits_on_its_quick_start(quickstart: str, overlay: Path, tmp_path: Path) -> None:
    main(
        [
            "fit",
            f"--config={ROOT / 'recipes' / f'{quickstart}.yaml'}",
            f"--config={overlay}",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.callbacks=[]",
            *QUICKSTARTS[quickstart],
        ]
    )
    (run,) = (tmp_path / "lightning_logs").iterdir()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    backbone_args, present, absent = MIXERS[overlay.stem]
    assert saved["model"]["init_args"]["backbone_args"] == backbone_args
    recipe = yaml.safe_load((ROOT / "recipes" / f"{quickstart}.yaml").read_text())
    assert saved["model"]["class_path"] == recipe["model"]["class_path"]
    assert saved["model"]["init_args"]["lr"] == recipe["model"]["init_args"]["lr"]
    assert saved["data"]["init_args"]["path"] == recipe["data"]["init_args"]["path"]

    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    state_dict = checkpoint["state_dict"]
    assert any(key.endswith(present) for key in state_dict), present
    side = backbone_args.get("kernel_size", 7)
    mixer_weights = [value for key, value in state_dict.items() if key.endswith("blocks.0.conv.weight")]
    assert backbone_args["token_mixer"] != "gated_conv" or {w.shape[-2:] for w in mixer_weights} == {(side, side)}
    assert not any(absent in key for key in state_dict)
    assert all(torch.isfinite(value).all() for value in state_dict.values() if value.is_floating_point())
    assert checkpoint["global_step"] == 2
