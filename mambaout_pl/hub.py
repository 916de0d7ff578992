"""Publish trained tasks on the Hugging Face Hub: export a checkpoint to a folder, push it, load it back.

    mambaout export runs/.../checkpoints/last.ckpt exports/my-model
    mambaout push runs/.../checkpoints/last.ckpt --repo-id user/my-model

A classifier that timm can build is written in timm's format (``config.json`` + ``model.safetensors``
via ``timm.models.save_for_hf``), so ``timm.create_model("hf-hub:user/my-model")`` loads it. Any
other network (a segmentation model, a backbone with another token mixer) is written in
mambaout-pl's format: ``config.json`` with ``model_name`` and every constructor argument in
``model_args``, and ``model.safetensors``; ``mambaout_pl.models.from_pretrained`` loads it strictly.
Both come with a ``README.md`` model card.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import timm
import torch
import yaml
from huggingface_hub import HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

from mambaout_pl import __version__
from mambaout_pl.tasks import BaseTask, ClassificationTask
from mambaout_pl.tasks.base import CHECKPOINT_KEY

CITATION = """@inproceedings{yu2025mambaout,
  title={MambaOut: Do We Really Need Mamba for Vision?},
  author={Yu, Weihao and Wang, Xinchao},
  booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year={2025}
}"""


class ExportError(ValueError):
    """A checkpoint cannot be exported or published as asked."""


# -- reading a task checkpoint -------------------------------------------------------------------


def read_task_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A mambaout-pl task checkpoint, read without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"Checkpoint '{path}' does not exist; give the path of a .ckpt file written by `fit`.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # weights_only refusals and corrupt files alike
        raise ExportError(f"Cannot read '{path}' as a checkpoint with weights_only=True: {error}") from error
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint or "state_dict" not in checkpoint:
        raise ExportError(
            f"'{path}' is not a mambaout-pl task checkpoint (no '{CHECKPOINT_KEY}' entry); export checkpoints "
            "written by `mambaout fit`. Plain weight files load with mambaout_pl.models.load_pretrained."
        )
    return checkpoint


def task_from_checkpoint(checkpoint: dict[str, Any], path: str | os.PathLike = "checkpoint") -> BaseTask:
    """Rebuild the task a checkpoint came from, with its weights (EMA weights when EMA was on)."""
    class_path = checkpoint[CHECKPOINT_KEY]["task"]
    module_name, _, class_name = class_path.rpartition(".")
    try:
        task_class = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ExportError(f"'{path}' was written by task {class_path}, which cannot be imported here.") from error
    if not (isinstance(task_class, type) and issubclass(task_class, BaseTask)):
        raise ExportError(f"'{path}' names {class_path}, which is not a mambaout-pl task.")
    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
    hparams.update({key: value for key, value in (("pretrained", None), ("compile", False)) if key in hparams})
    task = task_class(**hparams)
    try:
        task.load_state_dict(checkpoint["state_dict"], strict=True)
    except RuntimeError as error:
        raise ExportError(f"The weights in '{path}' do not fit {class_path}({hparams}): {error}") from error
    return task.eval()


# -- export ---------------------------------------------------------------------------------------


def export_checkpoint(checkpoint_path: str | os.PathLike, output_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a Hub folder for a task checkpoint; returns the folder.

    The folder is written beside the target under a temporary name and renamed into place, so a
    failed export leaves nothing half-written. An existing non-empty folder is replaced only with
    ``overwrite=True``.
    """
    target = Path(output_dir)
    if target.exists() and not target.is_dir():
        raise ExportError(f"Export target '{target}' is a file; give a folder path.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ExportError(f"Export target '{target}' exists and is not empty; pass --overwrite to replace it.")
    checkpoint = read_task_checkpoint(checkpoint_path)
    task = task_from_checkpoint(checkpoint, checkpoint_path)

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.export-", dir=target.parent))
    try:
        write_export(task, checkpoint, Path(checkpoint_path), staging)
        _make_readable(staging)
        if target.exists():
            retired = target.with_name(f".{target.name}.replaced-{uuid.uuid4().hex[:8]}")
            target.rename(retired)
            staging.rename(target)
            shutil.rmtree(retired)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _make_readable(folder: Path) -> None:
    """Give a staged export the permissions of a folder made with the user's umask (mkdtemp makes 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def write_export(task: BaseTask, checkpoint: dict[str, Any], checkpoint_path: Path, folder: Path) -> str:
    """Write weights, config and model card of ``task`` into ``folder``; returns the format written."""
    network = task.network_config()
    data_config = _data_config(checkpoint.get("datamodule_hyper_parameters", {}))
    label_names = task.hparams.get("label_names")
    timm_model = _as_timm_model(task, network)
    if timm_model is not None:
        timm.models.save_for_hf(
            timm_model,
            str(folder),
            model_config={"label_names": label_names} if label_names else None,
            model_args={k: v for k, v in network["model_args"].items() if k != "num_classes"},
            safe_serialization=True,
            data_config=data_config,
        )
        export_format = "timm"
    else:
        state = {name: tensor.detach().contiguous() for name, tensor in task.model.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        config = {
            "library_name": "mambaout-pl",
            "mambaout_pl_version": __version__,
            "task": checkpoint[CHECKPOINT_KEY]["task"],
            **network,
            "label_names": label_names,
            "pretrained_cfg": data_config,
        }
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        export_format = "mambaout-pl"
    card = model_card(task, checkpoint, checkpoint_path, network, data_config, export_format)
    card.save(folder / "README.md")
    return export_format


def _as_timm_model(task: BaseTask, network: dict[str, Any]) -> torch.nn.Module | None:
    """timm's own model holding the task's classifier weights, or None when timm cannot build it."""
    if not (isinstance(task, ClassificationTask) and timm.is_model(network["model_name"])):
        return None
    try:
        model = timm.create_model(network["model_name"], pretrained=False, **network["model_args"])
        model.load_state_dict(task.model.state_dict(), strict=True)
    except (RuntimeError, TypeError, ValueError):
        return None
    return model.eval()


def _data_config(data_hparams: dict[str, Any]) -> dict[str, Any]:
    """Pre-processing of the exported weights, in timm's ``pretrained_cfg`` terms."""
    config: dict[str, Any] = {}
    size = data_hparams.get("image_size") or data_hparams.get("crop_size")
    if size:
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        config["input_size"] = (3, height, width)
    for key in ("crop_pct", "interpolation", "mean", "std"):
        if data_hparams.get(key) is not None:
            config[key] = tuple(data_hparams[key]) if isinstance(data_hparams[key], list) else data_hparams[key]
    return config


# -- model card -----------------------------------------------------------------------------------


def model_card(
    task: BaseTask,
    checkpoint: dict[str, Any],
    checkpoint_path: Path,
    network: dict[str, Any],
    data_config: dict[str, Any],
    export_format: str,
) -> ModelCard:
    """The README.md of an export: Hub metadata, model, data, metrics, usage, recipe, license, citation."""
    segmentation = not isinstance(task, ClassificationTask)
    pipeline = "image-segmentation" if segmentation else "image-classification"
    data_hparams = checkpoint.get("datamodule_hyper_parameters", {})
    dataset = data_hparams.get("path")
    hub_dataset = dataset if isinstance(dataset, str) and _looks_like_hub_id(dataset) else None
    metrics = checkpoint[CHECKPOINT_KEY].get("metrics", {})
    card_data = ModelCardData(
        library_name="timm" if export_format == "timm" else "mambaout-pl",
        license="apache-2.0",
        tags=[pipeline, "mambaout", "mambaout-pl", *(["timm"] if export_format == "timm" else [])],
        datasets=[hub_dataset] if hub_dataset else None,
        metrics=["mean_iou"] if segmentation else ["accuracy"],
        pipeline_tag=pipeline,
    )
    parameters = sum(p.numel() for p in task.model.parameters())
    gmacs = _gmacs(task.model, data_config.get("input_size"))
    size_text = "x".join(str(s) for s in data_config["input_size"][1:]) if "input_size" in data_config else "?"
    metric_rows = "\n".join(f"| {name} | {value:.4f} |" for name, value in sorted(metrics.items())) or "| - | - |"
    recipe = _recipe_text(checkpoint, checkpoint_path)
    name = network["model_name"]
    if export_format == "timm":
        usage = (
            "```python\nimport timm\n\n"
            'model = timm.create_model("hf-hub:USER/REPO", pretrained=True).eval()\n'
            "config = timm.data.resolve_data_config({}, model=model)\n"
            "transform = timm.data.create_transform(**config)\n```"
        )
    else:
        usage = (
            "```python\nfrom mambaout_pl.models import from_pretrained\n\n"
            'model = from_pretrained("hf-hub:USER/REPO")\n```'
        )
    body = f"""
# {name} ({pipeline})

Trained with [mambaout-pl](https://pypi.org/project/mambaout-pl/) {__version__}: task
`{checkpoint[CHECKPOINT_KEY]["task"]}`, {checkpoint.get("epoch", 0) + 1} epochs, {checkpoint.get("global_step", 0)} optimizer steps.

## Model

- Network: `{name}` with arguments `{json.dumps(network["model_args"])}`
- Parameters: {parameters / 1e6:.2f} M
- GMACs at {size_text}: {f"{gmacs:.2f}" if gmacs is not None else "not measured"}
- Format: {export_format} (`config.json` + `model.safetensors`)

## Dataset

`{dataset}`{f", {len(task.hparams.label_names)} classes" if task.hparams.get("label_names") else ""}

## Metrics of this checkpoint

| metric | value |
|---|---|
{metric_rows}

## Usage

{usage}

## Training recipe

```yaml
{recipe}```

## License

Apache-2.0.

## Citation

```bibtex
{CITATION}
```
"""
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")


def _looks_like_hub_id(path: str) -> bool:
    if Path(path).exists() or ":" in path:
        return False
    try:
        validate_repo_id(path)
    except HFValidationError:
        return False
    return "/" in path


def _gmacs(model: torch.nn.Module, input_size: tuple[int, int, int] | None) -> float | None:
    if input_size is None:
        return None
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, *input_size))
    return counter.get_total_flops() / 2 / 1e9


