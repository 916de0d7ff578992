"""`mambaout demo`: a quick-start run's export served by Gradio on localhost answers an uploaded digit with the
network's own top-5 classes and mounts its page in headless Chromium; the segmentation and detection answers."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from browser_helpers import chromium, quickstart_fit_args, run_folders
from PIL import Image
from sklearn.datasets import load_digits

from mambaout_pl.cli import main
from mambaout_pl.data.transforms import create_classification_transforms
from mambaout_pl.demo import Classifier, Detector, Segmenter, load_predictor
from mambaout_pl.demo.app import launch_demo, make_predict
from mambaout_pl.export.hub import export_checkpoint, read_task_checkpoint, task_from_checkpoint
from mambaout_pl.models import RCNNDetector, UperNetSegmentor
from mambaout_pl.tasks.segmentation_outputs import palette

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no call home from the tests
TINY = {"depths": [1, 1, 1, 1], "dims": [8, 8, 16, 16]}


@pytest.fixture(scope="module")
def quickstart_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The best checkpoint of a tiny quick-start run, and its export folder."""
    root = tmp_path_factory.mktemp("quickstart")
    main(quickstart_fit_args(root))
    (run,) = run_folders(root)
    (checkpoint,) = (run / "checkpoints").glob("best-*.ckpt")
    return checkpoint, export_checkpoint(checkpoint, run / "export")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def digit_file(folder: Path, index: int) -> Path:
    """Digit ``index`` of scikit-learn's set as an 8x8 RGB PNG, as a user would upload it."""
    pixels = (load_digits().images[index] * (255 / 16)).round().astype(np.uint8)
    path = folder / f"digit_{index}.png"
    Image.fromarray(pixels).convert("RGB").save(path)
    return path


def own_top5(checkpoint: Path, image_file: Path) -> list[tuple[str, float]]:
    """The trained task's top-5 on the quick start's eval transform (recipes/quickstart.yaml: 32 px, bilinear, crop 1)."""
    task = task_from_checkpoint(read_task_checkpoint(checkpoint), checkpoint)
    transform = create_classification_transforms(32, interpolation="bilinear", crop_pct=1.0)
    with torch.no_grad():
        probabilities = task(transform(Image.open(image_file).convert("RGB"))[None]).softmax(dim=-1)[0]
    values, indices = probabilities.topk(5)
    return [(task.hparams.label_names[index], value) for index, value in zip(indices.tolist(), values.tolist())]


@pytest.mark.slow
def test_served_export_answers_an_upload_with_the_networks_top5_and_mounts_in_a_browser(
    quickstart_export: tuple[Path, Path], tmp_path: Path
) -> None:
    from gradio_client import Client, handle_file

    checkpoint, export = quickstart_export
    image_file = digit_file(tmp_path, 7)
    expected = own_top5(checkpoint, image_file)
    predictor = load_predictor(export)
    assert isinstance(predictor, Classifier) and isinstance(load_predictor(checkpoint), Classifier)
    assert [name for name, _ in load_predictor(checkpoint).top_classes(Image.open(image_file).convert("RGB"))] == [
        name for name, _ in expected
    ]
    port = free_port()
    app = launch_demo(predictor, port=port, block=False)
    try:
        answer = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(
            handle_file(str(image_file)), api_name="/predict"
        )
        dom = chromium(f"http://127.0.0.1:{port}/", tmp_path / "profile", "--virtual-time-budget=10000", "--dump-dom")
    finally:
        app.close()

    assert [item["label"] for item in answer["confidences"]] == [name for name, _ in expected]
    assert [item["confidence"] for item in answer["confidences"]] == pytest.approx([p for _, p in expected], abs=1e-5)
    assert answer["label"] == expected[0][0]
    assert 'class="gradio-container' in dom  # the Gradio app mounted
    assert 'data-testid="file-upload"' in dom and 'accept="image/*"' in dom  # with its image upload
    assert "MambaOut classification: version_0/export" in dom


def test_segmentation_answer_is_the_coloured_label_map_with_its_classes_shares(tmp_path: Path) -> None:
    torch.manual_seed(0)
    network = UperNetSegmentor("mambaout_femto", num_classes=3, channels=16, aux_head=False, backbone_args=TINY)
    predictor = Segmenter(network.eval(), ["sky", "road", "car"], {"input_size": (3, 32, 32)}, "segmentor")
    pixels = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "scene.png")

    picture, shares = make_predict(predictor)(str(tmp_path / "scene.png"))

    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    normalised = torch.from_numpy(((pixels / 255.0 - mean) / std).transpose(2, 0, 1)).float()
    with torch.no_grad():
        labels = network(normalised[None])[0].argmax(dim=0).numpy()  # 32x32 is the training crop: no rescale
    np.testing.assert_array_equal(predictor.label_map(Image.fromarray(pixels)), labels)
    names, counts = np.unique(labels, return_counts=True)
    assert shares == pytest.approx({["sky", "road", "car"][n]: c / labels.size for n, c in zip(names, counts)})
    assert list(shares.values()) == sorted(shares.values(), reverse=True)
    assert picture.height == 256 and picture.width > 256  # enlarged 8x, with the legend beside it
    blended = np.asarray(picture)[:256, :256][::8, ::8].astype(float)
    np.testing.assert_allclose(blended, 0.5 * pixels + 0.5 * palette(256)[labels], atol=0.51)


def test_detection_answer_lists_the_detectors_objects_above_the_threshold(tmp_path: Path) -> None:
    torch.manual_seed(0)
    network = RCNNDetector(
        "mambaout_femto", num_classes=3, min_size=64, max_size=96, anchor_sizes=(8, 16, 32, 64, 128), fpn_channels=32,
        box_detections_per_img=10, backbone_args=TINY,
    ).eval()  # fmt: skip
    predictor = Detector(network, ["cat", "dog", "fish"], source="detector")
    pixels = np.random.default_rng(1).integers(0, 256, size=(64, 80, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "scene.png")
    with torch.no_grad():
        objects = network([torch.from_numpy(pixels.transpose(2, 0, 1).copy()).float() / 255.0])[0]
    assert len(objects["scores"]) > 0
    threshold = float(objects["scores"].median())

    picture, found = make_predict(predictor, score_threshold=threshold)(str(tmp_path / "scene.png"))

    keep = objects["scores"] >= threshold
    assert [item["score"] for item in found] == pytest.approx(objects["scores"][keep].tolist())
    np.testing.assert_allclose([item["box"] for item in found], objects["boxes"][keep].numpy(), rtol=1e-6)
    assert [item["name"] for item in found] == [["cat", "dog", "fish"][label - 1] for label in objects["labels"][keep]]
    assert picture.size == (320, 256)  # drawn enlarged to a 256-pixel shorter side


def test_demo_of_a_missing_file_says_what_to_give(tmp_path: Path, capsys) -> None:
    assert main(["demo", str(tmp_path / "nothing.ckpt")]) == 2
    assert "does not exist: give a checkpoint written by `mambaout fit`" in capsys.readouterr().err
