"""No import cycles anywhere in the package: every module of every subpackage, and the top-level ones.

Every import counts, also one inside a function (a lazy import is still a dependency: the cycle is
only hidden until both modules are loaded); imports under ``if TYPE_CHECKING:`` do not. A module's
parent package is not counted as imported by it. The graph is read from the source (nothing is
imported), and the cycles are the strongly connected components of more than one module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import napari_medplib

PACKAGE = Path(napari_medplib.__file__).resolve().parent


def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(inner) for stmt in node.body for inner in ast.walk(stmt))
    return skipped


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, modules) -> list[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = module.split(".") if is_package else module.split(".")[:-1]
        if node.level:
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names]
    out = []
    for name in names:
        while name and name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in modules and name != module:
            out.append(name)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (anywhere in its source)."""
    modules = _modules()
    graph = {}
    for module, (path, is_package) in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skipped = _type_checking_nodes(tree)
        graph[module] = {
            target
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in skipped
            for target in _targets(module, is_package, node, modules)
        }
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
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
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "napari_medplib.families.registry" in graph["napari_medplib.engine.session"]
    assert "napari_medplib.families.medplib.adapter" in graph["napari_medplib.families.medplib"]  # in a function
    assert "napari_medplib.kernels.dispatch" in graph["napari_medplib.model.moe"]
    assert "napari_medplib.train.synth" in graph["napari_medplib.train.data"]  # in a function
    assert "napari_medplib.demo" in graph["napari_medplib.cli"]  # in a function
    assert "napari_medplib.ui.widget" not in graph["napari_medplib.ui.segment"]  # under TYPE_CHECKING
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_graph_covers_every_subpackage():
    graph = import_graph()
    packages = {".".join(path.parent.relative_to(PACKAGE.parent).parts) for path in PACKAGE.rglob("__init__.py")}
    assert len(packages) > 10 and packages <= set(graph)
    assert {"napari_medplib", "napari_medplib.cli", "napari_medplib.train.conversations", "napari_medplib.ui.pickers",
            "napari_medplib.batch.task", "napari_medplib.serve"} <= set(graph)


def test_no_import_cycles_in_the_package():
    bad = cycles(import_graph())
    assert not bad, "import cycles: " + "; ".join(" <-> ".join(c) for c in bad)
