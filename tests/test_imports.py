"""The import graph of our packages, read from the source with `ast` (imports inside functions included, so a
circle cannot hide behind a late import): no circles, and the layers keep their direction."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("glip_io", "tasks", "backbone", "adapt", "benchmarks")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of ours it imports (the most specific module each import names)."""
    files = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this module's package
                    package = name.split(".") if is_package else name.split(".")[:-1]
                    base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module
                # `from pkg import sub` imports the submodule when there is one
                targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names)
        graph[name] = {_ours(t, files) for t in targets if _ours(t, files)} - {name}
    return graph


def _ours(target: str, files: dict) -> str | None:
    while target and target not in files:
        target = target.rpartition(".")[0]
    return target or None


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or in a loop (Tarjan's strongly connected
    components of more than one module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
            if len(group) > 1:
                found.append(sorted(group))

    for start in sorted(graph):
        if start not in index:
            visit(start)
    return found


def test_the_graph_is_read_from_the_source():
    graph = import_graph()  # spot checks, so that an empty graph cannot pass the tests below
    assert "backbone.config" in graph["backbone.model"] and "glip_io" in graph["backbone.checkpoints"]
    assert "tasks.coco" in graph["tasks.task"] or "tasks.coco" in graph["tasks.registry"]
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_itself_back():
    found = circles(import_graph())
    assert not found, "modules that import each other: " + "; ".join(" <-> ".join(group) for group in found)


@pytest.mark.parametrize("package, allowed", [("glip_io", {"glip_io"}), ("tasks", {"tasks", "glip_io"}),
                                              ("backbone", {"backbone", "glip_io"}),
                                              ("adapt", {"adapt", "backbone", "tasks", "glip_io"})])
def test_layers_import_only_downwards(package, allowed):
    wrong = sorted(f"{module} -> {target}" for module, targets in import_graph().items()
                   if module.split(".")[0] == package for target in targets if target.split(".")[0] not in allowed)
    assert not wrong, f"{package} may import only {sorted(allowed)}: " + ", ".join(wrong)
