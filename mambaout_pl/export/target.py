"""Export folders: what ``--overwrite`` may replace, and writing one whole or not at all."""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mambaout_pl.errors import ExportError
from mambaout_pl.training.atomic import staged_folder
from mambaout_pl.training.reservation import reserve_outputs

#: The file an export writes last, listing every file it wrote: what ``--overwrite`` may replace.
EXPORT_MANIFEST = "export_manifest.json"


@contextmanager
def staged_export(target: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary folder beside ``target`` to write an export into, renamed onto ``target`` at the end
    with a manifest of its files.

    ``target`` is reserved for this command meanwhile (``.<name>.export.lock`` beside it): a second
    export to the same folder refuses, naming the command writing it, instead of replacing its
    export. What an export that was killed left beside ``target`` is cleaned up first (see
    :func:`clean_interrupted_export`). ``target`` is checked (see :func:`check_export_target`) before
    and again right before the rename, should anything else have written there meanwhile.
    """
    lock = target.with_name(f".{target.name}.export.lock")
    with reserve_outputs(lock, target, "give another output folder"):
        clean_interrupted_export(target)
        check_export_target(target, overwrite)
        with staged_folder(target, replace=True) as staging:
            yield staging
            manifest = {
                "library_name": "mambaout-pl",
                "files": sorted([path.name for path in staging.iterdir()] + [EXPORT_MANIFEST]),
            }
            (staging / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2))
            check_export_target(target, overwrite)


def clean_interrupted_export(target: Path) -> list[Path]:
    """Clean up what exports of ``target`` that were killed left beside it; returns the folders removed.

    An export writes into ``.<name>.<random>.staging`` and, with ``--overwrite``, renames the earlier
    export to ``.<name>.replaced-<random>`` before renaming the staged folder onto ``target``. A kill
    leaves these folders behind; a kill between the two renames leaves no ``target`` at all: the
    earlier export is then renamed back to ``target`` (it was never replaced). Staged folders and
    replaced exports beside an existing ``target`` are removed, with a warning naming them. Call it
    only while holding the export's reservation of ``target``: no other export is writing them then.
    """
    staged = _beside(target, rf"\.{re.escape(target.name)}\.[a-z0-9_]{{8}}\.staging")
    replaced = _beside(target, rf"\.{re.escape(target.name)}\.replaced-[0-9a-f]{{8}}")
    if not target.exists() and not target.is_symlink() and replaced:
        earlier = max(replaced, key=lambda folder: folder.stat().st_mtime_ns)
        earlier.rename(target)
        replaced.remove(earlier)
        warnings.warn(
            f"An export to '{target}' was killed while it replaced the earlier export there, which it had moved to "
            f"'{earlier}': that earlier export is back in '{target}'.",
            stacklevel=2,
        )
    removed = []
    for folder in [*staged, *replaced]:
        shutil.rmtree(folder)
        removed.append(folder)
    if removed:
        warnings.warn(
            f"Removed what exports to '{target}' that were killed left beside it: "
            f"{', '.join(repr(folder.name) for folder in removed)}.",
            stacklevel=2,
        )
    return removed


def _beside(target: Path, pattern: str) -> list[Path]:
    """The folders beside ``target`` whose names match ``pattern`` (links and files are never touched)."""
    if not target.parent.is_dir():
        return []
    return sorted(
        entry
        for entry in target.parent.iterdir()
        if re.fullmatch(pattern, entry.name) and entry.is_dir() and not entry.is_symlink()
    )


def check_export_target(target: Path, overwrite: bool) -> None:
    """Refuse an export target that is a link or a file, and one whose content an export would lose.

    A folder is replaced only with ``overwrite`` and only when it is an earlier export (it has the
    :data:`EXPORT_MANIFEST` an export writes) holding nothing but the files that export listed:
    never a run folder with checkpoints, nor anything else the export did not write.
    """
    if target.is_symlink():
        raise ExportError(
            f"Export target '{target}' is a symbolic link to '{os.readlink(target)}'. An export replaces its "
            f"folder in one rename, which would replace the link: give the folder it points to "
            f"('{target.resolve()}') or another path."
        )
    if target.exists() and not target.is_dir():
        raise ExportError(f"Export target '{target}' is a file; give a folder path.")
    contents = (
        sorted(entry.name + ("/" if entry.is_dir() else "") for entry in target.iterdir()) if target.is_dir() else []
    )
    if not contents:
        return
    listed = _listed_export_files(target)
    if listed is None:
        raise ExportError(
            f"Export target '{target}' is not empty and is not an earlier export (it has no {EXPORT_MANIFEST}): it "
            f"holds {_summary(contents)}. `mambaout export` never replaces such a folder, --overwrite included; "
            "give a new or empty folder."
        )
    foreign = [name for name in contents if name.rstrip("/") not in listed]
    if foreign:
        raise ExportError(
            f"Export target '{target}' holds an earlier export and {_summary(foreign)}, which that export did not "
            "write. Move them away or give another folder; --overwrite replaces only what an export wrote."
        )
    if not overwrite:
        raise ExportError(f"Export target '{target}' holds an earlier export; pass --overwrite to replace it.")


def _listed_export_files(folder: Path) -> set[str] | None:
    """The file names an earlier export in ``folder`` listed in its manifest, or None when it has none."""
    try:
        manifest = json.loads((folder / EXPORT_MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
        return None
    return set(files)


def _summary(names: list[str], shown: int = 8) -> str:
    checkpoints = [name for name in names if name.endswith(".ckpt") or name.rstrip("/") == "checkpoints"]
    text = ", ".join(f"'{name}'" for name in names[:shown]) + (
        f" and {len(names) - shown} more" if len(names) > shown else ""
    )
    return f"{len(names)} entries ({text})" + (" including checkpoints" if checkpoints else "")
