"""Deployment export: a network as an ONNX file or a ``torch.export`` program, with its preprocessing beside it.

    mambaout export runs/.../checkpoints/last.ckpt deploy/ --format onnx   # model.onnx + deployment.json
    mambaout export runs/.../checkpoints/last.ckpt deploy/ --format pt2    # model.pt2 + deployment.json

Both are traced by ``torch.export`` for images of one size, the batch size dynamic; the ONNX file
is translated from that program by PyTorch's dynamo-based exporter at ONNX opset :data:`OPSET`.
Input ``images``: ``[batch, C, H, W]`` float32, normalised with the ``mean`` and ``std`` of
``deployment.json``; output ``logits``: ``[batch, classes]`` for a classifier, ``[batch, classes,
H, W]`` for a segmentor. Height and width are fixed at the exported input size.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from mambaout_pl import __version__
from mambaout_pl.errors import ExportError
from mambaout_pl.export.target import check_export_target, staged_export
from mambaout_pl.models.detector import RCNNDetector
from mambaout_pl.models.mixers.ssm import SelectiveScanMixer
from mambaout_pl.tasks.base import BaseTask
from mambaout_pl.tasks.export_spec import ExportSpec
from mambaout_pl.training.atomic import atomic_write

__all__ = [
    "CONFIG_NAME",
    "FILE_NAMES",
    "INPUT_NAME",
    "OPSET",
    "OUTPUT_NAME",
    "check_deployable",
    "export_onnx",
    "export_program",
    "export_task",
    "to_onnx",
    "trace_program",
]

#: ONNX opset of the exported files: the exporter's own operator set, run by onnxruntime >= 1.14.
OPSET = 18
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
BATCH_AXIS = "batch"
#: The file each deployment format writes.
FILE_NAMES = {"onnx": "model.onnx", "pt2": "model.pt2"}
#: The file beside it that says how to feed the network.
CONFIG_NAME = "deployment.json"
_PREPROCESSING_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct")


# -- tracing --------------------------------------------------------------------------------------


def check_deployable(model: nn.Module) -> None:
    """Raise :class:`ExportError` for a network these exporters cannot trace, saying why and what to do instead."""
    if isinstance(model, RCNNDetector):
        kind = "Mask R-CNN" if model.masks else "Faster R-CNN"
        raise ExportError(
            f"A {kind} detector (RCNNDetector) cannot be exported as ONNX or as a torch.export program (pt2): "
            "its region proposals, non-maximum suppression and RoI heads keep a number of boxes that depends on "
            "the image's content, and torch.export cannot trace those data-dependent shapes through "
            "torchvision's NMS (both --format onnx and --format pt2 stop there). Export it in the Hub format "
            "instead (`mambaout export CKPT DIR`, without --format) and load it with "
            "mambaout_pl.models.from_pretrained(DIR)."
        )


def trace_program(model: nn.Module, input_size: int | tuple[int, int], in_chans: int = 3) -> ExportedProgram:
    """``model`` in eval mode traced by ``torch.export`` for ``[batch, in_chans, *input_size]`` images, batch dynamic."""
    check_deployable(model)
    height, width = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    # a batch of 2: torch.export specialises sizes 0 and 1 of example inputs
    images = torch.randn(2, in_chans, height, width, device=device, dtype=dtype)
    batch = Dim(BATCH_AXIS, min=1)
    with _traceable(model), torch.no_grad():
        return torch.export.export(model, (images,), dynamic_shapes=({0: batch},))


@contextmanager
def _traceable(model: nn.Module) -> Iterator[None]:
    """Eval mode, and SSM scans in chunks of about sqrt(tokens), for the block; both restored afterwards.

    A scan left to pick its chunks steps through every token on the CPU, which a trace unrolls into
    one graph step per token (thousands at 224x224); chunks of sqrt(tokens) tokens give about
    2 sqrt(tokens) steps and the same outputs to float rounding.
    """
    was_training = model.training
    scans = [m for m in model.modules() if isinstance(m, SelectiveScanMixer) and m.chunk_size is None]
    hooks = [scan.register_forward_pre_hook(_chunk_by_square_root) for scan in scans]
    model.eval()
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for scan in scans:
            scan.chunk_size = None
        model.train(was_training)


def _chunk_by_square_root(scan: SelectiveScanMixer, args: tuple[torch.Tensor, ...]) -> None:
    _, height, width, _ = args[0].shape
    scan.chunk_size = max(1, math.ceil(math.sqrt(height * width)))


def output_shape(program: ExportedProgram) -> list[int | str]:
    """The shape of the program's (first) output, the dynamic batch axis named."""
    (output,) = (node for node in program.graph.nodes if node.op == "output")
    value = output.args[0][0].meta["val"]
    return [size if isinstance(size, int) else BATCH_AXIS for size in value.shape]


# -- writing --------------------------------------------------------------------------------------


def to_onnx(program: ExportedProgram, opset: int = OPSET) -> torch.onnx.ONNXProgram:
    """The ONNX translation of ``program`` by PyTorch's dynamo-based exporter: input ``images``, output ``logits``."""
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(
            f"ONNX export needs {' and '.join(missing)}: pip install 'mambaout-pl[deploy]' "
            "(or pip install onnx onnxscript onnxruntime)."
        )
    onnx_program = torch.onnx.export(
        program,
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        opset_version=opset,
        optimize=True,
        verbose=False,
    )
    batch = onnx_program.model.graph.inputs[0].shape[0]
    if not isinstance(batch, int):
        onnx_program.rename_axes({batch: BATCH_AXIS})
    return onnx_program


