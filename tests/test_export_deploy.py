"""Deployment export: ONNX files run in onnxruntime and torch.export programs give the PyTorch logits, every mixer."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import onnxruntime
import pytest
import torch
from helpers import small_run_args, small_segmentation_args
from torch import nn

from mambaout_pl.cli import main
from mambaout_pl.errors import ExportError
from mambaout_pl.export.deploy import OPSET, export_onnx, export_program
from mambaout_pl.export.hub import read_task_checkpoint, task_from_checkpoint
from mambaout_pl.models import UperNetSegmentor, create_model
from mambaout_pl.models.mixers.ssm import SelectiveScanMixer
from mambaout_pl.tasks import ClassificationTask

QUICKSTART = Path(__file__).parents[1] / "recipes" / "quickstart.yaml"
SIZE = 32
# The SSM's 'bidirectional' scan is two of the four token orders of 'cross'; 'raster' adds the causal conv.
# One network holds the slow exports (the SSM's unrolled chunks take most of the time), a stage each.
MIXERS = {
    "gated_conv": {},
    "attention_causal": {"token_mixer": "attention", "causal": True},
    "ssm_raster+ssm_cross+attention_full": {
        "token_mixer": ["ssm", "ssm", "attention", "gated_conv"],
        "scan": ["raster", "cross", None, None],
    },
}
FAST = {"gated_conv", "attention_causal"}


def perturbed(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with every parameter moved off its initial value, so every weight reaches the logits."""
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


def onnx_logits(path: Path, images: torch.Tensor) -> torch.Tensor:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])


def tensor_shape(value: onnx.ValueInfoProto) -> list[int | str]:
    return [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim]


def assert_deploys(model: nn.Module, folder: Path, classes: int, segmentation: bool = False) -> None:
    """ONNX file and .pt2 program of ``model`` at SIZE give its logits to 1e-4 at batch sizes 1 and 3."""
    program = export_program(model, folder / "model.pt2", SIZE)
    export_onnx(program, folder / "model.onnx")

    proto = onnx.load(str(folder / "model.onnx"))
    assert [entry.version for entry in proto.opset_import if entry.domain == ""] == [OPSET]
    (images,), (logits,) = proto.graph.input, proto.graph.output
    assert (images.name, tensor_shape(images)) == ("images", ["batch", 3, SIZE, SIZE])
    expected = ["batch", classes, SIZE, SIZE] if segmentation else ["batch", classes]
    assert (logits.name, tensor_shape(logits)) == ("logits", expected)

    loaded = torch.export.load(folder / "model.pt2").module()
    torch.manual_seed(1)
    for batch in (1, 3):
        images = torch.randn(batch, 3, SIZE, SIZE)
        with torch.no_grad():
            reference = model(images)
            from_program = loaded(images)
        assert reference.abs().max() > 0.1  # logits large enough for 1e-4 to mean something
        torch.testing.assert_close(onnx_logits(folder / "model.onnx", images), reference, atol=1e-4, rtol=0)
        torch.testing.assert_close(from_program, reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "mixer", [name if name in FAST else pytest.param(name, marks=pytest.mark.slow) for name in MIXERS]
)
def test_every_kind_of_mixer_exports_to_onnx_and_torch_export(mixer: str, tmp_path: Path) -> None:
    model = perturbed(create_model("mambaout_femto", num_classes=5, depths=(1, 1, 1, 1), **MIXERS[mixer]))
    model.train()
    assert_deploys(model, tmp_path, classes=5)
    assert model.training  # tracing puts it in eval mode only while it traces
    assert all(m.chunk_size is None for m in model.modules() if isinstance(m, SelectiveScanMixer))


@pytest.mark.slow
def test_upernet_segmentor_exports_to_onnx_and_torch_export(tmp_path: Path) -> None:
    model = UperNetSegmentor(
        backbone="mambaout_femto",
        num_classes=4,
        channels=16,
        aux_channels=8,
        pool_scales=(1, 2),
        backbone_args={"depths": [1, 1, 1, 1]},
    )
    assert_deploys(perturbed(model), tmp_path, classes=4, segmentation=True)


