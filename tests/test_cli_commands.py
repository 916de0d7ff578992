"""The command's own surface: --help lists every subcommand, --version names the versions."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning
import pytest
import timm
import torch

from mambaout_pl import __version__
from mambaout_pl.cli import SUBCOMMAND_HELP, TOOL_COMMANDS, main


def test_help_lists_lightning_and_tool_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("fit", "validate", "test", "predict", *TOOL_COMMANDS):
        assert f"  {name} " in out, name


def test_no_subcommand_prints_the_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "export" in capsys.readouterr().out


def test_version_names_the_package_and_its_main_dependencies(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    out = capsys.readouterr().out.strip()
    assert (
        out
        == f"mambaout-pl {__version__} (torch {torch.__version__}, lightning {lightning.__version__}, timm {timm.__version__})"
    )


def test_help_gives_each_subcommand_one_whole_sentence_and_the_version_option(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the descriptions
    for name, text in SUBCOMMAND_HELP.items():
        assert text.endswith(".") and text.count(". ") == 0, name
        assert f" {name} {text} " in out, name
    assert "It's separated from fit" not in out and "-V, --version Print the versions and exit." in out


@pytest.mark.parametrize("command", [[sys.executable, "-m", "mambaout_pl"], [shutil.which("mambaout")]])
def test_the_commands_help_and_version_write_nothing_to_stderr(command: list[str]) -> None:
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    shown = subprocess.run([*command, "--help"], capture_output=True, text=True, env=environment, check=True)
    assert shown.stderr == ""  # no LightningCLI warning about both `args` and sys.argv
    assert "{fit,validate,test,predict}" in shown.stdout and "demo" in shown.stdout
    if command[0] == sys.executable:  # the same main() behind both: one --version is enough
        return
    version = subprocess.run([*command, "--version"], capture_output=True, text=True, env=environment, check=True)
    assert version.stdout.startswith(f"mambaout-pl {__version__} (torch ") and version.stderr == ""
