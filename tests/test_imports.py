"""Every mambaout_pl module imports on its own, and mambaout_pl.models has no import cycle."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import mambaout_pl

PACKAGE_ROOT = Path(mambaout_pl.__file__).parent


def module_names() -> dict[str, Path]:
    """Dotted name -> file of every module of mambaout_pl (packages by their `__init__`)."""
    names = {}
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        parts = ("mambaout_pl",) + path.relative_to(PACKAGE_ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The mambaout_pl modules `name` imports anywhere in its file, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from package import name` imports the submodule `name` if there is one, else the package
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            longest = next(
                (".".join(parts[:end]) for end in range(len(parts), 0, -1) if ".".join(parts[:end]) in known), None
            )
            if longest is not None and longest != name:
                found.add(longest)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of `graph` as a list of nodes (first repeated at the end), or [] when there is none."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        stack.append(node)
        for successor in sorted(graph.get(node, ())):
            if state.get(successor) == "open":
                return stack[stack.index(successor) :] + [successor]
            if successor not in state:
                cycle = visit(successor)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_find_cycle_finds_the_registry_weights_kind_of_cycle():
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle_in_models():
    modules = module_names()
    models = {name: path for name, path in modules.items() if name.startswith("mambaout_pl.models")}
    graph = {name: imported_modules(name, path, set(models)) for name, path in models.items()}
    assert "mambaout_pl.models.weights" in graph["mambaout_pl.models.registry"]
    assert "mambaout_pl.models.registry" in graph["mambaout_pl.models.backbones"]
    assert not graph["mambaout_pl.models.weights"]
    cycle = find_cycle(graph)
    assert not cycle, f"import cycle: {' -> '.join(cycle)}"


@pytest.mark.slow
def test_every_module_imports_first_on_its_own():
    script = (
        "import importlib, sys\n"
        f"names = {sorted(module_names())!r}\n"
        "for name in names:\n"
        "    for loaded in [m for m in sys.modules if m == 'mambaout_pl' or m.startswith('mambaout_pl.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
        "print(len(names))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=PACKAGE_ROOT.parent,
        env=None,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[-1]) == len(module_names()) > 20


def package_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}


def test_no_import_cycle_in_the_package():
    # A package's `__init__` re-exports its modules; an edge into it stands for the module it re-exports.
    graph = package_graph()
    packages = {name for name, path in module_names().items() if path.name == "__init__.py"}
    modules_only = {
        name: {t for t in targets if t not in packages} for name, targets in graph.items() if name not in packages
    }
    cycle = find_cycle(modules_only)
    assert not cycle, f"import cycle: {' -> '.join(cycle)}"


def test_layers_import_only_what_they_may():
    """Models know nothing of Lightning, data or tasks; tasks meet data only through the batch contract."""
    graph = package_graph()
    for name, targets in graph.items():
        if name.startswith("mambaout_pl.models"):
            assert not {
                t
                for t in targets
                if t.startswith(("mambaout_pl.data", "mambaout_pl.tasks", "mambaout_pl.training", "mambaout_pl.cli"))
            }, name
            source = module_names()[name].read_text()
            assert "import lightning" not in source and "from lightning" not in source, name
        if name.startswith("mambaout_pl.tasks"):
            assert {t for t in targets if t.startswith("mambaout_pl.data")} <= {"mambaout_pl.data.batches"}, name
        if name.startswith("mambaout_pl.data"):
            assert not {
                t for t in targets if t.startswith(("mambaout_pl.tasks", "mambaout_pl.models", "mambaout_pl.cli"))
            }, name


def third_party_packages(path: Path) -> set[str]:
    """The top-level package of every module the file at `path` imports (`lightning` for `lightning.pytorch`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


def test_export_reads_tasks_and_models_know_neither():
    """Export imports tasks and models; no task imports export; no model imports tasks, export or Lightning."""
    graph = package_graph()
    assert "mambaout_pl.tasks.base" in graph["mambaout_pl.export.hub"]
    assert "mambaout_pl.tasks.export_spec" in graph["mambaout_pl.tasks.base"]
    assert "lightning" in third_party_packages(module_names()["mambaout_pl.tasks.base"])
    lightning = {"lightning", "lightning_utilities", "pytorch_lightning"}
    for name, targets in graph.items():
        if name.startswith("mambaout_pl.tasks"):
            assert not {t for t in targets if t.startswith("mambaout_pl.export")}, name
        if name.startswith("mambaout_pl.models"):
            assert not {t for t in targets if t.startswith(("mambaout_pl.tasks", "mambaout_pl.export"))}, name
            assert not third_party_packages(module_names()[name]) & lightning, name
