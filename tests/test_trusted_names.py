"""Names read from files resolve only against our models, timm's models and what user code allowed."""

import json
import sys
import threading
from pathlib import Path

import pytest
import timm
from lightning.pytorch import LightningModule
from torch import nn

from mambaout_pl.models import (
    MambaOut,
    UnknownModelError,
    UntrustedNameError,
    UperNetSegmentor,
    allow_import_path,
    create_model,
    from_pretrained,
    registry,
    resolve_model,
    resolve_trusted_class,
    untrusted_source,
)
from mambaout_pl.tasks import ClassificationTask

TINY = dict(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8))


class UserNet(nn.Module):
    def __init__(self, width: int = 2):
        super().__init__()
        self.fc = nn.Linear(width, 1)


def make_user_net(width: int = 2) -> nn.Module:
    return UserNet(width)


@pytest.fixture(autouse=True)
def isolated_allow_list(monkeypatch):
    monkeypatch.setattr(registry, "_ALLOWED_PATHS", set())


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "ran"


def payloads(marker: Path) -> dict[str, tuple[str, dict]]:
    return {
        "os.system": ("os.system", {"command": f"touch {marker}"}),
        "subprocess.check_output": ("subprocess.check_output", {"args": ["touch", str(marker)]}),
        "builtins.eval": ("builtins.eval", {"source": f"open({str(marker)!r}, 'w')"}),
        "nested backbone": (
            "mambaout_pl.models.segmentor.UperNetSegmentor",
            {"backbone": "os.system", "backbone_args": {"command": f"touch {marker}"}, "num_classes": 2},
        ),
    }


@pytest.mark.parametrize("payload", ["os.system", "subprocess.check_output", "builtins.eval", "nested backbone"])
def test_payloads_are_refused_from_files_and_nothing_runs(payload, marker):
    name, kwargs = payloads(marker)[payload]
    with untrusted_source("config.json of hf-hub:x/y"):
        with pytest.raises(UntrustedNameError) as excinfo:
            create_model(name, **kwargs)
    message = str(excinfo.value)
    refused = "os.system" if payload == "nested backbone" else name
    assert f"'{refused}'" in message and "config.json of hf-hub:x/y" in message
    assert f"allow_import_path('{refused}')" in message
    assert isinstance(excinfo.value, ValueError)
    assert not marker.exists()


def test_the_payload_is_live_in_trusted_code(marker):
    # the user's own code may name any import path: this is why names from files must not reach it
    assert create_model("os.system", command=f"touch {marker}") == 0
    assert marker.exists()


def test_a_module_named_by_a_file_is_never_imported(tmp_path, marker, monkeypatch):
    (tmp_path / "evil_module.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Net:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with (
        untrusted_source("a checkpoint"),
        pytest.raises(UntrustedNameError, match="'evil_module.Net' from a checkpoint"),
    ):
        create_model("evil_module.Net")
    assert "evil_module" not in sys.modules and not marker.exists()


def test_from_pretrained_refuses_nested_names_in_config_json(tmp_path, marker):
    name, kwargs = payloads(marker)["nested backbone"]
    (tmp_path / "config.json").write_text(json.dumps({"model_name": name, "model_args": kwargs}))
    with pytest.raises(UntrustedNameError, match="config.json"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps({"model_name": "os.system", "model_args": {"command": f"touch {marker}"}})
    )
    with pytest.raises(UntrustedNameError, match="'os.system'"):
        from_pretrained(tmp_path)
    assert not marker.exists()


def test_segmentor_from_pretrained_refuses_a_foreign_backbone(tmp_path, marker):
    (tmp_path / "config.json").write_text(
        json.dumps({"backbone": "os.system", "backbone_args": {"command": f"touch {marker}"}})
    )
    with pytest.raises(UntrustedNameError, match="'os.system'"):
        UperNetSegmentor.from_pretrained(tmp_path)
    assert not marker.exists()


