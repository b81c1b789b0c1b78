"""The import graph of cache/, proxy/ and bench/: no cycle, and an engine that knows no HTTP.

Every import statement counts, wherever it is: at the top, inside a function (a lazy import only
hides a cycle) and under ``if TYPE_CHECKING:`` (mypy and a reader still need both modules).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cache", "proxy", "bench")
# What the engine must not know of: HTTP, metrics, or the proxy built on it.
NOT_IN_THE_ENGINE = ("aiohttp", "prometheus_client", "proxy")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")
    }


def _imported(tree: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    """Every module name an import statement anywhere in ``tree`` names (``from a import b``
    names ``a`` and ``a.b``: ``b`` may be a module)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            yield source
            yield from (f"{source}.{alias.name}" for alias in node.names)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        found = _imported(tree, name, path.name == "__init__.py")
        graph[name] = {other for other in found if other in modules and other != name}
    return graph


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle_of_three_and_nothing_in_a_chain() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_the_finder_reads_lazy_and_type_checking_imports() -> None:
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from proxy.settings import Settings\n"
        "def f():\n    from proxy import workers\n"
    )
    found = set(_imported(tree, "proxy.routes", is_package=False))
    assert {"proxy.settings", "proxy.workers"} <= found


def test_no_module_of_cache_proxy_or_bench_is_in_an_import_cycle() -> None:
    graph = _graph()
    assert len(graph) > 50, "the walk found too few modules to be reading the tree"
    assert cycles(graph) == []


@pytest.mark.parametrize("package", NOT_IN_THE_ENGINE)
def test_the_engine_never_imports(package: str) -> None:
    importers = []
    for path in (ROOT / "cache").rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        names = _imported(tree, _module_name(path), path.name == "__init__.py")
        if any(name == package or name.startswith(package + ".") for name in names):
            importers.append(str(path.relative_to(ROOT)))
    assert importers == [], f"the engine imports {package}"
