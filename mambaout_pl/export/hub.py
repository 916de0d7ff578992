"""Publish trained tasks on the Hugging Face Hub: export a checkpoint to a folder, push it, load it back.

    mambaout export runs/.../checkpoints/last.ckpt exports/my-model
    mambaout push runs/.../checkpoints/last.ckpt --repo-id user/my-model

The task says how it is exported (``BaseTask.export_spec``, an :class:`ExportSpec`). A network
whose spec asks for timm's format and that timm can build (a classifier) is written with
``timm.models.save_for_hf`` (``config.json`` + ``model.safetensors``), so
``timm.create_model("hf-hub:user/my-model")`` loads it. Any other network (a segmentation model, a
backbone with another token mixer) is written in mambaout-pl's format: ``config.json`` with
``model_name`` and every constructor argument in ``model_args``, and ``model.safetensors``;
``mambaout_pl.models.from_pretrained`` loads it strictly. Both come with a ``README.md`` model card.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from safetensors.torch import save_file

from mambaout_pl import __version__
from mambaout_pl.errors import CheckpointError, CheckpointMismatchError, ExportError
from mambaout_pl.export.model_card import model_card
from mambaout_pl.export.target import EXPORT_MANIFEST, check_export_target, staged_export
from mambaout_pl.models import (
    UnknownModelError,
    UntrustedNameError,
    allow_import_path,
    resolve_trusted_class,
    untrusted_source,
)
from mambaout_pl.tasks.base import BaseTask
from mambaout_pl.tasks.export_spec import ExportSpec
from mambaout_pl.training.checkpoint_io import read_checkpoint
from mambaout_pl.training.resume import CHECKPOINT_KEY, RESUME_MAY_CHANGE

# -- reading a task checkpoint -------------------------------------------------------------------


def read_task_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A mambaout-pl task checkpoint, read with :func:`~mambaout_pl.training.read_checkpoint`."""
    checkpoint = read_checkpoint(path)
    if CHECKPOINT_KEY not in checkpoint:
        raise CheckpointError(
            f"'{path}' is not a mambaout-pl task checkpoint (no '{CHECKPOINT_KEY}' entry); export checkpoints "
            "written by `mambaout fit`. Plain weight files load with mambaout_pl.models.load_pretrained."
        )
    return checkpoint


def task_from_checkpoint(checkpoint: Mapping[str, Any], path: str | os.PathLike = "checkpoint") -> BaseTask:
    """Rebuild the task a checkpoint came from, with its weights (EMA weights when EMA was on).

    The checkpoint is data: its task class and the model names in its settings resolve only
    through the registry's allow-list (:func:`~mambaout_pl.models.resolve_trusted_class`).

    Settings a resumed run may change (``RESUME_MAY_CHANGE``: ``pretrained``, ``compile``) take the
    task's defaults: the weights come from the checkpoint, and the network is not compiled.
    """
    source = f"checkpoint '{path}'"
    class_path = checkpoint[CHECKPOINT_KEY]["task"]
    try:
        task_class = resolve_trusted_class(class_path, base=BaseTask, source=source)
    except UnknownModelError as error:
        raise CheckpointError(f"'{path}' was written by task {class_path}, which cannot be imported here.") from error
    hparams = {
        key: value
        for key, value in checkpoint.get("hyper_parameters", {}).items()
        if not key.startswith("_") and key not in RESUME_MAY_CHANGE
    }
    try:
        with untrusted_source(source):  # the checkpoint's model names resolve as data, nested ones included
            task = task_class(**hparams)
    except TypeError as error:
        raise CheckpointMismatchError(f"The settings saved in '{path}' do not build {class_path}: {error}") from error
    try:
        task.load_state_dict(checkpoint["state_dict"], strict=True)
    except RuntimeError as error:
        raise CheckpointMismatchError(f"The weights in '{path}' do not fit {class_path}({hparams}): {error}") from error
    return task.eval()


# -- export ---------------------------------------------------------------------------------------


