"""The installed ``mambaout`` command imports the user's own modules from the working folder, as
``python -m mambaout_pl`` does, while a class path read from a checkpoint still imports nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import tiny_run_args
from markdown_blocks import code_blocks, shell_commands

from mambaout_pl.training.resume import CHECKPOINT_KEY

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
MAMBAOUT = Path(sys.executable).parent / "mambaout"  # the console script pip installed
# Appended to README's module: each process that imports it leaves a file named after its id.
IMPORT_MARKER = '\nimport os as _os\nfrom pathlib import Path as _Path\n_Path(f"imported-by-{_os.getpid()}").touch()\n'


def readme_task_module() -> str:
    """README's Python block that defines ``FocalLossTask``: the ``my_module.py`` of its example."""
    (block,) = [block for block in code_blocks(README, "python") if "class FocalLossTask(" in block.text]
    return block.text


def readme_command(option: str) -> list[str]:
    """README's ``mambaout`` command that passes ``option``, as an argument list without the program."""
    (command,) = [
        command
        for block in code_blocks(README, "bash")
        for command in shell_commands(block.text)
        if command[0] == "mambaout" and option in command
    ]
    return command[1:]


def run_mambaout(arguments: list[str], folder: Path) -> subprocess.CompletedProcess[str]:
    """The console script in ``folder``, with nothing of ``folder`` on ``PYTHONPATH``."""
    environment = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    return subprocess.run(
        [str(MAMBAOUT), *arguments], cwd=folder, env=environment, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_console_script_fits_a_task_of_the_working_folder_and_refuses_it_from_a_checkpoint(
    image_folder: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "my_module.py").write_text(readme_task_module() + IMPORT_MARKER)
    (folder / "recipes").symlink_to(ROOT / "recipes", target_is_directory=True)
    fit_command = readme_command("my_module.FocalLossTask")
    assert fit_command[:3] == ["fit", "--config", "recipes/quickstart.yaml"]

    fit = run_mambaout(
        [*fit_command, *tiny_run_args(tmp_path / "runs", image_folder, "--trainer.enable_model_summary=false")], folder
    )

    assert fit.returncode == 0, fit.stderr[-3000:]
    (run,) = (tmp_path / "runs" / "lightning_logs").iterdir()
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["class_path"] == "my_module.FocalLossTask"
    checkpoint_path = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    assert checkpoint[CHECKPOINT_KEY]["task"] == "my_module.FocalLossTask"
    imported = sorted(path.name for path in folder.glob("imported-by-*"))
    assert len(imported) == 1  # the fit imported README's module from its working folder

    # The recipe names ClassificationTask; the checkpoint's task class is data, and its module is not imported.
    validate = run_mambaout(
        ["validate", "--config", "recipes/quickstart.yaml", f"--ckpt_path={checkpoint_path}"]
        + tiny_run_args(tmp_path / "validate", image_folder, "--trainer.enable_model_summary=false"),
        folder,
    )

    assert validate.returncode == 2, validate.stderr[-3000:]
    last_line = validate.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: Refusing 'my_module.FocalLossTask'"), last_line
    assert str(checkpoint_path) in last_line
    assert sorted(path.name for path in folder.glob("imported-by-*")) == imported
