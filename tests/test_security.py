"""Loading a file never runs code it names: payloads through every loading entry point.

Each payload, if it ran, would create ``marker``: a shell command (``os.system``), a process
(``subprocess.check_output``), Python source (``builtins.exec``), or a module of the attacker's
that does so when imported (``evil_module``, written to ``tmp_path`` and put on ``sys.path``, as
if installed). Entry points: export folders (ours and timm's format), ``hf-hub:`` repos, and task
checkpoints through ``mambaout export``, ``validate`` / ``test`` ``--ckpt_path`` and a resumed
``fit``. Every refusal names the value, the file and how to allow it; nothing runs. Recipes and
command lines are the user's own: the class paths they give keep working.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import cpu_trainer_args
from helpers import tiny_fit_args as fit_args

from mambaout_pl.cli import main, run_cli
from mambaout_pl.errors import CheckpointMismatchError
from mambaout_pl.models import (
    RCNNDetector,
    UnknownModelError,
    UntrustedNameError,
    UperNetSegmentor,
    from_pretrained,
    registry,
)

ROOT = Path(__file__).parents[1]
RECIPE = ROOT / "recipes" / "quickstart.yaml"
PAYLOADS = ("os.system", "subprocess.check_output", "builtins.exec", "evil_module.Net")

USER_MODULE = '''
from torch import nn


class UserNet(nn.Module):
    """A user's own network, named by class path in their recipe."""

    def __init__(self, num_classes=3, drop_path_rate=0.0, drop_rate=0.0, width=4):
        super().__init__()
        self.body = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, width), nn.ReLU())
        self.head = nn.Linear(width, num_classes)

    def forward(self, images):
        return self.head(self.body(images))
