"""The layers import one way: models <- service <- trainer (the CLI, in trainer/, sits on top).

Parsed with `ast` from the source folders (nothing is imported): every `import` and `from ... import`, also those
inside functions, except under `if TYPE_CHECKING:`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"models": "gramrec.models", "trainer": "gramrec.trainer", "service": "gramrec.service"}
LAYER = {"gramrec.models": 0, "gramrec.service": 1, "gramrec.trainer": 2}


def module_files() -> dict[str, Path]:
    modules = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


MODULES = module_files()


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported_names(path: Path) -> set[str]:
    """Every module name this file imports (a `from package import name` counts name when it is a module)."""
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree) if _type_checking_only(node) for n in ast.walk(node)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in MODULES}
    return names


GRAPH = {module: {n for n in imported_names(path) if n in MODULES and n != module} for module, path in MODULES.items()}


def top_package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_the_graph_is_read():
    assert "gramrec.service.app" in GRAPH and "gramrec.trainer.retrain.job" in GRAPH
    assert "gramrec.service.store" in GRAPH["gramrec.service.app"]


def test_every_import_uses_the_gramrec_namespace():
    """No source imports the folders as top-level packages (`import service...`): they install as gramrec.*."""
    stray = {
        f"{module}: {name}"
        for module, path in MODULES.items()
        for name in imported_names(path)
        if name.split(".")[0] in FOLDERS
    }
    assert not stray


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module):
    """models imports neither service nor trainer; the service never imports the trainer."""
    upward = {name for name in GRAPH[module] if LAYER[top_package(name)] > LAYER[top_package(module)]}
    assert not upward, f"{module} imports a higher layer: {sorted(upward)}"


def test_no_module_import_cycles():
    """No module reaches itself through imports (lazy imports inside functions included)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for name in sorted(GRAPH[module]):
            if state.get(name) == 1:
                cycles.append(path[path.index(name):] + [name])
            elif name not in state:
                visit(name, [*path, name])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_no_cycles_between_folders():
    """The top-level folders form a DAG (inside one, test_no_module_import_cycles keeps the modules acyclic)."""
    def folder(module: str) -> str:
        path = MODULES[module]
        return module if path.name == "__init__.py" else module.rpartition(".")[0]

    edges = {(folder(a), folder(b)) for a, names in GRAPH.items() for b in names if folder(a) != folder(b)}
    top = {(top_package(a), top_package(b)) for a, b in edges if top_package(a) != top_package(b)}
    assert not {(a, b) for a, b in top if (b, a) in top}


def test_the_wheel_lists_every_package():
    """pyproject.toml names the packages (package-dir maps them); a new subpackage must be added there."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {f"gramrec.{folder}": folder for folder in FOLDERS}
    on_disk = {module for module, path in MODULES.items() if path.name == "__init__.py"}
    assert set(config["packages"]) == on_disk
