"""The command's own surface: --help lists every subcommand, --version names the versions."""

from __future__ import annotations

import lightning
import pytest
import timm
import torch

from mambaout_pl import __version__
from mambaout_pl.cli import TOOL_COMMANDS, main


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