def export_program(
    model: nn.Module,
    path: str | os.PathLike,
    input_size: int | tuple[int, int],
    in_chans: int = 3,
    overwrite: bool = False,
) -> ExportedProgram:
    """Trace ``model`` (see :func:`trace_program`) and save the program to ``path`` (``torch.export.load`` reads it)."""
    path = _target_file(path, overwrite)
    program = trace_program(model, input_size, in_chans)
    _save_program(program, path)
    return program


def export_onnx(
    model: nn.Module | ExportedProgram,
    path: str | os.PathLike,
    input_size: int | tuple[int, int] | None = None,
    in_chans: int = 3,
    opset: int = OPSET,
    overwrite: bool = False,
) -> torch.onnx.ONNXProgram:
    """Write ``model`` as an ONNX file: a network traced at ``input_size``, or a program from :func:`trace_program`."""
    if not isinstance(model, ExportedProgram):
        check_deployable(model)
    path = _target_file(path, overwrite)
    if not isinstance(model, ExportedProgram):
        if input_size is None:
            raise ExportError("export_onnx needs input_size (e.g. 224 or (512, 512)) to trace a network.")
        model = trace_program(model, input_size, in_chans)
    onnx_program = to_onnx(model, opset)
    _save_onnx(onnx_program, path)
    return onnx_program


def _target_file(path: str | os.PathLike, overwrite: bool) -> Path:
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"Export target '{path}' is a folder; give a file path.")
    if path.exists() and not overwrite:
        raise ExportError(f"Export target '{path}' exists; pass overwrite=True (--overwrite) to replace it.")
    return path


def _save_program(program: ExportedProgram, path: Path) -> None:
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    atomic_write(path, lambda file: file.write(buffer.getvalue()))


def _save_onnx(onnx_program: torch.onnx.ONNXProgram, path: Path) -> None:
    data = onnx_program.model_proto.SerializeToString()  # one file: fine below protobuf's 2 GB limit
    atomic_write(path, lambda file: file.write(data))


# -- a task ---------------------------------------------------------------------------------------


def export_task(
    task: BaseTask,
    output_dir: str | os.PathLike,
    format: str = "onnx",
    data_hparams: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    opset: int = OPSET,
) -> Path:
    """Write a task's network to a folder as ``model.onnx`` or ``model.pt2``, with ``deployment.json``; returns the folder.

    The input size, normalisation and label names come from the task's :class:`ExportSpec` for the
    data module's saved settings ``data_hparams``, else from the network's ``pretrained_cfg``. The
    folder is written under a temporary name and renamed into place; an existing non-empty folder
    is replaced only with ``overwrite=True`` and only when it is an earlier export holding nothing else. ``mambaout export CKPT DIR --format onnx`` calls it
    with the task and data settings a checkpoint holds.
    """
    if format not in FILE_NAMES:
        raise ExportError(f"Unknown deployment format {format!r}; choose one of {', '.join(FILE_NAMES)}.")
    target = Path(output_dir)
    check_deployable(task.model)
    check_export_target(target, overwrite)
    spec = task.export_spec(data_hparams or {})
    network = task.model
    preprocessing = _preprocessing(spec, network)
    if "input_size" not in preprocessing:
        raise ExportError(
            f"{type(task).__name__}'s data settings do not give the network's input size (no image_size or "
            "crop_size), nor does its pretrained_cfg; export it with "
            "mambaout_pl.export.deploy.export_onnx(task.model, path, input_size=...)."
        )
    in_chans, height, width = preprocessing["input_size"]
    program = trace_program(network, (height, width), in_chans)
    with staged_export(target, overwrite) as staging:
        if format == "onnx":
            _save_onnx(to_onnx(program, opset), staging / FILE_NAMES[format])
        else:
            _save_program(program, staging / FILE_NAMES[format])
        config = deployment_config(spec, preprocessing, format, output_shape(program), opset)
        config["task"] = f"{type(task).__module__}.{type(task).__qualname__}"
        text = json.dumps(config, indent=2).encode()
        atomic_write(staging / CONFIG_NAME, lambda file: file.write(text))
    return target


def _preprocessing(spec: ExportSpec, network: nn.Module) -> dict[str, Any]:
    """The spec's preprocessing, completed from the network's ``pretrained_cfg``; tuples as lists."""
    defaults: Mapping[str, Any] = getattr(network, "pretrained_cfg", None) or {}
    merged = {key: spec.preprocessing.get(key, defaults.get(key)) for key in _PREPROCESSING_KEYS}
    return {
        key: list(value) if isinstance(value, tuple) else value for key, value in merged.items() if value is not None
    }


def deployment_config(
    spec: ExportSpec,
    preprocessing: Mapping[str, Any],
    format: str,
    output: list[int | str],
    opset: int = OPSET,
) -> dict[str, Any]:
    """The contents of ``deployment.json``: file, input and output names and shapes, preprocessing, labels."""
    config: dict[str, Any] = {
        "format": format,
        "file": FILE_NAMES[format],
        "model_name": spec.model_name,
        "pipeline_tag": spec.pipeline_tag,
        "input": {"name": INPUT_NAME, "shape": [BATCH_AXIS, *preprocessing["input_size"]], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": output},
        "preprocessing": dict(preprocessing),
        "label_names": spec.label_names,
        "mambaout_pl_version": __version__,
        "torch_version": torch.__version__,
    }
    if format == "onnx":
        config["opset"] = opset
    return config
