"""Checkpoint folders written by ``ModelParallelStrategy``, and the one-file checkpoint made from one.

    mambaout consolidate runs/.../checkpoints/epoch011-step1200.ckpt model.ckpt

With ``save_distributed_checkpoint=True`` (its default) the strategy writes each checkpoint as a
folder: every process's shards of the weights and optimizer states (``torch.distributed.checkpoint``:
``*.distcp`` files and a ``.metadata`` index) and Lightning's other entries in ``meta.pt``.
``fit --ckpt_path FOLDER`` resumes from it under the same strategy. :func:`consolidate_checkpoint`
writes the file ``save_distributed_checkpoint=False`` would have written (full weights, optimizer
states keyed by position), which ``mambaout export``, ``validate`` / ``test`` / ``predict`` and a
resumed ``fit`` under any strategy read.

The ``.metadata`` index (and any non-tensor value such as the optimizer's settings) is a pickle,
which ``torch.distributed.checkpoint`` unpickles: consolidate only folders you trust, such as
your own runs'. ``meta.pt`` is read with ``weights_only=True``. Before anything is assembled, every
shard the index lists is checked to exist and to hold the bytes the index places in it
(:func:`check_shard_files`): a folder copied in part, or cut short by a full disk, is refused
naming the file.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from mambaout_pl.errors import CheckpointError, UnsafeCheckpointError, first_sentence
from mambaout_pl.training.atomic import atomic_torch_save, naming_target

__all__ = [
    "INDEX_FILE",
    "METADATA_FILE",
    "check_shard_files",
    "consolidate_checkpoint",
    "consolidate_main",
    "is_sharded_checkpoint",
    "optimizer_state_by_position",
    "read_sharded_checkpoint_metadata",
    "writes_checkpoint_folders",
]

#: The file of a checkpoint folder that holds everything but the weights and optimizer states (Lightning's name).
METADATA_FILE = "meta.pt"
#: The index of a checkpoint folder: where each tensor's bytes lie in which shard (``torch.distributed.checkpoint``'s name).
INDEX_FILE = ".metadata"


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """True for a checkpoint folder written by ``ModelParallelStrategy`` (a folder with ``meta.pt``)."""
    path = Path(path)
    return path.is_dir() and (path / METADATA_FILE).is_file()


def writes_checkpoint_folders(strategy: Strategy) -> bool:
    """True when ``strategy`` writes each checkpoint as a folder of shards: ``ModelParallelStrategy`` with
    ``save_distributed_checkpoint=True``, ``FSDPStrategy`` with ``state_dict_type="sharded"``."""
    # Lightning 2.6 keeps both choices in private attributes only.
    if isinstance(strategy, ModelParallelStrategy):
        return bool(strategy._save_distributed_checkpoint)
    if isinstance(strategy, FSDPStrategy):
        return strategy._state_dict_type == "sharded"
    return False


def read_sharded_checkpoint_metadata(folder: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint folder's ``meta.pt`` (epoch, hyper-parameters, loop and callback states), read with
    ``weights_only=True``; everything a checkpoint holds but its weights and optimizer states."""
    path = Path(folder) / METADATA_FILE
    try:
        metadata = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"Refusing to load '{path}': it holds Python objects other than tensors and plain containers ({error})."
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(
            f"Cannot read '{path}' (truncated, or not written by torch.save): {first_sentence(error)}. Use another "
            "checkpoint, e.g. the previous epoch's."
        ) from error
    if not isinstance(metadata, dict):
        raise CheckpointError(f"'{path}' holds a {type(metadata).__name__}, not a checkpoint's entries.")
    return metadata