def test_untrusted_mode_still_builds_our_timm_and_package_models():
    with untrusted_source("a checkpoint"):
        assert isinstance(create_model("mambaout_femto", num_classes=3), MambaOut)
        assert isinstance(create_model("resnet18.a1_in1k", num_classes=3), timm.models.ResNet)
        assert isinstance(create_model("mambaout_pl.models.mambaout.MambaOut", **TINY), MambaOut)
        assert isinstance(create_model("mambaout_pl.models.mambaout.mambaout_femto"), MambaOut)  # a registered function
        segmentor = create_model("mambaout_pl.models.UperNetSegmentor", backbone="mambaout_femto", num_classes=2)
        assert isinstance(segmentor, UperNetSegmentor)
        assert resolve_model("resnet18").kind == "timm"
        with pytest.raises(UnknownModelError, match="mambaout_femto"):
            create_model("mambaout_fento")
        with pytest.raises(UntrustedNameError, match="'hf-hub:x/y'.*only when your own code names it"):
            create_model("hf-hub:x/y")
        with pytest.raises(UntrustedNameError):  # ours, but a function that is not a registered model
            create_model("mambaout_pl.models.weights.read_state_dict", path="x")


def test_user_class_paths_work_in_trusted_mode_and_once_allowed():
    path, function_path = f"{__name__}.UserNet", f"{__name__}.make_user_net"
    assert isinstance(create_model(path, width=3), UserNet)
    assert isinstance(create_model(function_path), UserNet)
    with untrusted_source("a checkpoint"):
        with pytest.raises(UntrustedNameError, match=rf"allow_import_path\('{path}'\)"):
            create_model(path, width=3)
    allow_import_path(path)
    with untrusted_source("a checkpoint"):
        assert create_model(path, width=3).fc.in_features == 3
        with pytest.raises(UntrustedNameError):
            create_model(function_path)
    allow_import_path(__name__)  # a module: its model classes, not its functions
    with untrusted_source("a checkpoint"):
        with pytest.raises(UntrustedNameError, match="is not a subclass of torch.nn.modules.module.Module"):
            create_model(function_path)
    allow_import_path(function_path)
    with untrusted_source("a checkpoint"):
        assert isinstance(create_model(function_path), UserNet)
    with pytest.raises(ValueError, match="dotted import path"):
        allow_import_path("hf-hub:x/y")


def test_trust_mode_covers_nested_calls_and_ends_with_the_block():
    seen = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            seen.append(registry._UNTRUSTED_SOURCE.get())

    registry.register_model("probe_net")(Probe)
    try:
        with untrusted_source("outer"):
            create_model("probe_net")
            with untrusted_source("inner"):
                create_model("probe_net")
            create_model("probe_net")
        create_model("probe_net")
        thread_seen = []
        with untrusted_source("main thread"):
            thread = threading.Thread(target=lambda: thread_seen.append(registry._UNTRUSTED_SOURCE.get()))
            thread.start()
            thread.join()
    finally:
        registry._MODELS.pop("probe_net")
    assert seen == ["outer", "inner", "outer", None]
    assert thread_seen == [None]  # a new thread starts in the default context
    assert isinstance(create_model("torch.nn.Linear", in_features=2, out_features=1), nn.Linear)


def test_resolve_trusted_class_for_other_kinds_of_class_paths(marker):
    assert resolve_trusted_class("mambaout_pl.tasks.ClassificationTask", base=LightningModule) is ClassificationTask
    source = "checkpoint 'x.ckpt'"
    for path, match in [
        ("os.system", "Refusing 'os.system' from checkpoint 'x.ckpt'"),
        ("collections.OrderedDict", "Refusing 'collections.OrderedDict'"),
        ("mambaout_pl.models.weights.read_state_dict", "is not a subclass of"),
        ("mambaout_pl.models.MambaOut", "is not a subclass of lightning.pytorch.core.module.LightningModule"),
        (
            "mambaout_pl.models.mambaout.LayerNorm",
            "Refusing 'timm.layers.norm.LayerNorm'",
        ),  # re-exported, defined in timm
    ]:
        with pytest.raises(UntrustedNameError, match=match):
            resolve_trusted_class(path, base=LightningModule if "Layer" not in path else nn.Module, source=source)
    allow_import_path(__name__)
    assert resolve_trusted_class(f"{__name__}.UserNet", base=nn.Module, source=source) is UserNet
    with pytest.raises(UntrustedNameError, match="is not a subclass"):
        resolve_trusted_class(f"{__name__}.UserNet", base=LightningModule, source=source)
    assert not marker.exists()
