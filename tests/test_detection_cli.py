"""The CLI on detection recipes: the quick start fits, keeps its best checkpoint by val/segm_mAP, exports, predicts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pycocotools.coco import COCO

from mambaout_pl.cli import MambaOutCLI, main, run_cli
from mambaout_pl.data.detection import DetectionDataModule
from mambaout_pl.models import RCNNDetector, create_model, from_pretrained
from mambaout_pl.tasks import BaseTask

ROOT = Path(__file__).parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart_detection.yaml"
COCO_RECIPE = ROOT / "recipes" / "coco_maskrcnn_mambaout.yaml"
OVERLAYS = sorted((ROOT / "recipes" / "ablation").glob("*.yaml"))
# A few CPU steps of the quick start: 3 training batches of 4 scenes, 1 validation batch of 8.
SHORT = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=1",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.batch_size=4",
    "--data.eval_batch_size=8",
    "--data.num_workers=0",
]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_quickstart_fits_keeps_its_best_checkpoint_by_segm_map_and_exports(tmp_path: Path) -> None:
    assert main(["fit", f"--config={QUICKSTART}", f"--trainer.default_root_dir={tmp_path}", *SHORT]) is None
    (run,) = (tmp_path / "lightning_logs").iterdir()
    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    checkpoint = torch.load(best, map_location="cpu", weights_only=False)
    (callback,) = [state for key, state in checkpoint["callbacks"].items() if "'monitor': 'val/segm_mAP'" in key]
    assert callback["monitor"] == "val/segm_mAP"
    assert checkpoint["global_step"] == 3
    hparams = checkpoint["hyper_parameters"]
    assert hparams["num_classes"] == 10 and hparams["label_names"] == [str(digit) for digit in range(10)]  # linked
    assert checkpoint["state_dict"]["model.roi_heads.box_predictor.cls_score.weight"].shape[0] == 11
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["checkpoint"]["monitor"] == "val/segm_mAP" and saved["checkpoint"]["mode"] == "max"

    assert main(["export", str(best), str(tmp_path / "export")]) == 0
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["model_name"] == "mambaout_pl.models.detector.RCNNDetector"
    assert config["task"] == "mambaout_pl.tasks.detection.InstanceSegmentationTask"
    assert config["label_names"] == [str(digit) for digit in range(10)]
    detector = from_pretrained(tmp_path / "export").eval()
    assert isinstance(detector, RCNNDetector) and detector.masks and detector.num_classes == 10
    weights = {key.removeprefix("model."): value for key, value in checkpoint["state_dict"].items()}
    for key, value in detector.state_dict().items():
        assert torch.equal(value, weights[key]), key
    card = (tmp_path / "export" / "README.md").read_text()
    assert "image-segmentation" in card and "val/segm_mAP" in card


def test_predict_writes_coco_results_with_the_datasets_category_ids(tmp_path: Path) -> None:
    main(
        [
            "predict",
            f"--config={QUICKSTART}",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.limit_predict_batches=1",
            "--trainer.enable_progress_bar=false",
            "--data.predict_split=val2017",
            "--data.eval_batch_size=6",
            "--data.num_workers=0",
        ]
    )
    folder = tmp_path / "lightning_logs" / "version_0" / "predict"  # the predict run's own folder
    results = folder / "results.json"
    datamodule = DetectionDataModule(path="builtin:digit_detection")
    datamodule.prepare_data()
    coco = COCO(str(datamodule.annotation_file("val")))
    loaded = coco.loadRes(str(results))
    assert {annotation["image_id"] for annotation in loaded.anns.values()} == set(range(1, 7))
    assert {annotation["category_id"] for annotation in loaded.anns.values()} <= set(coco.getCatIds())
    images = json.loads((folder / "images.json").read_text())
    assert [image["id"] for image in images] == list(range(1, 7))
    for image in images:  # the annotation file's own entry of each image the results name
        truth = coco.imgs[image["id"]]
        assert (image["file_name"], image["width"], image["height"]) == (
            truth["file_name"],
            truth["width"],
            truth["height"],
        )
    pictures = sorted(path.name for path in (folder / "pictures").iterdir())
    assert pictures == sorted(Path(image["file_name"]).with_suffix(".png").name for image in images)


def test_predict_on_a_folder_names_pictures_after_the_images_with_their_sub_folders(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name, (width, height) in {"a/scan.png": (40, 30), "b/scan.jpg": (36, 48), "top.png": (32, 32)}.items():
        (tmp_path / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(tmp_path / "images" / name)
    main(
        [
            "predict",
            f"--config={QUICKSTART}",
            f"--trainer.default_root_dir={tmp_path / 'runs'}",
            "--trainer.enable_progress_bar=false",
            f"--data.predict_images={tmp_path / 'images'}",
            "--data.num_workers=0",
        ]
    )
    folder = tmp_path / "runs" / "lightning_logs" / "version_0" / "predict"
    images = json.loads((folder / "images.json").read_text())
    assert [(image["file_name"], image["width"], image["height"]) for image in images] == [
        ("a/scan.png", 40, 30),
        ("b/scan.jpg", 36, 48),
        ("top.png", 32, 32),
    ]
    results = json.loads((folder / "results.json").read_text())
    assert {result["image_id"] for result in results} <= {image["id"] for image in images}
    pictures = sorted(path.relative_to(folder / "pictures").as_posix() for path in (folder / "pictures").rglob("*.png"))
    assert pictures == ["a/scan.png", "b/scan.png", "top.png"]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=[overlay.stem for overlay in OVERLAYS])
def test_token_mixer_overlays_reach_the_detection_quick_start(overlay: Path, tmp_path: Path) -> None:
    cli = MambaOutCLI(
        BaseTask,
        DetectionDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=[f"--config={QUICKSTART}", f"--config={overlay}", f"--trainer.default_root_dir={tmp_path}"],
        run=False,
    )
    backbone_args = yaml.safe_load(overlay.read_text())["model"]["init_args"]["backbone_args"]
    assert cli.model.hparams.backbone_args == backbone_args
    assert cli.model.model.config["model_args"]["backbone_args"] == backbone_args
    expected = create_model("mambaout_femto", **backbone_args).stages[0].blocks[0].conv
    assert type(cli.model.model.backbone.body.model.stages[0].blocks[0].conv) is type(expected)


@pytest.mark.slow
def test_ssm_overlay_fits_on_the_detection_quick_start(tmp_path: Path) -> None:
    overlay = ROOT / "recipes" / "ablation" / "ssm_raster.yaml"
    cli = run_cli(
        ["fit", f"--config={QUICKSTART}", f"--config={overlay}", f"--trainer.default_root_dir={tmp_path}", *SHORT]
    )
    assert cli.trainer.global_step == 3
    assert {"val/segm_mAP", "val/bbox_mAP", "train/loss_mask"} <= set(cli.trainer.callback_metrics)


def test_coco_recipe_is_the_papers_setting() -> None:
    recipe = yaml.safe_load(COCO_RECIPE.read_text())
    trainer, model, data = recipe["trainer"], recipe["model"]["init_args"], recipe["data"]["init_args"]
    assert recipe["model"]["class_path"] == "mambaout_pl.tasks.InstanceSegmentationTask"
    assert data["batch_size"] * trainer["devices"] * trainer.get("num_nodes", 1) == 16
    assert (data["path"], data["data_dir"], data["min_size"], data["max_size"], data["hflip"]) == (
        "coco",
        "data/coco",
        800,
        1333,
        0.5,
    )
    assert (model["min_size"], model["max_size"], model["fpn_channels"], model["head_style"]) == (
        800,
        1333,
        256,
        "mmdet",
    )
    assert (model["lr"], model["weight_decay"], model["scheduler"], model["decay_milestones"]) == (
        1e-4,
        0.05,
        "multistep",
        [8, 11],
    )
    assert (model["warmup_steps"], model["warmup_lr"], trainer["max_epochs"]) == (1000, 1e-7, 12)
    assert (trainer["precision"], model["drop_path_rate"], model["backbone"]) == ("16-mixed", 0.3, "mambaout_tiny")
    assert model["pretrained"]


@pytest.mark.slow
def test_coco_recipe_fits_on_the_embedded_coco_folder(tmp_path: Path) -> None:
    """The paper's recipe runs end to end, its data swapped for the embedded digits (a COCO folder) and its size shrunk."""
    weights = tmp_path / "imagenet.pth"
    torch.save(create_model("mambaout_tiny").state_dict(), weights)
    cli = run_cli(
        [
            "fit",
            f"--config={COCO_RECIPE}",
            f"--trainer.default_root_dir={tmp_path / 'run'}",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.strategy=auto",
            "--trainer.num_nodes=1",
            "--trainer.precision=32-true",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=1",
            "--trainer.limit_val_batches=1",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--data.path=builtin:digit_detection",
            "--data.data_dir=null",
            "--data.train_split=train2017",
            "--data.val_split=val2017",
            "--data.min_size=64",
            "--data.max_size=100",
            "--data.batch_size=1",
            "--data.eval_batch_size=2",
            "--data.num_workers=0",
            "--model.min_size=64",
            "--model.max_size=100",
            f"--model.pretrained={weights}",
        ]
    )
    assert cli.trainer.global_step == 1
    assert cli.model.hparams.num_classes == 10
    assert "val/segm_mAP" in cli.trainer.callback_metrics
