"""The visual Mamba baselines as backbones of every task: recipes, fits through the CLI, sharding, deployment, Hub."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from test_export_deploy import assert_deploys, perturbed
from torch.distributed.tensor import DTensor

from mambaout_pl.cli import main, run_cli
from mambaout_pl.export.hub import export_checkpoint
from mambaout_pl.models import RCNNDetector, UperNetSegmentor, create_model, from_pretrained, list_models
from mambaout_pl.models.sharding import shard_units
from mambaout_pl.training.sharding import data_parallel_mesh, shard_network

ROOT = Path(__file__).parents[1]
BASELINES = ROOT / "recipes" / "baselines"
QUICK_OVERLAYS = sorted(BASELINES.glob("quickstart_*.yaml"))
FULL_OVERLAYS = sorted(set(BASELINES.glob("*.yaml")) - set(QUICK_OVERLAYS))
QUICKSTARTS = {
    "classification": ROOT / "recipes" / "quickstart.yaml",
    "segmentation": ROOT / "recipes" / "quickstart_segmentation.yaml",
    "detection": ROOT / "recipes" / "quickstart_detection.yaml",
}
# What each task's quick start logs once it has trained and validated.
TASK_METRICS = {
    "classification": {"val/top1", "train/loss"},
    "segmentation": {"val/mIoU", "train/loss"},
    "detection": {"val/bbox_mAP", "val/segm_mAP", "train/loss_mask"},
}
SHORT = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.batch_size=4",
    "--data.eval_batch_size=8",
    "--data.num_workers=0",
]
# One small network of each family, for the checks that need no recipe.
TINY: dict[str, dict[str, Any]] = {
    "vanilla_vmamba_tiny": {"dims": 16, "depths": (1, 1, 2, 1)},
    "vmamba_tiny_s1l8": {"dims": 16, "depths": (1, 1, 2, 1)},
    "vim_tiny": {"embed_dim": 32, "depth": 4, "d_state": 8, "patch_size": 8, "stride": 8},
    "mamba_vision_T": {
        "dim": 16,
        "in_dim": 8,
        "depths": (1, 1, 2, 1),
        "num_heads": (1, 1, 2, 2),
        "window_size": (8, 8, 2, 1),
    },
}
# Strides of the maps the dense heads get: a plain model's (patch 8) through the simple feature pyramid.
TINY_REDUCTIONS = {
    "vanilla_vmamba_tiny": [4, 8, 16, 32],
    "vmamba_tiny_s1l8": [4, 8, 16, 32],
    "vim_tiny": [2, 4, 8, 16],
    "mamba_vision_T": [4, 8, 16, 32],
}

pytestmark = pytest.mark.usefixtures("one_thread")


def overlay_settings(overlay: Path) -> dict[str, Any]:
    return yaml.safe_load(overlay.read_text())["model"]["init_args"]


@pytest.mark.parametrize("overlay", FULL_OVERLAYS, ids=[overlay.stem for overlay in FULL_OVERLAYS])
def test_every_baseline_recipe_names_a_registered_model_and_its_drop_path(overlay: Path) -> None:
    settings = overlay_settings(overlay)
    assert settings["backbone"] in list_models()
    assert 0.0 <= settings["drop_path_rate"] < 1.0
    with torch.device("meta"):
        model = create_model(settings["backbone"], drop_path_rate=settings["drop_path_rate"])
    rates = [module.drop_prob for module in model.modules() if hasattr(module, "drop_prob")]
    assert max(rates, default=0.0) == pytest.approx(settings["drop_path_rate"])


@pytest.mark.slow
@pytest.mark.parametrize("task", list(QUICKSTARTS))
@pytest.mark.parametrize("overlay", QUICK_OVERLAYS, ids=[overlay.stem for overlay in QUICK_OVERLAYS])
def test_every_baseline_fits_every_quick_start(overlay: Path, task: str, tmp_path: Path) -> None:
    settings = overlay_settings(overlay)
    cli = run_cli(
        [
            "fit",
            f"--config={QUICKSTARTS[task]}",
            f"--config={overlay}",
            f"--trainer.default_root_dir={tmp_path}",
            *SHORT,
        ]
    )
    assert cli.trainer.global_step == 2
    metrics = cli.trainer.callback_metrics
    assert TASK_METRICS[task] <= set(metrics)
    assert all(torch.isfinite(metrics[name]) for name in TASK_METRICS[task])
    expected = type(create_model(settings["backbone"], **settings["backbone_args"]))
    assert any(type(module) is expected for module in cli.model.modules())


@pytest.mark.slow
@pytest.mark.parametrize("overlay", QUICK_OVERLAYS, ids=[overlay.stem for overlay in QUICK_OVERLAYS])
def test_a_trained_baseline_exports_to_the_hub_format_and_loads_back(overlay: Path, tmp_path: Path) -> None:
    args = ["fit", f"--config={QUICKSTARTS['classification']}", f"--config={overlay}", *SHORT]
    assert main([*args, f"--trainer.default_root_dir={tmp_path}"]) is None
    (checkpoint,) = tmp_path.glob("lightning_logs/version_0/checkpoints/last.ckpt")
    folder = export_checkpoint(checkpoint, tmp_path / "export")
    loaded = from_pretrained(folder)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    settings = overlay_settings(overlay)
    network = create_model(settings["backbone"], num_classes=10, **settings["backbone_args"])
    network.load_state_dict({key.removeprefix("model."): value for key, value in state.items()})
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), network.eval()(images))


@pytest.mark.parametrize("name", list(TINY))
def test_every_baseline_deploys_to_onnx_and_torch_export(name: str, tmp_path: Path) -> None:
    model = perturbed(create_model(name, num_classes=5, **TINY[name]))
    assert_deploys(model, tmp_path, classes=5)


@pytest.mark.parametrize("name", list(TINY))
def test_a_sharded_baseline_computes_the_whole_networks_outputs_and_gradients(name: str, one_process_mesh) -> None:
    torch.manual_seed(0)
    whole = create_model(name, num_classes=3, drop_path_rate=0.0, **TINY[name])
    units = shard_units(whole)
    blocks = [module for module in whole.modules() if type(module).__name__.endswith("Block")]
    assert blocks and all(any(block is unit for unit in units) for block in blocks)
    sharded = copy.deepcopy(whole)
    shard_network(sharded, data_parallel_mesh(one_process_mesh), "32-true")
    assert all(isinstance(param, DTensor) for param in sharded.parameters())
    images = torch.randn(2, 3, 32, 32)
    out_whole, out_sharded = whole(images), sharded(images)
    torch.testing.assert_close(out_sharded, out_whole, rtol=1e-6, atol=1e-6)
    out_whole.square().sum().backward()
    out_sharded.square().sum().backward()
    for (param_name, param), expected in zip(sharded.named_parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(param.grad.full_tensor(), expected.grad, rtol=1e-5, atol=1e-7, msg=param_name)


@pytest.mark.parametrize("name", list(TINY))
def test_every_baseline_feeds_upernet_and_mask_rcnn_at_four_strides(name: str) -> None:
    torch.manual_seed(0)
    segmentor = UperNetSegmentor(name, num_classes=4, channels=16, aux_channels=8, backbone_args=TINY[name]).eval()
    assert segmentor.backbone.reductions == TINY_REDUCTIONS[name]
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert segmentor(images).shape == (1, 4, 64, 96)
    detector = RCNNDetector(name, num_classes=3, fpn_channels=16, min_size=64, max_size=96, backbone_args=TINY[name])
    detector.train()
    targets = [
        {
            "boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]),
            "labels": torch.tensor([1]),
            "masks": torch.zeros(1, 64, 96, dtype=torch.uint8).index_fill_(1, torch.arange(4, 40), 1),
        }
    ]
    losses = detector(list(images), targets)
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness"} <= set(losses)
    sum(losses.values()).backward()
    first_block = next(module for module in detector.modules() if type(module).__name__.endswith("Block"))
    assert any(param.grad is not None and param.grad.abs().sum() > 0 for param in first_block.parameters())
