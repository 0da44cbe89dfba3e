"""The package's import graph has no cycle: every module of src/trimtune imports, and the graph
of its ``trimtune`` imports (read with ``ast``) is acyclic, module-level imports strictly and
function-level (lazy) ones too, but for the few lazy edges listed in :data:`LAZY_UPWARD`."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import trimtune

ROOT = Path(trimtune.__file__).parent

#: lazy imports that point up on purpose (a plug-in looked up at call time), each with why.
#: Anything else that closes a cycle fails the test.
LAZY_UPWARD = {
    # an arch record of a segmenter (backbone + decode head) is rebuilt by the model factory
    ("trimtune.models.factory", "trimtune.heads.segmentation"),
    # FinetuneConfig checks task options with the task that owns them (trimtune.segment)
    ("trimtune.finetune_config", "trimtune.segment"),
}


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _targets(node: ast.AST, module: str, is_pkg: bool) -> set[str]:
    """The trimtune modules one import statement reads (``from .x import y``: ``x.y`` if that
    is a module, else ``x``)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in MODULES}
    if not isinstance(node, ast.ImportFrom):
        return set()
    if node.level:
        base = module.split(".") if is_pkg else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    found = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES}
    if len(found) < len(node.names) and target in MODULES:
        found.add(target)
    return found


def import_graph(lazy: bool) -> dict[str, set[str]]:
    """``{module: modules it imports}``; ``lazy``: include imports inside functions."""
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        is_pkg = path.name == "__init__.py"
        nodes = []
        for top in tree.body:
            if isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not lazy:
                continue
            nodes += list(ast.walk(top))
        graph[module] = {t for n in nodes for t in _targets(n, module, is_pkg)} - {module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        path.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_imports(module):
    importlib.import_module(module)


def test_module_level_imports_are_acyclic():
    cycle = find_cycle(import_graph(lazy=False))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_lazy_imports_close_no_cycle_but_the_listed_ones():
    graph = import_graph(lazy=True)
    for a, b in LAZY_UPWARD:
        assert b in graph[a], f"{a} no longer imports {b}: drop it from LAZY_UPWARD"
        graph[a].discard(b)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle (lazy imports included): " + " -> ".join(cycle)


@pytest.mark.parametrize("low, high", [("trimtune.runs", "trimtune.tasks"),
                                       ("trimtune.lowrank.io", "trimtune.lowrank.compress")])
def test_the_lower_of_each_pair_never_imports_the_upper(low, high):
    graph = import_graph(lazy=True)
    assert high not in graph[low] and low in graph[high]


def test_the_checker_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
