"""Export, push and load back: exact round trips through local folders; the upload at HfApi's boundary."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import timm
import torch
import yaml
from helpers import small_run_args
from lightning.pytorch import Trainer
from safetensors.torch import load_file

from mambaout_pl.cli import main
from mambaout_pl.export import ExportSpec, hub
from mambaout_pl.hub import ExportError, export_checkpoint, push_checkpoint
from mambaout_pl.models import create_model, from_pretrained, registry
from mambaout_pl.tasks import BaseTask, ClassificationTask

QUICKSTART = Path(__file__).parents[1] / "recipes" / "quickstart.yaml"
TINY_MAMBAOUT = '{"depths": [1, 1, 1, 1], "dims": [16, 24, 32, 40]}'


def fit_checkpoint(root: Path, image_folder: Path, *overrides: str) -> Path:
    """Train the quick-start recipe for two steps on the generated images; the last checkpoint's path."""
    main(["fit", f"--config={QUICKSTART}", *small_run_args(root, image_folder), *overrides])
    (checkpoint,) = root.glob("lightning_logs/version_0/checkpoints/last.ckpt")
    return checkpoint


def task_logits(checkpoint_path: Path, images: torch.Tensor, backbone: str, **kwargs) -> torch.Tensor:
    """Logits of the task as trained, rebuilt by hand from the checkpoint's state dict."""
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    task = ClassificationTask(backbone=backbone, num_classes=3, **kwargs)
    task.load_state_dict(checkpoint["state_dict"])
    with torch.no_grad():
        return task.eval()(images)


def test_classifier_exports_in_timm_format_with_ema_weights(image_folder: Path, tmp_path: Path) -> None:
    checkpoint_path = fit_checkpoint(tmp_path / "run", image_folder, "--model.ema_decay=0.5")
    export = export_checkpoint(checkpoint_path, tmp_path / "export")

    assert sorted(p.name for p in export.iterdir()) == [
        "README.md",
        "config.json",
        "export_manifest.json",
        "model.safetensors",
    ]
    config = json.loads((export / "config.json").read_text())
    assert config["architecture"] == "mambaout_femto"
    assert config["num_classes"] == 3
    assert config["label_names"] == ["cat", "dog", "fish"]
    assert config["pretrained_cfg"]["input_size"] == [3, 64, 64]
    assert config["pretrained_cfg"]["interpolation"] == "bilinear"

    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    exported = load_file(export / "model.safetensors")
    ema = checkpoint["state_dict"]["model.stem.conv1.weight"]
    assert torch.equal(exported["stem.conv1.weight"], ema)
    assert not torch.equal(ema, checkpoint["current_model_state"]["model.stem.conv1.weight"])

    images = torch.randn(2, 3, 64, 64)
    timm_model = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
    with torch.no_grad():
        timm_logits = timm_model(images)
    # timm's plain block and our fused one compute the same function; float sums may differ in order
    torch.testing.assert_close(timm_logits, task_logits(checkpoint_path, images, "mambaout_femto"), atol=1e-5, rtol=0)
    assert timm_model.pretrained_cfg["label_names"] == ["cat", "dog", "fish"]

    card = (export / "README.md").read_text()
    front_matter = yaml.safe_load(card.split("---")[1])
    assert front_matter["library_name"] == "timm"
    assert "mambaout" in front_matter["tags"] and front_matter["metrics"] == ["accuracy"]
    assert "val/top1" in card and "hf-hub:USER/REPO" in card and "yu2025mambaout" in card
    assert "backbone: mambaout_femto" in card  # the saved recipe
    # Links only to pages that exist: the paper, timm's documentation, timm's weights of the architecture.
    assert card_links(card) == {
        "https://arxiv.org/abs/2405.07992",
        "https://huggingface.co/docs/timm",
        "https://huggingface.co/timm/mambaout_femto.in1k",
    }


def card_links(card: str) -> set[str]:
    """Every web address in a model card."""
    return set(re.findall(r"https?://[^\s)>\]`'\"]+", card))


def test_network_timm_cannot_build_exports_in_our_format_and_loads_strictly(image_folder: Path, tmp_path: Path) -> None:
    backbone = "mambaout_pl.models.mambaout.MambaOut"
    checkpoint_path = fit_checkpoint(
        tmp_path / "run", image_folder, f"--model.backbone={backbone}", f"--model.backbone_args={TINY_MAMBAOUT}"
    )
    assert main(["export", str(checkpoint_path), str(tmp_path / "export")]) == 0

    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["library_name"] == "mambaout-pl"
    assert config["model_name"] == backbone
    assert config["model_args"] == {"num_classes": 3, "depths": [1, 1, 1, 1], "dims": [16, 24, 32, 40]}
    images = torch.randn(2, 3, 64, 64)
    model = from_pretrained(tmp_path / "export")
    with torch.no_grad():
        logits = model(images)
    expected = task_logits(checkpoint_path, images, backbone, backbone_args=json.loads(TINY_MAMBAOUT))
    assert torch.equal(logits, expected)
    assert card_links((tmp_path / "export" / "README.md").read_text()) == {"https://arxiv.org/abs/2405.07992"}