def _recipe_text(checkpoint: dict[str, Any], checkpoint_path: Path) -> str:
    """The config the CLI saved beside the run, else the task and data hyper-parameters."""
    saved = checkpoint_path.resolve().parent.parent / "config.yaml"
    if saved.is_file():
        return saved.read_text()
    recipe = {
        "model": checkpoint.get("hyper_parameters", {}),
        "data": checkpoint.get("datamodule_hyper_parameters", {}),
    }
    return yaml.safe_dump(json.loads(json.dumps(recipe, default=str)), sort_keys=False)


# -- push -----------------------------------------------------------------------------------------


def push_checkpoint(
    checkpoint_path: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    api: HfApi | None = None,
) -> str:
    """Export a task checkpoint and upload it to the Hub model repo ``repo_id``; returns the commit URL.

    The token comes from ``token``, else from the usual places (``HF_TOKEN``, ``hf auth login``).
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ExportError(f"Repo id {repo_id!r} is malformed: {error} Use 'user/name'.") from error
    if repo_id.count("/") != 1:
        raise ExportError(f"Repo id {repo_id!r} is malformed; use 'user/name' (or 'organisation/name').")
    token = token or get_token()
    if api is None and not token:
        raise ExportError("No Hugging Face token found: set HF_TOKEN or run `hf auth login`, then push again.")
    api = api or HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="mambaout-push-") as staging:
        folder = export_checkpoint(checkpoint_path, Path(staging) / "export")
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            revision=revision,
            commit_message=commit_message or f"Upload {Path(checkpoint_path).name} with mambaout-pl",
        )
    return str(getattr(commit, "commit_url", commit))


class PushToHubCallback(Callback):
    """At the end of ``fit``, push the best checkpoint (else the last) to the Hub from rank zero.

    Add it to a recipe under ``trainer.callbacks`` with ``repo_id: user/name``; the token comes from
    ``HF_TOKEN`` or ``hf auth login`` and is never stored in the recipe.
    """

    def __init__(
        self, repo_id: str, private: bool = False, revision: str | None = None, commit_message: str | None = None
    ) -> None:
        self.repo_id = repo_id
        self.private = private
        self.revision = revision
        self.commit_message = commit_message

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        callback = trainer.checkpoint_callback
        path = callback and (callback.best_model_path or callback.last_model_path)
        if not path:
            path = str(Path(trainer.default_root_dir) / "push_to_hub.ckpt")
            trainer.save_checkpoint(path)
        url = push_checkpoint(path, self.repo_id, self.private, self.revision, self.commit_message)
        rank_zero_info(f"Pushed {path} to {url}")


# -- command line ---------------------------------------------------------------------------------


def export_main(argv: list[str]) -> int:
    """``mambaout export CKPT DIR [--overwrite]``."""
    parser = argparse.ArgumentParser(prog="mambaout export", description="Export a task checkpoint to a Hub folder.")
    parser.add_argument("checkpoint", help="a .ckpt written by `mambaout fit`")
    parser.add_argument("output_dir", help="folder to write (config.json, model.safetensors, README.md)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    args = parser.parse_args(argv)
    try:
        folder = export_checkpoint(args.checkpoint, args.output_dir, overwrite=args.overwrite)
    except ExportError as error:
        print(f"mambaout export: error: {error}", file=sys.stderr)
        return 2
    print(f"Exported {args.checkpoint} to {folder}: {', '.join(sorted(p.name for p in folder.iterdir()))}")
    return 0


def push_main(argv: list[str]) -> int:
    """``mambaout push CKPT --repo-id USER/NAME [--private] [--revision R] [--commit-message M]``."""
    parser = argparse.ArgumentParser(prog="mambaout push", description="Export a task checkpoint and upload it.")
    parser.add_argument("checkpoint", help="a .ckpt written by `mambaout fit`")
    parser.add_argument("--repo-id", required=True, help="the Hub model repo, user/name")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    parser.add_argument("--commit-message", default=None)
    args = parser.parse_args(argv)
    try:
        url = push_checkpoint(args.checkpoint, args.repo_id, args.private, args.revision, args.commit_message)
    except ExportError as error:
        print(f"mambaout push: error: {error}", file=sys.stderr)
        return 2
    print(f"Pushed {args.checkpoint} to {url}")
    return 0
