"""No two modules in launch/ import each other, directly or through a cycle.

The graph is read from the source with `ast`, so an import hidden inside a
function counts as much as one at the top: a cycle is a cycle whether Python
happens to resolve it at import time or later.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "launch"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module a dotted import name lands in (`launch.a.b.func` -> `launch.a.b`)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                if not is_package:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from launch.x import y` may name the submodule launch.x.y or a symbol of launch.x.
            names = [f"{prefix}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if not name.startswith("launch"):
                continue
            target = _resolve(name, modules)
            if target and target != module:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def _path_through(graph: dict[str, set[str]], component: list[str]) -> str:
    """One concrete loop inside a component, for the failure message: a -> b -> a."""
    members = set(component)
    start = component[0]
    path = [start]
    seen = {start}
    current = start
    while True:
        nxt = sorted(graph[current] & members)
        back = [n for n in nxt if n == start]
        if back and len(path) > 1:
            return " -> ".join(path + [start])
        fresh = [n for n in nxt if n not in seen]
        if not fresh:
            return " -> ".join(path + [nxt[0]]) if nxt else " -> ".join(path)
        current = fresh[0]
        seen.add(current)
        path.append(current)


def test_graph_sees_function_level_imports():
    graph = import_graph()
    assert graph, "no modules found under launch/"
    assert "launch.config.schema" in graph["launch.config.validate"]


def test_no_import_cycles_in_launch():
    graph = import_graph()
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in launch/:\n" + "\n".join(_path_through(graph, c) for c in cycles)


def test_cycle_finder_names_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    (component,) = find_cycles(graph)
    assert component == ["a", "b", "c"]
    assert _path_through(graph, component) == "a -> b -> c -> a"


def test_the_heavy_packages_the_cli_test_checks_are_named_lazy():
    """launch.LAZY is where a reader learns which imports stay inside functions; the CLI test checks them."""
    import launch
    from tests.conftest import HEAVY

    assert set(HEAVY) <= set(launch.LAZY)
