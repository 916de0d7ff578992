"""The token-mixer ablation recipes: each one is a quick start with another mixer, and each one fits."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from mambaout_pl.cli import main

ROOT = Path(__file__).parents[1]
ABLATION = sorted((ROOT / "recipes" / "ablation").glob("*.yaml"))

# Mixer -> (backbone_args, a state-dict key suffix only that mixer has, a key part it must not have).
MIXERS = {
    "gated_conv": ({"token_mixer": "gated_conv"}, "stages.0.blocks.0.conv.weight", "conv.A_log"),
    "ssm_raster": ({"token_mixer": "ssm", "scan": "raster"}, "stages.0.blocks.0.conv.A_log", "conv.qkv"),
    "ssm_bidirectional": ({"token_mixer": "ssm", "scan": "bidirectional"}, "stages.0.blocks.0.conv.A_log", "conv.qkv"),
    "attention_causal": ({"token_mixer": "attention", "causal": True}, "stages.0.blocks.0.conv.qkv.weight", "conv.A_log"),
    "attention_full": ({"token_mixer": "attention", "causal": False}, "stages.0.blocks.0.conv.qkv.weight", "conv.A_log"),
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


def quickstart_and_mixer(recipe: Path) -> tuple[str, str]:
    """`quickstart_segmentation_ssm_raster` -> (`quickstart_segmentation`, `ssm_raster`)."""
    for quickstart in QUICKSTARTS:  # the longer name first
        if recipe.stem.startswith(quickstart + "_") and recipe.stem[len(quickstart) + 1:] in MIXERS:
            return quickstart, recipe.stem[len(quickstart) + 1:]
    raise AssertionError(f"{recipe.name} is not <quickstart>_<mixer>.yaml")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_mixer_has_a_recipe_per_quick_start():
    found = {quickstart_and_mixer(recipe) for recipe in ABLATION}
    quickstarts = {"quickstart"} | ({"quickstart_segmentation"} if (ROOT / "recipes" / "quickstart_segmentation.yaml").exists() else set())
    assert found == {(quickstart, mixer) for quickstart in quickstarts for mixer in MIXERS}


@pytest.mark.parametrize("recipe", ABLATION, ids=[r.stem for r in ABLATION])
def test_recipe_is_its_quick_start_with_another_mixer(recipe: Path) -> None:
    quickstart_name, mixer = quickstart_and_mixer(recipe)
    quickstart = yaml.safe_load((ROOT / "recipes" / f"{quickstart_name}.yaml").read_text())
    ablation = yaml.safe_load(recipe.read_text())
    assert ablation["model"]["init_args"].pop("backbone_args") == MIXERS[mixer][0]
    assert ablation["trainer"].pop("default_root_dir") == f"runs/ablation/{recipe.stem}"
    quickstart["trainer"].pop("default_root_dir")
    assert ablation == quickstart


@pytest.mark.parametrize("recipe", ABLATION, ids=[r.stem for r in ABLATION])
def test_recipe_fits(recipe: Path, tmp_path: Path) -> None:
    quickstart_name, mixer = quickstart_and_mixer(recipe)
    main(
        [
            "fit",
            f"--config={recipe}",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.callbacks=[]",
            *QUICKSTARTS[quickstart_name],
        ]
    )
    (run,) = (tmp_path / "lightning_logs").iterdir()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    backbone_args, present, absent = MIXERS[mixer]
    assert saved["model"]["init_args"]["backbone_args"] == backbone_args

    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    state_dict = checkpoint["state_dict"]
    assert any(key.endswith(present) for key in state_dict), present
    assert not any(absent in key for key in state_dict)
    assert all(torch.isfinite(value).all() for value in state_dict.values() if value.is_floating_point())
    assert checkpoint["global_step"] == 2
