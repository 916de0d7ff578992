"""Loading checkpoint files: timm state dicts, the official MambaOut release, and bad files."""

import argparse
import re

import pytest
import timm
import torch
from safetensors.torch import save_file

from mambaout_pl.models import (
    CheckpointError,
    CheckpointMismatchError,
    UnsafeCheckpointError,
    create_model,
    load_pretrained,
)


def to_official_names(state_dict: dict) -> dict:
    """Rename timm's MambaOut keys to the official release's (`yuweihao/MambaOut`).

    The inverse of the mapping `load_pretrained` applies:
      stem.*                    -> downsample_layers.0.*
      stages.N.downsample.*     -> downsample_layers.N.*
      stages.N.blocks.M.*       -> stages.N.M.*
      head.norm.*               -> norm.*            (the norm after pooling)
      head.pre_logits.fc.*      -> head.fc1.*
      head.pre_logits.norm.*    -> head.norm.*
      head.fc.*                 -> head.fc2.*
    """
    renames = (
        (r"^stem\.", "downsample_layers.0."),
        (r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1."),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2."),
        (r"^head\.norm\.", "norm."),
        (r"^head\.pre_logits\.fc\.", "head.fc1."),
        (r"^head\.pre_logits\.norm\.", "head.norm."),
        (r"^head\.fc\.", "head.fc2."),
    )
    official = {}
    for key, value in state_dict.items():
        for pattern, replacement in renames:
            new_key, count = re.subn(pattern, replacement, key)
            if count:
                key = new_key
                break
        official[key] = value
    return official


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return timm.create_model("mambaout_femto", pretrained=False).eval()


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(2, 3, 64, 64)


@pytest.fixture
def timm_file(tmp_path, reference):
    path = tmp_path / "mambaout_femto.pth"
    torch.save(reference.state_dict(), path)
    return path


def fresh_femto(**kwargs):
    torch.manual_seed(123)
    return create_model("mambaout_femto", **kwargs).eval()


def assert_same_outputs(model, reference, images):
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), atol=1e-5, rtol=0)


def test_load_timm_pth(timm_file, reference, images):
    model = load_pretrained(fresh_femto(), timm_file)
    assert_same_outputs(model, reference, images)


def test_load_timm_safetensors(tmp_path, reference, images):
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    assert_same_outputs(load_pretrained(fresh_femto(), path), reference, images)
    assert_same_outputs(load_pretrained(fresh_femto(), tmp_path), reference, images)  # a folder holding it


def test_load_training_checkpoint_bin(tmp_path, reference, images):
    path = tmp_path / "pytorch_model.bin"
    wrapped = {f"module.{k}": v for k, v in reference.state_dict().items()}
    torch.save({"state_dict": wrapped, "epoch": 3, "args": argparse.Namespace(lr=0.1)}, path)
    assert_same_outputs(load_pretrained(fresh_femto(), path), reference, images)


def test_load_official_checkpoint(tmp_path, reference, images):
    official = to_official_names(reference.state_dict())
    assert "downsample_layers.0.conv1.weight" in official
    assert "downsample_layers.1.conv.weight" in official
    assert "stages.2.8.conv.weight" in official
    assert {"norm.weight", "head.fc1.weight", "head.norm.weight", "head.fc2.weight"} <= official.keys()

    path = tmp_path / "mambaout_femto_official.pth"
    torch.save({"model": official, "epoch": 300}, path)
    assert_same_outputs(load_pretrained(fresh_femto(), path), reference, images)


def test_create_model_with_pretrained(timm_file, reference, images):
    torch.manual_seed(5)
    model = create_model("mambaout_femto", pretrained=str(timm_file)).eval()
    assert_same_outputs(model, reference, images)


def test_class_count_mismatch_keeps_fresh_classifier(timm_file, reference):
    model = fresh_femto(num_classes=10)
    fresh_fc = model.head.fc.weight.detach().clone()
    with pytest.warns(UserWarning, match="holds a 1000-class classifier and the model a 10-class classifier") as record:
        load_pretrained(model, timm_file)
    assert "head.fc.weight" in str(record[0].message)

    reference_state = reference.state_dict()
    for key, value in model.state_dict().items():
        if key.startswith("head.fc."):
            continue
        torch.testing.assert_close(value, reference_state[key], atol=0, rtol=0, msg=key)
    assert model.head.fc.weight.shape == (10, model.head_hidden_size)
    torch.testing.assert_close(model.head.fc.weight, fresh_fc, atol=0, rtol=0)