def test_pretrained_accepts_an_export_folder_and_a_hub_id(image_folder: Path, tmp_path: Path, monkeypatch) -> None:
    checkpoint_path = fit_checkpoint(tmp_path / "run", image_folder)
    export = export_checkpoint(checkpoint_path, tmp_path / "export")
    images = torch.randn(1, 3, 64, 64)
    expected = task_logits(checkpoint_path, images, "mambaout_femto")

    from_folder = create_model("mambaout_femto", num_classes=3, pretrained=str(export)).eval()
    # The Hub's servers cannot be reached here: the download is replaced by the local export folder.
    downloads = []
    monkeypatch.setattr(
        "huggingface_hub.snapshot_download",
        lambda repo_id, **kwargs: downloads.append((repo_id, kwargs)) or str(export),
    )
    from_hub = ClassificationTask(backbone="mambaout_femto", num_classes=3, pretrained="hf-hub:user/digits@v1")
    with torch.no_grad():
        assert torch.equal(from_folder(images), expected)
        assert torch.equal(from_hub.eval()(images), expected)
    ((repo_id, kwargs),) = downloads
    assert repo_id == "user/digits" and kwargs["revision"] == "v1"
    assert "*.bin" not in kwargs["allow_patterns"] and "*.safetensors" in kwargs["allow_patterns"]


def test_export_refuses_a_checkpoint_that_is_not_a_task(tmp_path: Path, capsys) -> None:
    weights = tmp_path / "weights.pth"
    torch.save(create_model("mambaout_femto", num_classes=3).state_dict(), weights)
    assert main(["export", str(weights), str(tmp_path / "export")]) == 2
    assert "weights.pth' is not a training checkpoint: it has no 'state_dict'" in capsys.readouterr().err
    assert not (tmp_path / "export").exists()


