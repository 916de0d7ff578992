"""Hub export and push; the code lives in :mod:`mambaout_pl.export.hub` (this path stays for recipes and scripts)."""

from mambaout_pl.errors import ExportError
from mambaout_pl.export.hub import (
    PushToHubCallback,
    export_checkpoint,
    export_main,
    push_checkpoint,
    push_main,
    read_task_checkpoint,
    task_from_checkpoint,
    write_export,
)

__all__ = [
    "ExportError",
    "PushToHubCallback",
    "export_checkpoint",
    "export_main",
    "push_checkpoint",
    "push_main",
    "read_task_checkpoint",
    "task_from_checkpoint",
    "write_export",
]
