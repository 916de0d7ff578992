"""README.md as a user reads it: its Python blocks run as pasted, its commands name real recipes and parse,
its recipe table lists the recipes, and its install and test commands are the ones CI runs."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml
from markdown_blocks import code_blocks, shell_commands
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from mambaout_pl.cli import main

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
RECIPES = ROOT / "recipes"
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
DIGITS = [str(digit) for digit in range(10)]

# What some blocks print, found by a line of the block; a block none of these name only has to run.
EXPECTED_OUTPUT = {
    "features = model.forward_intermediates(torch.randn(1, 3, 224, 224), intermediates_only=True)": (
        "[(1, 48, 56, 56), (1, 96, 28, 28), (1, 192, 14, 14), (1, 288, 7, 7)]"
    ),
    'model = create_model("mambaout_femto", token_mixer=functools.partial(MyMixer, heads=4))': "torch.Size([1, 1000])",
    'official = create_model("vmamba_tiny_s1l8", pretrained="vssm1_tiny.pth")': (
        "[(1, 96, 56, 56), (1, 192, 28, 28), (1, 384, 14, 14), (1, 768, 7, 7)]"
    ),
    'model = timm.create_model("local-dir:exports/timm-example", pretrained=True).eval()': (
        f"{DIGITS} torch.Size([1, 10])"
    ),
}


def bash_commands() -> list[list[str]]:
    """Every command of README's bash blocks."""
    return [command for block in code_blocks(README, "bash") for command in shell_commands(block.text)]


def mambaout_commands() -> list[list[str]]:
    """README's ``mambaout`` / ``lightning`` commands (``srun`` / ``exec`` in front dropped), without the program."""
    commands = []
    for command in bash_commands():
        while command and command[0] in ("srun", "exec"):
            command = command[1:]
        if command and command[0] in ("mambaout", "lightning"):
            commands.append(command[1:])
    return commands