'''


@pytest.fixture(autouse=True)
def isolated_allow_list(monkeypatch):
    monkeypatch.setattr(registry, "_ALLOWED_PATHS", set())


@pytest.fixture
def marker(tmp_path: Path, monkeypatch) -> Path:
    """The file a payload creates if it runs; ``evil_module`` (on ``sys.path``) creates it when imported."""
    marker = tmp_path / "payload_ran"
    modules = tmp_path / "site"
    modules.mkdir()
    (modules / "evil_module.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n\n\nclass Net:\n    pass\n\n\nclass Task:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(modules))
    yield marker
    sys.modules.pop("evil_module", None)


def payload(name: str, marker: Path) -> tuple[str, dict]:
    """A model name and the keyword arguments that make it create ``marker``."""
    return {
        "os.system": ("os.system", {"command": f"touch {marker}"}),
        "subprocess.check_output": ("subprocess.check_output", {"args": ["touch", str(marker)]}),
        "builtins.exec": ("builtins.exec", {"source": f"open({str(marker)!r}, 'w').close()"}),
        "evil_module.Net": ("evil_module.Net", {}),
    }[name]


def assert_refused(message: str, value: str, source: str) -> None:
    """The refusal names the value, the file, and how to allow the value in one's own code."""
    assert f"Refusing '{value}' from " in message, message
    assert source in message, message
    assert f"allow_import_path('{value}')" in message, message


# ---------------------------------------------------------------------------------------------
# export folders and hf-hub repos


def write_export_folder(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("where", ["model_name", "nested backbone"])
@pytest.mark.parametrize("name", PAYLOADS)
def test_export_folder_names_run_nothing(name: str, where: str, marker: Path, tmp_path: Path) -> None:
    value, kwargs = payload(name, marker)
    if where == "model_name":
        config = {"model_name": value, "model_args": kwargs}
    else:
        config = {
            "model_name": "mambaout_pl.models.UperNetSegmentor",
            "model_args": {"backbone": value, "backbone_args": kwargs, "num_classes": 2},
        }
    folder = write_export_folder(tmp_path / "export", config)
    with pytest.raises(UntrustedNameError) as raised:
        from_pretrained(folder)
    assert_refused(str(raised.value), value, f"'{folder / 'config.json'}'")
    assert not marker.exists() and "evil_module" not in sys.modules


def test_hub_repo_names_run_nothing(marker: Path, tmp_path: Path, monkeypatch) -> None:
    # The Hub cannot be reached from the tests: huggingface_hub's download functions are replaced at
    # that boundary by ones that return a local snapshot folder, as a download would.
    snapshot = write_export_folder(
        tmp_path / "snapshot",
        {
            "model_name": "mambaout_pl.models.UperNetSegmentor",
            "model_args": {"backbone": "evil_module.Net", "num_classes": 2},
        },
    )
    requested = []

    def snapshot_download(repo_id: str, revision=None, allow_patterns=None, **kwargs) -> str:
        requested.append((repo_id, revision, tuple(allow_patterns or ())))
        return str(snapshot)

    def hf_hub_download(repo_id: str, filename: str, **kwargs) -> str:
        requested.append((repo_id, filename))
        return str(snapshot / filename)

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    monkeypatch.setattr("huggingface_hub.hub_mixin.hf_hub_download", hf_hub_download)
    with pytest.raises(UntrustedNameError) as raised:
        from_pretrained("hf-hub:attacker/repo@main")
    assert_refused(str(raised.value), "evil_module.Net", f"'{snapshot / 'config.json'}' (of hf-hub:attacker/repo@main)")
    assert requested == [("attacker/repo", "main", ("*.safetensors", "*.json", "*.md"))]  # no pickle is fetched
    (snapshot / "config.json").write_text(
        json.dumps({"backbone": "os.system", "backbone_args": {"command": f"touch {marker}"}})
    )
    with pytest.raises(UntrustedNameError, match="Refusing 'os.system'"):
        UperNetSegmentor.from_pretrained("attacker/repo")
    assert not marker.exists() and "evil_module" not in sys.modules


@pytest.mark.parametrize("network", [UperNetSegmentor, RCNNDetector], ids=lambda network: network.__name__)
@pytest.mark.parametrize("name", PAYLOADS)
def test_saved_dense_network_backbone_names_run_nothing(network, name: str, marker: Path, tmp_path: Path) -> None:
    # The config.json of `save_pretrained`: the constructor arguments themselves, the backbone by name.
    value, kwargs = payload(name, marker)
    folder = write_export_folder(tmp_path / "saved", {"backbone": value, "backbone_args": kwargs, "num_classes": 2})
    with pytest.raises(UntrustedNameError) as raised:
        network.from_pretrained(folder)
    assert_refused(str(raised.value), value, f"the config.json of '{folder}'")
    assert not marker.exists() and "evil_module" not in sys.modules


def test_timm_format_folder_builds_only_timm_models(marker: Path, tmp_path: Path) -> None:
    folder = write_export_folder(tmp_path / "export", {"architecture": "evil_module.Net", "model_args": {}})
    with pytest.raises(
        UnknownModelError, match=r"config\.json' names architecture 'evil_module\.Net', which is not a timm model"
    ):
        from_pretrained(folder)
    assert not marker.exists() and "evil_module" not in sys.modules


# ---------------------------------------------------------------------------------------------
# task checkpoints: export, validate / test, resume


def eval_args(command: str, root: Path, images: Path, checkpoint: Path, *extra: str) -> list[str]:
    return [
        command,
        f"--config={RECIPE}",
        *cpu_trainer_args(root),
        "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1",
        "--data.path=imagefolder",
        f"--data.data_dir={images}",
        "--data.test_split=validation",
        "--data.image_size=32",
        "--data.batch_size=2",
        "--data.num_workers=0",
        f"--ckpt_path={checkpoint}",
        *extra,
    ]


@pytest.fixture(scope="module")
def checkpoint(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real classification checkpoint of one training step."""
    root = tmp_path_factory.mktemp("fit")
    run_cli(fit_args(root, images))
    return root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"


def tampered(checkpoint: Path, folder: Path, task: str | None = None, **hparams) -> Path:
    """A copy of ``checkpoint`` whose recorded task or hyper-parameters an attacker changed."""
    content = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if task is not None:
        content["mambaout_pl"]["task"] = task
        content["hyper_parameters"]["_class_path"] = task
    content["hyper_parameters"].update(hparams)
    path = folder / "tampered.ckpt"
    torch.save(content, path)
    return path


CHECKPOINT_PAYLOADS = {
    "task class": ({"task": "evil_module.Task"}, "evil_module.Task"),
    "task function": ({"task": "os.system"}, "os.system"),
    "backbone": ({"backbone": "evil_module.Net"}, "evil_module.Net"),
    "backbone command": ({"backbone": "os.system", "backbone_args": {"command": "touch {marker}"}}, "os.system"),
    "nested class_path": (
        {"backbone_args": {"depths": [1, 1, 1, 1], "extra": {"class_path": "evil_module.Net"}}},
        "evil_module.Net",
    ),
}


def build_payload(case: str, checkpoint: Path, folder: Path, marker: Path) -> tuple[Path, str]:
    changes, value = CHECKPOINT_PAYLOADS[case]
    changes = json.loads(json.dumps(changes).replace("{marker}", str(marker)))
    return tampered(checkpoint, folder, **changes), value


@pytest.mark.parametrize("case", list(CHECKPOINT_PAYLOADS))
def test_mambaout_export_runs_nothing_a_checkpoint_names(
    case: str, checkpoint: Path, marker: Path, tmp_path: Path, capsys
) -> None:
    path, value = build_payload(case, checkpoint, tmp_path, marker)
    target = tmp_path / "export"
    code = main(["export", str(path), str(target)])
    message = capsys.readouterr().err
    if case == "nested class_path":  # no parser reads it: it reaches the network as an unknown argument
        assert code == 2 and f"settings saved in '{path}' do not build" in message and "'extra'" in message
    else:
        assert code == 2
        assert_refused(message, value, f"checkpoint '{path}'")
        assert f"--allow-import-path {value}" in message
    assert not target.exists() and not marker.exists() and "evil_module" not in sys.modules


@pytest.mark.parametrize("case", list(CHECKPOINT_PAYLOADS))
def test_validate_runs_nothing_a_checkpoint_names(
    case: str, images: Path, checkpoint: Path, marker: Path, tmp_path: Path
) -> None:
    path, value = build_payload(case, checkpoint, tmp_path, marker)
    root = tmp_path / "runs"
    with pytest.raises(ValueError) as raised:  # UntrustedNameError, or the parser's error quoting it
        run_cli(eval_args("validate", root, images, path))
    assert_refused(str(raised.value), value, f"checkpoint '{path}'")
    assert not marker.exists() and "evil_module" not in sys.modules
    assert not list(root.rglob("*.ckpt"))


def test_test_subcommand_refuses_the_same_way(images: Path, checkpoint: Path, marker: Path, tmp_path: Path) -> None:
    path, value = build_payload("task class", checkpoint, tmp_path, marker)
    with pytest.raises(UntrustedNameError) as raised:
        run_cli(eval_args("test", tmp_path / "runs", images, path))
    assert_refused(str(raised.value), value, f"checkpoint '{path}'")
    assert not marker.exists() and "evil_module" not in sys.modules


def test_resuming_fit_imports_nothing_from_the_checkpoint(
    images: Path, checkpoint: Path, marker: Path, tmp_path: Path
) -> None:
    path = tampered(checkpoint, tmp_path, task="evil_module.Task", backbone="evil_module.Net")
    with pytest.raises(CheckpointMismatchError, match=r"tampered\.ckpt' was written by evil_module\.Task"):
        run_cli(fit_args(tmp_path / "runs", images, f"--ckpt_path={path}"))
    assert not marker.exists() and "evil_module" not in sys.modules


# ---------------------------------------------------------------------------------------------
# the user's own recipe and command line


def test_a_class_path_from_the_users_own_recipe_keeps_working(images: Path, tmp_path: Path, monkeypatch) -> None:
    modules = tmp_path / "user_site"
    modules.mkdir()
    (modules / "user_nets.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(modules))
    try:
        root = tmp_path / "runs"
        recipe = ["--model.backbone=user_nets.UserNet", '--model.backbone_args={"width": 5}']
        fit = run_cli([*fit_args(root, images), *recipe])
        assert type(fit.model.model).__name__ == "UserNet"
        checkpoint = root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
        # the same recipe validates its checkpoint: the checkpoint repeats the user's own class path
        validated = run_cli(eval_args("validate", root, images, checkpoint, *recipe))
        assert type(validated.model.model).__name__ == "UserNet" and validated.model.model.head.in_features == 5
        assert "val/loss" in validated.trainer.callback_metrics
        # another recipe taking its model settings from that checkpoint: the class path is the file's
        with pytest.raises(ValueError) as raised:
            run_cli(eval_args("validate", root, images, checkpoint))
        assert_refused(str(raised.value), "user_nets.UserNet", f"checkpoint '{checkpoint}'")
        # ... until the user allows it in their own code
        registry.allow_import_path("user_nets")
        assert type(run_cli(eval_args("validate", root, images, checkpoint)).model.model).__name__ == "UserNet"
    finally:
        sys.modules.pop("user_nets", None)
