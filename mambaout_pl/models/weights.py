"""Loading weights into a built model: timm state dicts, the official MambaOut release, export folders, Hub repos.

Files are read without running pickled code: torch files with `torch.load(weights_only=True)`,
`.safetensors` files with `safetensors.torch.load_file`.
"""

import argparse
import json
import logging
import os
import pickle
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from mambaout_pl.errors import CheckpointError, CheckpointMismatchError, UnsafeCheckpointError, first_sentence

__all__ = [
    "CheckpointError",
    "UnsafeCheckpointError",
    "CheckpointMismatchError",
    "read_state_dict",
    "check_safetensors_file",
    "convert_official_state_dict",
    "load_pretrained",
    "download_pretrained",
    "pretrained_builder",
    "HF_HUB_PREFIX",
]

_logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

# Entries of a training checkpoint that may hold the model's state dict, in order of preference.
_STATE_DICT_ENTRIES = ("state_dict", "model", "module")
# File names looked for when a directory is given (a Hub snapshot or `save_for_hf` folder).
_DIRECTORY_FILES = ("model.safetensors", "pytorch_model.bin")
_MAX_LISTED = 5
HF_HUB_PREFIX = "hf-hub:"


def read_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """Read the state dict from a `.pth`/`.pt`/`.bin`/`.ckpt`/`.safetensors` file (or a folder holding one).

    A state dict found under 'state_dict', 'model' or 'module' of a training checkpoint is taken
    from there.
    """
    path = _resolve_file(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        check_safetensors_file(path)
        try:
            checkpoint = load_file(str(path), device="cpu")
        except SafetensorError as e:
            raise CheckpointError(f"Cannot read '{path}' as a safetensors file: {e}") from e
    else:
        checkpoint = _torch_load(path)
    return _unwrap_state_dict(checkpoint, path)


def check_safetensors_file(path: PathLike) -> None:
    """Raise :class:`CheckpointError` naming ``path`` when it is shorter than its own header says (a download
    or copy cut short, a full disk) or its header is not readable; the tensors are not read.

    A safetensors file is an 8-byte header length, a JSON header giving each tensor's byte range,
    then the tensors' bytes.
    """
    path = Path(path)
    size = path.stat().st_size
    fix = "Download or export it again (or copy the whole file again)."
    with path.open("rb") as file:
        prefix = file.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else None
        if length is None or 8 + length > size:
            raise CheckpointError(
                f"'{path}' is truncated: it holds {size} bytes, which do not cover its safetensors header. {fix}"
            )
        try:
            header = json.loads(file.read(length))
        except (UnicodeDecodeError, ValueError) as error:
            raise CheckpointError(f"'{path}' is damaged: its safetensors header is not JSON ({error}). {fix}") from None
    entries = [entry for name, entry in header.items() if name != "__metadata__"] if isinstance(header, dict) else []
    offsets = [entry.get("data_offsets") for entry in entries if isinstance(entry, dict)]
    end = 8 + length + max((pair[1] for pair in offsets if isinstance(pair, list) and len(pair) == 2), default=0)
    if not isinstance(end, int) or end > size:
        raise CheckpointError(
            f"'{path}' is truncated: it holds {size} bytes, and its header places tensors up to byte {end}. {fix}"
        )


def convert_official_state_dict(state_dict: Mapping) -> dict[str, torch.Tensor]:
    """Rename the keys of the official MambaOut release (`yuweihao/MambaOut`) to ours (timm's).

    `downsample_layers.0.*` is the stem, `downsample_layers.N.*` the downsampling of stage N,
    `stages.N.M.*` block M of stage N; the final `norm` and the head MLP `head.fc1/norm/fc2`
    become `head.norm`, `head.pre_logits.fc/norm` and `head.fc`.
    """
    head_renames = (
        ("norm.", "head.norm."),
        ("head.fc1.", "head.pre_logits.fc."),
        ("head.norm.", "head.pre_logits.norm."),
        ("head.fc2.", "head.fc."),
    )
    converted = {}
    for key, value in state_dict.items():
        key = re.sub(r"^downsample_layers\.0\.", "stem.", key)
        key = re.sub(r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample.", key)
        key = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", key)
        for old, new in head_renames:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        converted[key] = value
    return converted


def load_pretrained(model: nn.Module, path: PathLike, strict: bool = True) -> nn.Module:
    """Load weights from a checkpoint file, an export folder or `hf-hub:user/repo` into `model` (in place).

    Accepts timm state dicts (`.pth`, `.bin`, `.safetensors`), the official MambaOut release
    (renamed with `convert_official_state_dict`) and the official releases of the visual Mamba models
    (a model's `checkpoint_filter_fn(state_dict)` renames older key layouts), bare or inside a
    training checkpoint. When the file's classifier has a different number of classes than the model's, the file's classifier
    is skipped (with a warning) and the model keeps its freshly initialised one. When the model
    takes another number of input channels than the file's first conv (`pretrained_cfg['first_conv']`,
    e.g. `in_chans=1` for grayscale or 4 for RGB-NIR), its weights are adapted as timm's
    `adapt_input_conv` does: summed over the channels for one, else repeated and scaled.

    Args:
        model: The model to fill.
        path: The checkpoint file, or a folder holding `model.safetensors` or `pytorch_model.bin`.
        strict: Raise `CheckpointMismatchError` on missing, unexpected or differently shaped
            tensors; if False, load the tensors that fit and warn about the rest.
    """
    path = _resolve_file(path)
    state_dict = read_state_dict(path)
    model_state = model.state_dict()

    state_dict = _match_key_names(state_dict, model_state)
    checkpoint_filter = getattr(model, "checkpoint_filter_fn", None)
    if callable(checkpoint_filter):  # a model's own renaming of older official key layouts (VMamba's)
        state_dict = checkpoint_filter(state_dict)
    state_dict = _adapt_input_convs(model, state_dict, model_state, path)

    classifier_keys = _classifier_keys(model, state_dict, model_state)
    file_classifier_keys = [k for k in classifier_keys if k in state_dict]
    file_classes = _num_classes(state_dict, file_classifier_keys)
    model_classes = _num_classes(model_state, [k for k in classifier_keys if k in model_state])
    keep_model_classifier = file_classes != model_classes
    if keep_model_classifier:
        message = (
            f"'{path}' holds {_classifier_phrase(file_classes, 'no classifier')} and the model "
            f"{_classifier_phrase(model_classes, 'none')}"
        )
        if model_classes:
            message += ": the model keeps its own, freshly initialised classifier"
        if file_classifier_keys:
            message += f"; skipped {', '.join(file_classifier_keys)}"
        warnings.warn(message + ".", stacklevel=2)
        state_dict = {k: v for k, v in state_dict.items() if k not in file_classifier_keys}
    expected_missing = set(classifier_keys) if keep_model_classifier else set()

    missing = [k for k in model_state if k not in state_dict and k not in expected_missing]
    unexpected = [k for k in state_dict if k not in model_state]
    mismatched = [
        (k, tuple(v.shape), tuple(model_state[k].shape))
        for k, v in state_dict.items()
        if k in model_state and v.shape != model_state[k].shape
    ]
    not_float = [
        f"{k} ({v.dtype})"
        for k, v in state_dict.items()
        if k in model_state and model_state[k].is_floating_point() and not v.is_floating_point()
    ]
    if not_float:
        raise CheckpointMismatchError(
            f"'{path}' holds integer or boolean tensors for floating-point parameters: {_listing(not_float)}. "
            "Loading would cast them to float and give wrong weights; the file was probably written from the wrong "
            "tensors. Re-export the weights as floating point."
        )
    if strict and (missing or unexpected or mismatched):
        raise CheckpointMismatchError(_mismatch_message(path, model, missing, unexpected, mismatched))
    if missing or unexpected or mismatched:
        warnings.warn(f"Loaded '{path}' partially: {_mismatch_summary(missing, unexpected, mismatched)}.", stacklevel=2)
        skip = set(unexpected) | {k for k, _, _ in mismatched}
        state_dict = {k: v for k, v in state_dict.items() if k not in skip}

    model.load_state_dict(state_dict, strict=False)
    _logger.info("Loaded %d tensors from '%s' into %s.", len(state_dict), path, type(model).__name__)
    return model


def download_pretrained(source: str) -> Path:
    """Local copy of a Hub model repo named `hf-hub:user/repo` or `hf-hub:user/repo@revision`.

    Only safetensors weights, JSON configs and the model card are fetched, never pickled files.
    """
    from huggingface_hub import snapshot_download

    repo_id, _, revision = source[len(HF_HUB_PREFIX) :].partition("@")
    return Path(
        snapshot_download(repo_id, revision=revision or None, allow_patterns=["*.safetensors", "*.json", "*.md"])
    )


def _resolve_file(path: PathLike) -> Path:
    if str(path).startswith(HF_HUB_PREFIX):
        path = download_pretrained(str(path))
    path = Path(path).expanduser()
    if path.is_dir():
        for name in _DIRECTORY_FILES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"No checkpoint in folder '{path}': expected one of {', '.join(_DIRECTORY_FILES)}.")
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint file not found: '{path}'.")
    return path


def _torch_load(path: Path) -> object:
    # argparse.Namespace (the `args` entry of timm training checkpoints) holds only attributes.
    allow_namespace = getattr(torch.serialization, "safe_globals", None)
    try:
        if allow_namespace is None:
            return torch.load(path, map_location="cpu", weights_only=True)
        with allow_namespace([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"GLOBAL ([\w.]+)", str(e))
        if refused:
            raise UnsafeCheckpointError(
                f"Refusing to load '{path}': it holds a pickled Python object ({refused.group(1)}), and "
                "unpickling it could run arbitrary code; torch.load(weights_only=True) loads only tensors and "
                "plain containers. If you trust the file, re-save its weights alone: "
                "torch.save(torch.load(path, weights_only=False)['model'], new_path), or as safetensors."
            ) from e
        reason = re.search(r"WeightsUnpickler error:\s*(.+?)\n", str(e))
        raise CheckpointError(
            f"Cannot read '{path}' as a PyTorch checkpoint ({reason.group(1) if reason else e}): "
            "is it a file written by torch.save, and complete?"
        ) from e
    except (RuntimeError, EOFError) as e:  # torch's zip reader: a file cut short or damaged
        raise CheckpointError(
            f"Cannot read '{path}' as a PyTorch checkpoint: it is truncated or damaged ({first_sentence(e)}). "
            "Download or copy it again, or use another checkpoint."
        ) from e
    except Exception as e:
        raise CheckpointError(f"Cannot read '{path}' as a PyTorch checkpoint: {e}") from e


def _unwrap_state_dict(checkpoint: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(checkpoint, Mapping):
        for entry in _STATE_DICT_ENTRIES:
            if isinstance(checkpoint.get(entry), Mapping):
                checkpoint = checkpoint[entry]
                break
    if not isinstance(checkpoint, Mapping) or not checkpoint:
        found = type(checkpoint).__name__ if not isinstance(checkpoint, Mapping) else "an empty mapping"
        raise CheckpointError(
            f"'{path}' does not hold a state dict: expected a mapping of parameter names to tensors "
            f"(optionally under one of {', '.join(repr(e) for e in _STATE_DICT_ENTRIES)}), found {found}."
        )
    not_tensors = [k for k, v in checkpoint.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"'{path}' does not hold a state dict: {len(not_tensors)} of its {len(checkpoint)} entries are not "
            f"tensors, e.g. {_listing([repr(k) for k in not_tensors])}. Expected a mapping of parameter names "
            f"to tensors, optionally under one of {', '.join(repr(e) for e in _STATE_DICT_ENTRIES)}."
        )
    return dict(checkpoint)


def _match_key_names(
    state_dict: dict[str, torch.Tensor],
    model_state: Mapping,
) -> dict[str, torch.Tensor]:
    """Rename official-release keys and remove prefixes that wrappers add (`module.`, `_orig_mod.`, ...)."""
    if any(key.startswith("downsample_layers.") for key in state_dict):
        state_dict = convert_official_state_dict(state_dict)
    while True:
        first_parts = {key.split(".", 1)[0] for key in state_dict}
        if len(first_parts) != 1 or any("." not in key for key in state_dict):
            return state_dict
        prefix = first_parts.pop() + "."
        if any(key.startswith(prefix) for key in model_state):
            return state_dict
        stripped = {key[len(prefix) :]: value for key, value in state_dict.items()}
        if any(key.startswith("downsample_layers.") for key in stripped):
            stripped = convert_official_state_dict(stripped)
        if not stripped.keys() & model_state.keys():
            return state_dict
        state_dict = stripped


def _adapt_input_convs(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    model_state: Mapping,
    path: Path,
) -> dict[str, torch.Tensor]:
    """The state dict with its first conv weights adapted to the model's input channels."""
    from timm.models import adapt_input_conv

    first_conv = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv") or ()
    adapted = dict(state_dict)
    for name in (first_conv,) if isinstance(first_conv, str) else first_conv:
        key = f"{name}.weight"
        if key not in state_dict or key not in model_state:
            continue
        weight, target = state_dict[key], model_state[key]
        if weight.ndim != 4 or target.ndim != 4 or weight.shape[1] == target.shape[1]:
            continue
        if weight.shape[0] != target.shape[0] or weight.shape[2:] != target.shape[2:]:
            continue
        adapted[key] = adapt_input_conv(target.shape[1], weight, base_chans=weight.shape[1])
        _logger.info("Adapted '%s' of '%s' from %d to %d input channels.", key, path, weight.shape[1], target.shape[1])
    return adapted


def _classifier_keys(model: nn.Module, state_dict: Mapping, model_state: Mapping) -> list[str]:
    """Keys of the final classifier, in the model and in the file."""
    prefix: str | None = None
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        classifier = get_classifier()
        prefix = next((name for name, module in model.named_modules() if module is classifier and name), None)
    if prefix is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        prefix = cfg.get("classifier") if isinstance(cfg.get("classifier"), str) else None
    if prefix is None:
        return []
    prefix += "."
    keys = [k for k in model_state if k.startswith(prefix)]
    keys += [k for k in state_dict if k.startswith(prefix) and k not in model_state]
    return keys


def _classifier_phrase(num_classes: int, absent: str) -> str:
    return f"a {num_classes}-class classifier" if num_classes else absent


def _num_classes(state_dict: Mapping, classifier_keys: list[str]) -> int:
    """Output count of the classifier stored under `classifier_keys` (0 if there is none)."""
    return max((state_dict[k].shape[0] for k in classifier_keys if state_dict[k].ndim > 0), default=0)


def _mismatch_summary(
    missing: list[str],
    unexpected: list[str],
    mismatched: list[tuple[str, tuple, tuple]],
) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} model keys missing from the file ({_listing(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys in the file ({_listing(unexpected)})")
    if mismatched:
        shapes = [f"{k}: file {list(f)} vs model {list(m)}" for k, f, m in mismatched]
        parts.append(f"{len(mismatched)} tensors with a different shape ({_listing(shapes)})")
    return "; ".join(parts)


def _mismatch_message(
    path: Path,
    model: nn.Module,
    missing: list[str],
    unexpected: list[str],
    mismatched: list[tuple[str, tuple, tuple]],
) -> str:
    return (
        f"Checkpoint '{path}' does not fit {type(model).__name__}: "
        f"{_mismatch_summary(missing, unexpected, mismatched)}. "
        "Build the model the checkpoint was trained as (same variant and arguments such as depths, dims, "
        "in_chans), or pass strict=False to load only the tensors that fit."
    )


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def pretrained_builder(
    model_class: Callable[..., nn.Module], pretrained: object, hint: str = ""
) -> Callable[..., nn.Module]:
    """A `build(**model_args)` for timm's `build_model_with_cfg` that loads `pretrained` (a file, export folder or
    `hf-hub:` repo, see `load_pretrained`) into the new model; refuses any other value up front."""
    if pretrained is True or not isinstance(pretrained, (str, os.PathLike, type(None), bool)):
        raise ValueError(
            f"pretrained must be the path of a checkpoint file or export folder, `hf-hub:user/repo` or None, "
            f"got {pretrained!r}{hint}."
        )

    def build(**model_args: object) -> nn.Module:
        model = model_class(**model_args)
        if pretrained:
            load_pretrained(model, pretrained)
        return model

    return build