def test_headless_model_loads_classifier_checkpoint(timm_file, reference, images):
    model = fresh_femto(num_classes=0)
    with pytest.warns(UserWarning, match="classifier"):
        load_pretrained(model, timm_file)
    with torch.no_grad():
        torch.testing.assert_close(
            model(images), reference.forward_head(reference.forward_features(images), pre_logits=True)
        )


def test_generic_timm_model_class_mismatch(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)

    model = create_model("resnet18", num_classes=5)
    with pytest.warns(UserWarning, match="fc.weight"):
        load_pretrained(model, path)
    torch.testing.assert_close(model.conv1.weight, source.conv1.weight, atol=0, rtol=0)
    assert model.fc.weight.shape == (5, 512)


def test_mismatched_keys_raise_clear_error(timm_file):
    model = create_model("mambaout_kobe")
    with pytest.raises(CheckpointMismatchError) as excinfo:
        load_pretrained(model, timm_file)
    message = str(excinfo.value)
    assert str(timm_file) in message
    assert "missing" in message and "stages.2.blocks.9" in message
    assert "strict=False" in message


def test_mismatched_shapes_raise_clear_error(timm_file):
    with pytest.raises(CheckpointMismatchError, match=r"stem\.conv1\.weight: file \[24, 3, 3, 3\] vs model"):
        load_pretrained(create_model("mambaout_tiny"), timm_file)


def test_non_strict_loads_matching_tensors(timm_file, reference):
    model = create_model("mambaout_kobe")
    with pytest.warns(UserWarning, match="partially"):
        load_pretrained(model, timm_file, strict=False)
    torch.testing.assert_close(
        model.stages[2].blocks[0].fc1.weight, reference.stages[2].blocks[0].fc1.weight, atol=0, rtol=0
    )


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_pretrained(fresh_femto(), path)


SIDE_EFFECTS = []


def record_side_effect(tag):
    SIDE_EFFECTS.append(tag)
    return tag


class Payload:
    """Unpickling this would call `record_side_effect`, standing in for arbitrary code."""

    def __reduce__(self):
        return record_side_effect, ("unpickled",)


def test_refuses_pickled_objects(tmp_path, reference):
    path = tmp_path / "unsafe.pth"
    torch.save({"model": reference.state_dict(), "payload": Payload()}, path)
    with pytest.raises(UnsafeCheckpointError, match="unsafe.pth") as excinfo:
        load_pretrained(fresh_femto(), path)
    assert "weights_only" in str(excinfo.value)
    assert isinstance(excinfo.value, CheckpointError)
    assert SIDE_EFFECTS == []


@pytest.mark.parametrize("content", [[1, 2, 3], {"epoch": 3, "name": "femto"}, {}])
def test_rejects_files_without_state_dict(tmp_path, content):
    path = tmp_path / "not_weights.pth"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        load_pretrained(fresh_femto(), path)


def test_rejects_unreadable_files(tmp_path):
    for name in ("garbage.pth", "garbage.safetensors"):
        path = tmp_path / name
        path.write_bytes(b"not a checkpoint")
        with pytest.raises(CheckpointError, match=name) as excinfo:
            load_pretrained(fresh_femto(), path)
        assert not isinstance(excinfo.value, UnsafeCheckpointError)


def test_official_checkpoint_into_grayscale_model(tmp_path, reference, images):
    """The stem of RGB weights is summed for `in_chans=1`: a gray image gives the RGB model's logits."""
    path = tmp_path / "mambaout_femto_official.pth"
    torch.save({"model": to_official_names(reference.state_dict())}, path)
    model = load_pretrained(fresh_femto(in_chans=1), path)
    gray = images[:, :1]
    with torch.no_grad():
        torch.testing.assert_close(model(gray), reference(gray.expand(-1, 3, -1, -1)), atol=1e-4, rtol=0)


def test_generic_timm_model_in_chans(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = create_model("resnet18", in_chans=4, pretrained=str(path))
    expected = timm.models.adapt_input_conv(4, source.conv1.weight.detach())
    torch.testing.assert_close(model.conv1.weight, expected, atol=0, rtol=0)
