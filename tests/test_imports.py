"""dali_float's modules import one another without a cycle (read statically, nothing is imported).

The graph has an edge a -> b for every import of b in a's source, wherever it stands: at the top, inside a
function (lazy imports count: they are the easy way to hide a cycle), under `if TYPE_CHECKING`.
`from dali_float.x import y` is an edge to dali_float.x.y where that is a module, to dali_float.x otherwise;
relative imports are resolved against the importing module's package. An edge goes to the module named,
not to the packages above it. Imports by a computed name (importlib.import_module(f"...")) are not seen.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dali_float"

# Cycles known and being fixed elsewhere, each exactly the set of modules of its strongly connected component.
# Nothing else is exempt: any other cycle fails, and so does an entry here once its cycle is gone.
def module_files(package: Path) -> dict[str, Path]:
    """Module name -> file, for every .py under `package` (a package's __init__.py is the package)."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    path = modules.get(name)
    return path is None or path.name == "__init__.py"  # None: a folder without __init__.py (namespace package)


def imported_modules(name: str, source: str, modules: dict[str, Path]) -> set[str]:
    """The modules of `modules` that the module `name` (its source) imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing module's package, one level up per extra dot
                package = name.split(".") if _is_package(name, modules) else name.split(".")[:-1]
                package = package[:len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` where only a.b is ours
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports."""
    modules = module_files(package)
    return {name: imported_modules(name, path.read_text(), modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle: one per strongly connected component of more than one module (Tarjan's
    algorithm, iterative), as a closed walk a -> b -> ... -> a through all its modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(component)
    return [_path_through(component, graph) for component in components]


def _path_through(component: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A closed walk a -> ... -> a through every module of the component (a: its first by name): each
    time a shortest way on to the nearest module not yet visited, then the shortest way back to a."""
    start = min(component)
    walk, seen = [start], {start}
    while seen != component:
        route = _shortest_way(walk[-1], component - seen, component, graph)
        walk += route
        seen.update(route)
    return walk + _shortest_way(walk[-1], {start}, component, graph)


def _shortest_way(origin: str, goals: set[str], component: set[str], graph: dict[str, set[str]]) -> list[str]:
    """The modules after `origin` on a shortest way inside the component to one of `goals` (breadth-first;
    there is one: the component is strongly connected)."""
    came_from: dict[str, str] = {}
    todo = [origin]
    while True:
        ahead = []
        for here in todo:
            for m in sorted(graph[here]):
                if m in component and m not in came_from and m != origin:
                    came_from[m] = here
                    if m in goals:
                        way = [m]
                        while came_from[way[-1]] != origin:
                            way.append(came_from[way[-1]])
                        return way[::-1]
                    ahead.append(m)
        todo = ahead


def _describe(found: list[list[str]]) -> str:
    return "\n".join(f"  {{{', '.join(sorted(set(c)))}}}: {' -> '.join(c)}" for c in found)


def test_dali_float_has_no_import_cycle():
    found = cycles(import_graph())
    assert not found, f"{len(found)} import cycle(s) in dali_float:\n{_describe(found)}"


def test_the_graph_sees_lazy_submodule_and_relative_imports(tmp_path):
    """The reader itself: a cycle made only of an import inside a function, one of `from pkg import sub`,
    and one relative import is found and named; an import of an outside module is not an edge."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import os\n\ndef f():\n    from pkg.sub import b\n    return b\n")
    (pkg / "sub" / "b.py").write_text("from . import c\n")
    (pkg / "sub" / "c.py").write_text("from ..a import f\nimport pkg.sub\n")
    (pkg / "d.py").write_text("import pkg.a\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.sub.b"}
    assert graph["pkg.sub.b"] == {"pkg.sub.c"}
    assert graph["pkg.sub.c"] == {"pkg.a", "pkg.sub"}
    assert cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.sub.c", "pkg.a"]]
    assert "pkg.a -> pkg.sub.b -> pkg.sub.c -> pkg.a" in _describe(cycles(graph))
    # a component that no single loop covers: the walk names every module of it
    graph = {"x": {"y"}, "y": {"x", "z"}, "z": {"y"}, "w": {"x"}}
    assert cycles(graph) == [["x", "y", "z", "y", "x"]]
