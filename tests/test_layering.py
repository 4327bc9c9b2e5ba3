"""The import graph keeps its shape: pipeline -> exporters -> (nothing of ours), pipeline -> models, no circles.

The graph is read from the source (every ``import``, at module level or inside
functions), so a lazy import cannot hide an arrow the wrong way.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "exporters", "models")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imports_of(path: Path, modules: dict[str, Path], top_level_only: bool = False) -> set[str]:
    """The project modules ``path`` imports (``from a.b import c`` counts as a.b.c when that is a module)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # `import a.b.c` of a non-module attribute: its module
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def test_the_graph_is_read_from_the_source(graph):
    # a check that finds nothing proves nothing: the graph has the arrows we know are there
    assert "exporters.errors" in graph["pipeline.errors"]
    assert "models.registry" in graph["models"]
    assert "pipeline.stages.base" in graph["pipeline.stages.fuse"]
    assert "pipeline.methods.base" in graph["pipeline.methods.kdiffusion"]


@pytest.mark.parametrize("lower,forbidden", [("models", ("pipeline", "exporters")), ("exporters", ("pipeline",))])
def test_dependencies_point_one_way(graph, lower, forbidden):
    wrong = sorted(f"{src} -> {dst}" for src, targets in graph.items() if src.split(".")[0] == lower
                   for dst in targets if dst.split(".")[0] in forbidden)
    assert not wrong, "imports against the layering (models <- exporters <- pipeline):\n" + "\n".join(wrong)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the import circles (components of more than one module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_no_import_circles(graph):
    assert strongly_connected(graph) == []


def test_the_circle_finder_finds_circles():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("entry", ["exporters.runtime", "exporters.verify", "exporters.bench"])
def test_the_shipped_runtime_imports_no_torch(entry):
    """The device commands' modules (predict, verify, bench) and every project module they load at import time
    import neither torch nor pipeline."""
    modules = project_modules()
    seen, todo = set(), [entry]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += imports_of(modules[name], modules, top_level_only=True)
    heavy = sorted(name for name in seen
                   if {"torch", "torchvision"} & {n.split(".")[0] for n in _external_imports(modules[name])})
    assert not heavy, f"the runtime loads torch through {heavy}"
    assert not any(name.startswith("pipeline") for name in seen), sorted(seen)


def _external_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module)
    return names