def export_checkpoint(
    checkpoint_path: str | os.PathLike, output_dir: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Write a Hub folder for a task checkpoint; returns the folder.

    The folder is written beside the target under a temporary name and renamed into place, so a
    failed export leaves nothing half-written. An existing non-empty folder is replaced only with
    ``overwrite=True``, and only when it is an earlier export holding nothing else (see
    :func:`~mambaout_pl.export.target.check_export_target`).
    """
    target = Path(output_dir)
    check_export_target(target, overwrite)
    checkpoint = read_task_checkpoint(checkpoint_path)
    task = task_from_checkpoint(checkpoint, checkpoint_path)
    with staged_export(target, overwrite) as staging:
        write_export(task, checkpoint, Path(checkpoint_path), staging)
    return target


def write_export(task: BaseTask, checkpoint: dict[str, Any], checkpoint_path: Path, folder: Path) -> str:
    """Write weights, config and model card of ``task`` into ``folder`` as its :class:`ExportSpec` says;
    returns the format written (``"timm"`` or ``"mambaout-pl"``)."""
    data_hparams = checkpoint.get("datamodule_hyper_parameters", {})
    spec = task.export_spec(data_hparams)
    timm_model = _as_timm_model(task.model, spec) if spec.timm_format else None
    if timm_model is not None:
        timm.models.save_for_hf(
            timm_model,
            str(folder),
            model_config={"label_names": spec.label_names} if spec.label_names else None,
            model_args={k: v for k, v in spec.model_args.items() if k != "num_classes"},
            safe_serialization=True,
            data_config=spec.preprocessing,
        )
        # timm copies the tag of the network's ImageNet weights ("in1k"): these weights name their own data
        config = json.loads((folder / "config.json").read_text())
        pretrained_cfg = config.setdefault("pretrained_cfg", {})
        pretrained_cfg.pop("tag", None)
        tag = training_data_tag(data_hparams)
        if tag is not None:
            pretrained_cfg["tag"] = tag
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        export_format = "timm"
    else:
        state = {name: tensor.detach().contiguous() for name, tensor in task.model.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        config = {
            "library_name": "mambaout-pl",
            "mambaout_pl_version": __version__,
            "task": checkpoint[CHECKPOINT_KEY]["task"],
            "model_name": spec.model_name,
            "model_args": spec.model_args,
            "label_names": spec.label_names,
            "pretrained_cfg": spec.preprocessing,
        }
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        export_format = "mambaout-pl"
    card = model_card(task.model, spec, checkpoint, checkpoint_path, export_format)
    card.save(folder / "README.md")
    return export_format


def training_data_tag(data_hparams: Mapping[str, Any]) -> str | None:
    """The ``pretrained_cfg`` tag of weights trained on the data a data module's saved settings name: the
    folder's name for a builder reading ``data_dir`` (``imagefolder``), else the last part of ``path``
    (``builtin:digits`` -> ``digits``, ``ILSVRC/imagenet-1k`` -> ``imagenet_1k``); None without either."""
    path, data_dir = data_hparams.get("path"), data_hparams.get("data_dir")
    if isinstance(data_dir, (str, os.PathLike)) and path in (None, "imagefolder", "parquet", "ade20k", "coco"):
        name = Path(data_dir).expanduser().resolve().name
    elif isinstance(path, (str, os.PathLike)):
        name = re.split(r"[:/\\]", str(path).rstrip("/\\"))[-1]
    else:
        return None
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or None


def _as_timm_model(network: torch.nn.Module, spec: ExportSpec) -> torch.nn.Module | None:
    """timm's own model holding ``network``'s weights, or None when timm cannot build it.

    Only timm's own models count: a package that registers its models in timm's registry (the
    official `mambavision` does) is not what `timm.create_model("hf-hub:...")` builds elsewhere.
    """
    if not timm.is_model(spec.model_name) or not timm.models.model_entrypoint(spec.model_name).__module__.startswith(
        "timm."
    ):
        return None
    try:
        model = timm.create_model(spec.model_name, pretrained=False, **spec.model_args)
        model.load_state_dict(network.state_dict(), strict=True)
    except (RuntimeError, TypeError, ValueError):
        return None
    return model.eval()


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
        (folder / EXPORT_MANIFEST).unlink()  # local bookkeeping for --overwrite, not part of the published model
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
    """``mambaout export CKPT DIR [--format {hub,onnx,pt2}] [--overwrite] [--allow-import-path PATH ...]``."""
    parser = argparse.ArgumentParser(prog="mambaout export", description="Export a task checkpoint to a folder.")
    parser.add_argument("checkpoint", help="a .ckpt written by `mambaout fit`")
    parser.add_argument("output_dir", help="folder to write")
    parser.add_argument(
        "--format",
        choices=("hub", "onnx", "pt2"),
        default="hub",
        help="hub: config.json, model.safetensors, README.md (default); onnx: model.onnx; pt2: a torch.export "
        "program model.pt2; onnx and pt2 with deployment.json (input size, mean/std, label names)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in output_dir")
    _add_allow_argument(parser)
    args = parser.parse_args(argv)
    try:
        allow_import_path(*args.allow_import_path)
        if args.format == "hub":
            folder = export_checkpoint(args.checkpoint, args.output_dir, overwrite=args.overwrite)
        else:
            from mambaout_pl.export.deploy import export_task

            checkpoint = read_task_checkpoint(args.checkpoint)
            task = task_from_checkpoint(checkpoint, args.checkpoint)
            data_hparams = checkpoint.get("datamodule_hyper_parameters", {})
            folder = export_task(task, args.output_dir, args.format, data_hparams, overwrite=args.overwrite)
    except (ExportError, CheckpointError, FileNotFoundError, UntrustedNameError, UnknownModelError, OSError) as error:
        print(f"mambaout export: error: {error}", file=sys.stderr)
        return 2
    print(f"Exported {args.checkpoint} to {folder}: {', '.join(sorted(p.name for p in folder.iterdir()))}")
    return 0


def push_main(argv: list[str]) -> int:
    """``mambaout push CKPT --repo-id USER/NAME [--private] [--revision R] [--commit-message M] [--allow-import-path PATH ...]``."""
    parser = argparse.ArgumentParser(prog="mambaout push", description="Export a task checkpoint and upload it.")
    parser.add_argument("checkpoint", help="a .ckpt written by `mambaout fit`")
    parser.add_argument("--repo-id", required=True, help="the Hub model repo, user/name")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    parser.add_argument("--commit-message", default=None)
    _add_allow_argument(parser)
    args = parser.parse_args(argv)
    try:
        allow_import_path(*args.allow_import_path)
        url = push_checkpoint(args.checkpoint, args.repo_id, args.private, args.revision, args.commit_message)
    except (ExportError, CheckpointError, FileNotFoundError, UntrustedNameError, UnknownModelError, OSError) as error:
        print(f"mambaout push: error: {error}", file=sys.stderr)
        return 2
    print(f"Pushed {args.checkpoint} to {url}")
    return 0


def _add_allow_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-import-path",
        action="append",
        default=[],
        metavar="PATH",
        help="a class or module of your own that the checkpoint may name (its task or network), e.g. my_pkg.tasks.MyTask; "
        "anything else a checkpoint names resolves only against mambaout-pl's and timm's models",
    )