def optimizer_state_by_position(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state keyed by parameter names (as ``torch.distributed.checkpoint`` saves it), keyed
    by position in the parameter groups instead, as ``torch.optim.Optimizer.state_dict`` keys it."""
    names = [name for group in state["param_groups"] for name in group["params"]]
    position = {name: index for index, name in enumerate(names)}
    return {
        "state": {position[name]: value for name, value in state["state"].items()},
        "param_groups": [
            {**group, "params": [position[name] for name in group["params"]]} for group in state["param_groups"]
        ],
    }


def consolidate_checkpoint(folder: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Write the checkpoint folder ``folder`` as the one file ``output`` (a new file); returns ``output``.

    The whole network and its optimizer states are assembled in this process's memory.
    """
    folder, output = Path(folder), Path(output)
    if not is_sharded_checkpoint(folder):
        raise CheckpointError(
            f"'{folder}' is not a checkpoint folder written by ModelParallelStrategy (a folder with {METADATA_FILE}); "
            "give the folder of a sharded checkpoint (e.g. runs/.../checkpoints/last.ckpt)."
        )
    if output.exists():
        raise CheckpointError(f"'{output}' exists already; give the name of a new file.")
    if not output.parent.is_dir():
        raise CheckpointError(f"The folder of '{output}' does not exist; create it or give another path.")
    checkpoint = read_sharded_checkpoint_metadata(folder)
    check_shard_files(folder)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.") as staging:
        staged = Path(staging) / "state.pt"
        with naming_target(output), staged.open("wb") as file:  # a file object: a failed write names its cause
            try:
                dcp_to_torch_save(folder, file)
            except CheckpointException as error:
                raise CheckpointError(f"Cannot read the shards of '{folder}': {shard_failure(error)}.") from error
        state = torch.load(staged, map_location="cpu", weights_only=True)
    if "state_dict" not in state:
        raise CheckpointError(f"'{folder}' holds no weights ('state_dict'); it holds {sorted(state)[:8]}.")
    checkpoint["state_dict"] = state.pop("state_dict")
    optimizer_keys = sorted(
        (key for key in state if re.fullmatch(r"optimizer_\d+", key)), key=lambda key: int(key.rpartition("_")[2])
    )
    checkpoint["optimizer_states"] = [optimizer_state_by_position(state[key]) for key in optimizer_keys]
    atomic_torch_save(checkpoint, output)
    return output


def check_shard_files(folder: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` naming the file when the folder's index (``.metadata``) cannot be read, or
    a shard it lists is missing or shorter than the bytes the index places in it (a partial copy, a full disk).

    The index is a pickle (see the module docstring): only for folders you trust.
    """
    folder = Path(folder)
    index = folder / INDEX_FILE
    if not index.is_file():
        raise CheckpointError(
            f"Checkpoint folder '{folder}' has no index '{INDEX_FILE}' (written last, with the shards): it was not "
            "saved to the end or not copied whole. Use another checkpoint, or copy the whole folder again."
        )
    try:
        metadata = FileSystemReader(str(folder)).read_metadata()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, OSError) as error:
        raise CheckpointError(
            f"Cannot read the index '{index}' of checkpoint folder '{folder}': it is truncated or damaged ({error}). "
            "Use another checkpoint, or copy the whole folder again."
        ) from error
    ends: dict[str, int] = {}
    for item in (getattr(metadata, "storage_data", None) or {}).values():
        ends[item.relative_path] = max(ends.get(item.relative_path, 0), item.offset + item.length)
    for name, end in sorted(ends.items()):
        shard = folder / name
        if not shard.is_file():
            raise CheckpointError(
                f"Shard '{shard}' of checkpoint folder '{folder}' is missing (its index '{INDEX_FILE}' lists it): "
                "the folder was not copied whole. Copy it again, or use another checkpoint."
            )
        size = shard.stat().st_size
        if size < end:
            raise CheckpointError(
                f"Shard '{shard}' of checkpoint folder '{folder}' is truncated: it holds {size} bytes, and its index "
                f"places data up to byte {end}. Copy the folder again, or use another checkpoint (e.g. the previous "
                "epoch's)."
            )


def shard_failure(error: CheckpointException) -> str:
    """The first error behind a ``CheckpointException`` (one per rank that failed), as one line."""
    for failure in getattr(error, "failures", {}).values():
        cause = failure[0] if isinstance(failure, tuple) else failure
        return f"{type(cause).__name__}: {first_sentence(cause)}"
    return str(error).splitlines()[0]


def consolidate_main(argv: list[str] | None = None) -> int:
    """``mambaout consolidate FOLDER OUTPUT``."""
    parser = argparse.ArgumentParser(
        prog="mambaout consolidate",
        description="Write a sharded checkpoint folder (ModelParallelStrategy) as one checkpoint file, as "
        "save_distributed_checkpoint=false writes it. Reads the folder's pickled index: only for folders you trust.",
    )
    parser.add_argument("folder", help="the checkpoint folder (with meta.pt and *.distcp files)")
    parser.add_argument("output", help="the checkpoint file to write (must not exist)")
    args = parser.parse_args(argv)
    try:
        consolidate_checkpoint(args.folder, args.output)
    except (CheckpointError, OSError) as error:  # OSError: OutputWriteError (a full disk, a read-only folder)
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Wrote {args.output}.")
    return 0