def test_export_keeps_an_existing_folder_and_never_half_writes(image_folder: Path, tmp_path: Path, monkeypatch) -> None:
    checkpoint_path = fit_checkpoint(tmp_path / "run", image_folder)
    target = tmp_path / "export"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(
            ExportError, match=r"not empty and is not an earlier export .* holds 1 entries \('notes.txt'\)"
        ):
            export_checkpoint(checkpoint_path, target, overwrite=overwrite)
    assert (target / "notes.txt").read_text() == "mine"
    (target / "notes.txt").unlink()
    export_checkpoint(checkpoint_path, target)
    with pytest.raises(ExportError, match="holds an earlier export; pass --overwrite"):
        export_checkpoint(checkpoint_path, target)
    earlier = {p.name: p.read_bytes() for p in target.iterdir()}

    def fail_midway(task, checkpoint, path, folder):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(hub, "write_export", fail_midway)
    with pytest.raises(OSError, match=f"Cannot write '{target}' \\(disk full\\)"):
        export_checkpoint(checkpoint_path, target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "run"]  # no staging folder left
    assert {p.name: p.read_bytes() for p in target.iterdir()} == earlier

    monkeypatch.undo()
    export_checkpoint(checkpoint_path, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == [
        "README.md",
        "config.json",
        "export_manifest.json",
        "model.safetensors",
    ]


class RecordingHfApi:
    """Test double of ``huggingface_hub.HfApi``: the Hub's servers cannot be reached here, so the
    calls are recorded (with the uploaded folder's files) instead of sent."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.calls: list[tuple[str, dict]] = []
        RecordingHfApi.last = self

    def create_repo(self, repo_id: str, **kwargs) -> None:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def create_branch(self, repo_id: str, **kwargs) -> None:
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, folder_path: str, **kwargs) -> str:
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        self.calls.append(("upload_folder", {"files": files, **kwargs}))
        return f"https://huggingface.co/{kwargs['repo_id']}/commit/0"


def test_push_creates_the_repo_and_uploads_the_export(image_folder: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    checkpoint_path = fit_checkpoint(tmp_path / "run", image_folder)
    secret = "hf_test_token_never_written"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setattr(hub, "HfApi", RecordingHfApi)

    code = main(
        [
            "push",
            str(checkpoint_path),
            "--repo-id",
            "user/digits",
            "--private",
            "--revision",
            "v1",
            "--commit-message",
            "first",
        ]
    )

    assert code == 0
    api = RecordingHfApi.last
    assert api.token == secret
    (create, branch, upload) = api.calls
    assert create == (
        "create_repo",
        {"repo_id": "user/digits", "private": True, "exist_ok": True, "repo_type": "model"},
    )
    assert branch[1]["branch"] == "v1"
    assert upload[1]["repo_id"] == "user/digits" and upload[1]["revision"] == "v1"
    assert upload[1]["commit_message"] == "first"
    assert sorted(upload[1]["files"]) == ["README.md", "config.json", "model.safetensors"]
    assert all(secret.encode() not in content for content in upload[1]["files"].values())
    output = capsys.readouterr()
    assert secret not in output.out + output.err
    assert "https://huggingface.co/user/digits/commit/0" in output.out


def test_push_at_the_end_of_fit_from_a_recipe_callback(image_folder: Path, tmp_path: Path, monkeypatch) -> None:
    secret = "hf_secret_token_of_the_recipe_test"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setattr(hub, "HfApi", RecordingHfApi)
    callback = '[{"class_path": "mambaout_pl.hub.PushToHubCallback", "init_args": {"repo_id": "user/quick"}}]'
    main(["fit", f"--config={QUICKSTART}", *small_run_args(tmp_path, image_folder), f"--trainer.callbacks={callback}"])
    upload = RecordingHfApi.last.calls[-1]
    assert upload[0] == "upload_folder" and upload[1]["repo_id"] == "user/quick"
    assert sorted(upload[1]["files"]) == ["README.md", "config.json", "model.safetensors"]
    assert RecordingHfApi.last.token == secret
    # The token reached the Hub client only: no config, hyper-parameter file, log or checkpoint holds it.
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert {path.suffix for path in written} >= {".yaml", ".ckpt"} and any("tfevents" in p.name for p in written)
    assert [path for path in written if secret.encode() in path.read_bytes()] == []


@pytest.mark.parametrize("repo_id", ["no-slash", "user/name/extra", "user/bad name"])
def test_push_rejects_a_malformed_repo_id(repo_id: str, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="malformed"):
        push_checkpoint(tmp_path / "missing.ckpt", repo_id, api=RecordingHfApi())


def test_push_without_a_token_says_how_to_log_in(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)  # and the tests' HF_HOME holds no stored token
    with pytest.raises(ExportError, match="No Hugging Face token found: set HF_TOKEN or run `hf auth login`"):
        push_checkpoint(tmp_path / "missing.ckpt", "user/name")


def test_segmentation_checkpoint_exports_in_our_format_and_loads_strictly(ade20k_folder: Path, tmp_path: Path) -> None:
    from helpers import small_segmentation_args

    recipe = Path(__file__).parents[1] / "recipes" / "quickstart_segmentation.yaml"
    main(["fit", f"--config={recipe}", *small_segmentation_args(tmp_path / "run", ade20k_folder)])
    (checkpoint_path,) = (tmp_path / "run").glob("lightning_logs/version_0/checkpoints/last.ckpt")
    export = export_checkpoint(checkpoint_path, tmp_path / "export")

    config = json.loads((export / "config.json").read_text())
    assert config["library_name"] == "mambaout-pl"
    assert config["model_name"] == "mambaout_pl.models.segmentor.UperNetSegmentor"
    assert "image-segmentation" in (export / "README.md").read_text()
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    network = create_model(config["model_name"], **config["model_args"]).eval()
    network.load_state_dict({k[len("model.") :]: v for k, v in checkpoint["state_dict"].items()})
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(from_pretrained(export)(images), network(images))


class FeatureTask(BaseTask):
    """A task the export code has never heard of: pooled backbone features, trained towards zero."""

    def __init__(self, backbone: str = "mambaout_femto", backbone_args: dict | None = None, **kwargs) -> None:
        super().__init__(**kwargs)

    def configure_models(self) -> None:
        self.model = create_model(self.hparams.backbone, num_classes=0, **(self.hparams.backbone_args or {}))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model(batch).pow(2).mean()

    def export_spec(self, data_hparams=None) -> ExportSpec:
        return ExportSpec(
            model_name=self.hparams.backbone,
            model_args={"num_classes": 0, **(self.hparams.backbone_args or {})},
            pipeline_tag="image-feature-extraction",
        )


def test_a_new_task_exports_through_its_export_spec_alone(tmp_path: Path, monkeypatch, capsys) -> None:
    task = FeatureTask(backbone_args=json.loads(TINY_MAMBAOUT), lr=0.01)
    trainer = Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(task, torch.utils.data.DataLoader(torch.randn(4, 3, 32, 32), batch_size=2))
    checkpoint_path = tmp_path / "features.ckpt"
    trainer.save_checkpoint(checkpoint_path)
    assert torch.load(checkpoint_path, weights_only=True)["mambaout_pl"]["task"] == "test_hub.FeatureTask"

    monkeypatch.setattr(registry, "_ALLOWED_PATHS", set())
    assert (
        main(["export", str(checkpoint_path), str(tmp_path / "export")]) == 2
    )  # a checkpoint names no code of its own
    assert "Refusing 'test_hub.FeatureTask'" in capsys.readouterr().err and not (tmp_path / "export").exists()
    assert (
        main(["export", str(checkpoint_path), str(tmp_path / "export"), "--allow-import-path=test_hub.FeatureTask"])
        == 0
    )
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["task"] == "test_hub.FeatureTask" and config["model_args"]["num_classes"] == 0
    assert "pipeline_tag: image-feature-extraction" in (tmp_path / "export" / "README.md").read_text()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = from_pretrained(tmp_path / "export").eval()(images)
        assert features.ndim == 2 and features.abs().sum() > 0
        assert torch.equal(features, task.model.eval()(images))
