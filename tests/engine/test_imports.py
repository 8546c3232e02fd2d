"""`engine/` has no import cycle: every module imports on its own, and the graph of the imports
between engine modules (read from the source: module level, inside functions and under
TYPE_CHECKING alike) has no cycle."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENGINE = ROOT / "engine"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ENGINE.rglob("*.py"))}


def _resolve(name: str) -> str | None:
    """The engine module `name` names, or None when it is outside engine."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    """The engine modules `module` imports anywhere in its source."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from engine import kernels` imports the module engine.kernels; a name that is not
            # a module comes from the package itself
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names
            ]
        else:
            continue
        for name in names:
            target = _resolve(name) if name.startswith("engine") else None
            if target is not None and target != module:
                found.add(target)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_the_imports_it_should():
    """The analysis finds what the stepper's modules are known to import."""
    assert {"engine.lane", "engine.decoder", "engine.static_step"} <= imports_of("engine.batch")
    assert "engine.batch" in imports_of("engine.token_stream")
    assert "engine.kernels" in imports_of("engine.settings")  # imported inside a function


def test_no_import_cycle_between_engine_modules():
    graph = {m: imports_of(m) for m in MODULES}
    # The package's __init__ opens `engine.model` lazily (module __getattr__) for cheap
    # `from engine import LoadOptions`; an import of any engine module runs __init__ first, but
    # that is Python's package machinery, not a dependency of the module on the package.
    graph["engine"] = imports_of("engine")
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_engine_module_imports(module):
    importlib.import_module(module)
