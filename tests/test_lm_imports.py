"""app/lm's modules import each other without cycles, lazy imports inside functions included, and the plain backend
(`hf.py`) knows nothing of the fast path or the batch scheduler built on top of it."""
from __future__ import annotations

import ast
from pathlib import Path

import app.lm

PACKAGE = "app.lm"
FOLDER = Path(app.lm.__file__).parent


def module_name(path: Path) -> str:
    return PACKAGE if path.name == "__init__.py" else f"{PACKAGE}.{path.stem}"


def imports_of(path: Path) -> set[str]:
    """Modules of app.lm that ``path`` imports anywhere in its body (top level or inside a function)."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            # `from . import x` (or `from app.lm import x`) imports the submodule x when there is one
            names = [f"{base}.{alias.name}" if (FOLDER / f"{alias.name}.py").exists() and base == PACKAGE else base
                     for alias in node.names]
        else:
            continue
        found.update(n for n in names if n == PACKAGE or n.startswith(PACKAGE + "."))
    found.discard(here)
    return found


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(FOLDER.glob("*.py"))}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if state.get(nxt) is None and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state.get(node) is None and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "app.lm.decoding" in graph["app.lm.hf"]  # top level, relative
    assert {"app.lm.hf", "app.lm.batching", "app.lm.fast", "app.lm.remote"} <= graph["app.lm"]  # inside load_lm
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycles_in_app_lm():
    graph = import_graph()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_layers_point_one_way():
    graph = import_graph()
    assert graph["app.lm.decoding"] <= {"app.lm.base", "app.lm.packed", "app.lm.prefix_cache"}  # the shared leaf
    assert not {m for m in graph["app.lm.packed"] if m.startswith("app.")}  # packed passes: transformers only
    assert not graph["app.lm.hf"] & {"app.lm.fast", "app.lm.batching", "app.lm"}  # the fast path is attached by load_lm
    for top in ("app.lm.fast", "app.lm.batching"):
        assert "app.lm" not in graph[top] and not graph[top] & {"app.lm.fast", "app.lm.batching"} - {top}