def test_export_refuses_to_overwrite_and_needs_an_input_size(tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous")
    model = create_model("mambaout_femto", num_classes=2, depths=(1, 1, 1, 1))
    with pytest.raises(ExportError, match="exists; pass overwrite=True"):
        export_onnx(model, target, SIZE)
    with pytest.raises(ExportError, match="exists; pass overwrite=True"):
        export_program(model, target, SIZE)
    assert target.read_bytes() == b"previous"
    with pytest.raises(ExportError, match="needs input_size"):
        export_onnx(model, tmp_path / "other.onnx")


@pytest.mark.slow
def test_cli_exports_a_trained_checkpoint_to_onnx_and_pt2(image_folder: Path, tmp_path: Path, capsys) -> None:
    backbone_args = '{"depths": [1, 1, 1, 1], "dims": [16, 24, 32, 40]}'
    main(
        [
            "fit",
            f"--config={QUICKSTART}",
            *small_run_args(tmp_path / "run", image_folder),
            f"--model.backbone_args={backbone_args}",
        ]
    )
    (checkpoint_path,) = (tmp_path / "run").glob("lightning_logs/version_0/checkpoints/last.ckpt")
    output = tmp_path / "deploy"

    assert main(["export", str(checkpoint_path), str(output), "--format", "onnx"]) == 0
    assert sorted(p.name for p in output.iterdir()) == ["deployment.json", "export_manifest.json", "model.onnx"]
    config = json.loads((output / "deployment.json").read_text())
    assert config["input"] == {"name": "images", "shape": ["batch", 3, 64, 64], "dtype": "float32"}
    assert config["output"] == {"name": "logits", "shape": ["batch", 3]}
    assert config["opset"] == OPSET and config["label_names"] == ["cat", "dog", "fish"]
    assert config["task"] == "mambaout_pl.tasks.classification.ClassificationTask"
    preprocessing = config["preprocessing"]
    assert preprocessing["input_size"] == [3, 64, 64] and preprocessing["interpolation"] == "bilinear"
    assert preprocessing["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert preprocessing["std"] == pytest.approx([0.229, 0.224, 0.225])

    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    task = ClassificationTask(backbone="mambaout_femto", num_classes=3, backbone_args=json.loads(backbone_args))
    task.load_state_dict(checkpoint["state_dict"])
    task.eval()
    torch.manual_seed(0)
    for batch in (1, 3):
        images = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            reference = task(images)
        torch.testing.assert_close(onnx_logits(output / "model.onnx", images), reference, atol=1e-4, rtol=0)

    assert main(["export", str(checkpoint_path), str(output), "--format", "pt2"]) == 2
    assert "holds an earlier export; pass --overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in output.iterdir()) == ["deployment.json", "export_manifest.json", "model.onnx"]

    run_folder = checkpoint_path.parents[1]  # --overwrite never replaces a folder holding checkpoints
    before = sorted(path.relative_to(run_folder) for path in run_folder.rglob("*"))
    assert main(["export", str(checkpoint_path), str(run_folder), "--format", "onnx", "--overwrite"]) == 2
    assert "is not an earlier export" in capsys.readouterr().err
    assert sorted(path.relative_to(run_folder) for path in run_folder.rglob("*")) == before

    assert main(["export", str(checkpoint_path), str(output), "--format", "pt2", "--overwrite"]) == 0
    assert sorted(p.name for p in output.iterdir()) == ["deployment.json", "export_manifest.json", "model.pt2"]
    assert json.loads((output / "deployment.json").read_text())["format"] == "pt2"
    program = torch.export.load(output / "model.pt2").module()
    with torch.no_grad():
        torch.testing.assert_close(program(images), reference, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_cli_exports_a_trained_segmentation_checkpoint_to_onnx(ade20k_folder: Path, tmp_path: Path) -> None:
    recipe = Path(__file__).parents[1] / "recipes" / "quickstart_segmentation.yaml"
    small = ["--model.backbone_args={'depths': [1, 1, 1, 1]}", "--model.decode_channels=16", "--model.aux_channels=8"]
    main(["fit", f"--config={recipe}", *small_segmentation_args(tmp_path / "run", ade20k_folder), *small])
    (checkpoint_path,) = (tmp_path / "run").glob("lightning_logs/version_0/checkpoints/last.ckpt")
    output = tmp_path / "deploy"

    assert main(["export", str(checkpoint_path), str(output), "--format", "onnx"]) == 0
    config = json.loads((output / "deployment.json").read_text())
    task = task_from_checkpoint(read_task_checkpoint(checkpoint_path))
    classes = task.hparams.num_classes
    assert config["input"]["shape"] == ["batch", 3, 32, 32]
    assert config["output"] == {"name": "logits", "shape": ["batch", classes, 32, 32]}
    assert config["pipeline_tag"] == "image-segmentation" and len(config["label_names"]) == classes
    torch.manual_seed(0)
    for batch in (1, 3):
        images = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            reference = task(images)
        torch.testing.assert_close(onnx_logits(output / "model.onnx", images), reference, atol=1e-4, rtol=0)