@pytest.mark.slow
def test_every_python_block_runs_as_pasted(tmp_path: Path) -> None:
    blocks = code_blocks(README, "python")
    assert len(blocks) >= 7
    listed = tmp_path / "blocks.json"
    listed.write_text(json.dumps([asdict(block) for block in blocks]))
    results_file = tmp_path / "results.json"
    script = Path(__file__).with_name("markdown_blocks.py")
    run = subprocess.run(
        [sys.executable, str(script), str(listed), str(tmp_path / "work"), str(results_file), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(results_file.read_text())
    failed = [f"README.md line {result['line']}:\n{result['error']}" for result in results if result["error"]]
    assert not failed, "\n".join(failed)
    for line, expected in EXPECTED_OUTPUT.items():
        (result,) = [result for result in results if line in result["text"]]
        assert expected in result["stdout"], (result["line"], result["stdout"][-2000:])
    (onnx,) = [result for result in results if "onnxruntime.InferenceSession" in result["text"]]
    assert onnx["stdout"].splitlines()[-1] in DIGITS  # the label the ONNX file gives the digit


def test_every_recipe_is_in_the_recipe_table() -> None:
    text = README.read_text()
    table = text[text.index("| recipe | what it trains |") :].split("\n\n", 1)[0]
    listed = re.findall(r"^\| `(recipes/[^`]+)` \|", table, flags=re.MULTILINE)
    shipped = [f"recipes/{path.name}" for path in sorted(RECIPES.glob("*.yaml"))]
    shipped += [f"recipes/{path.name}/" for path in sorted(RECIPES.iterdir()) if path.is_dir()]
    assert sorted(listed) == sorted(shipped)


def test_every_recipe_a_command_names_exists() -> None:
    named = {word for command in bash_commands() for word in command if word.startswith("recipes/")}
    assert "recipes/quickstart.yaml" in named
    missing = sorted(path for path in named if not (ROOT / path).exists())
    assert not missing, f"README's commands name recipes that do not exist: {missing}"


def test_the_lightning_commands_parse(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Each ``fit`` / ``validate`` / ``test`` / ``predict`` command whose recipes ship with the repository parses
    to the config it runs (``--print_config``); those naming a run's own ``config.yaml`` need that run."""
    monkeypatch.chdir(ROOT)
    parsed = []
    for command in mambaout_commands():
        configs = [command[i + 1] for i, word in enumerate(command) if word == "--config"]
        if command[0] not in LIGHTNING_SUBCOMMANDS or not all(config.startswith("recipes/") for config in configs):
            continue
        if "my_module.FocalLossTask" in command:  # needs README's my_module.py: tests/test_cli_working_folder.py
            continue
        with pytest.raises(SystemExit) as exit_:
            main([*command, "--print_config"])
        assert exit_.value.code in (0, None), (command, capsys.readouterr().err[-2000:])
        config = yaml.safe_load(capsys.readouterr().out)
        for option, value in zip(command, command[1:]):
            if option.startswith("--") and option != "--config" and not value.startswith("--"):
                assert given(dotted(config, option[2:]), value), (command, option)
        parsed.append(command)
    assert len(parsed) >= 15, parsed


def dotted(config: dict, key: str) -> object:
    """``config``'s value at ``a.b.c``, looking inside ``init_args`` as LightningCLI's options do."""
    value: object = config
    for part in key.split("."):
        assert isinstance(value, dict), key
        value = value[part] if part in value else value["init_args"][part]
    return value


def given(value: object, text: str) -> bool:
    """Whether a parsed config ``value`` is what the command-line ``text`` sets (a class by its name or path)."""
    if isinstance(value, dict) and "class_path" in value:
        return text in (value["class_path"], value["class_path"].rpartition(".")[2])
    return value == yaml.safe_load(text) or str(value) == text


def setup_command() -> list[list[str]]:
    """The commands of README's set-up block (the first bash block)."""
    return shell_commands(code_blocks(README, "bash")[0].text)


def test_the_setup_command_installs_the_package_alone_and_starts_the_quick_start() -> None:
    commands = setup_command()
    assert commands[0] == ["python3", "-m", "venv", ".venv"]
    assert [".", ".venv/bin/activate"] in commands
    assert ["pip", "install", "-e", "."] in commands  # no extras: the dev tools are the test command's
    assert commands[-1] == ["mambaout", "fit", "--config", "recipes/quickstart.yaml"]


def block_after(text: str) -> str:
    """The first bash block of README after the words ``text``."""
    line = README.read_text().split(text, 1)[0].count("\n") + 1
    return next(block.text for block in code_blocks(README, "bash") if block.line > line)


def test_ci_runs_the_readme_test_command() -> None:
    """Each line of README's test block is a line of ``.ci/run``, so CI runs what a user is told to."""
    lines = [line.strip() for line in block_after("Run the tests").splitlines() if line.strip()]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert any("pytest" in line for line in lines) and any("pip install" in line for line in lines)
    for line in lines:
        assert line in ci, f"{line!r} of README's test command is not run by .ci/run"


def test_the_test_command_installs_what_the_tests_import() -> None:
    """Every package a test imports is a dependency of ``.[dev]`` in pyproject.toml (or one of theirs, as
    installed here), or the test command's own ``--no-deps`` install."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["dev"]
    installed = requirement_closure([Requirement(text) for text in declared])
    no_deps = re.findall(r'--no-deps "?([\w.-]+)', block_after("Run the tests"))
    installed |= {canonicalize_name(name) for name in no_deps}
    local = {path.stem for path in Path(__file__).parent.glob("*.py")} | {"mambaout_pl"}
    providers = importlib.metadata.packages_distributions()
    missing = {}
    for module in sorted(imported_modules(Path(__file__).parent) - local - set(sys.stdlib_module_names)):
        distributions = {canonicalize_name(name) for name in providers.get(module, [])}
        if not distributions & installed:
            missing[module] = sorted(distributions)
    assert not missing, f"imported by the tests but not installed by the test command: {missing}"


def requirement_closure(requirements: list[Requirement]) -> set[str]:
    """The distributions ``requirements`` install, their own requirements included (as installed here)."""
    seen: set[str] = set()
    pending = [(requirement, "") for requirement in requirements]
    while pending:
        requirement, extra = pending.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        extras = sorted(requirement.extras)
        for wanted_extra in extras or [""]:
            key = f"{name}[{wanted_extra}]"
            if key in seen:
                continue
            seen.add(key)
            for text in importlib.metadata.distribution(name).requires or []:
                pending.append((Requirement(text), wanted_extra))
    return {key.split("[")[0] for key in seen}


def imported_modules(folder: Path) -> set[str]:
    """The top-level modules the ``*.py`` files of ``folder`` import, at any depth of their code (fallbacks in
    ``except`` clauses aside)."""
    modules = set()
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text())
        fallbacks = {
            id(node) for t in ast.walk(tree) if isinstance(t, ast.Try) for h in t.handlers for node in ast.walk(h)
        }
        for node in ast.walk(tree):
            if id(node) in fallbacks:  # `except ImportError: import other` names a module this Python may lack
                continue
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules
