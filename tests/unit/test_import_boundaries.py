"""Import boundaries, read from the source with ``ast``: no module of the three packages is in an
import cycle, and nothing outside the library imports its private modules. Imports inside
functions (lazy ones) count like any other; a package's ``__init__`` importing its own submodules
(to re-export them) is not an edge."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("vochi_crm_client", "retailcrm_service", "adapters")
LIBRARY = "vochi_crm_client"
# Code outside the library that may reach into it: everything but the library and its tests.
OUTSIDE = ("retailcrm_service", "adapters", "benchmarks")


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    is_package: bool


@dataclass(frozen=True)
class Import:
    importer: str
    target: str
    line: int


def modules(roots: tuple[str, ...]) -> dict[str, Module]:
    found: dict[str, Module] = {}
    for root in roots:
        for path in sorted((ROOT / root).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            found[".".join(parts)] = Module(".".join(parts), path, is_package)
    return found


def imports_of(
    module: Module, known: dict[str, Module], source: str | None = None
) -> Iterator[Import]:
    """Every module ``module`` (or ``source`` in its place) imports, wherever the statement is."""
    text = module.path.read_text("utf-8") if source is None else source
    tree = ast.parse(text, str(module.path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module.name, alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node)
            for alias in node.names:
                # ``from pkg import sub`` imports the submodule ``pkg.sub`` when there is one.
                sub = f"{base}.{alias.name}"
                yield Import(module.name, sub if sub in known else base, node.lineno)


def _absolute(module: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join([*package, node.module] if node.module else package)


def _is_private_library_module(name: str) -> bool:
    parts = name.split(".")
    return parts[0] == LIBRARY and any(part.startswith("_") for part in parts[1:])


def private_library_imports() -> list[Import]:
    outside = modules(OUTSIDE)
    return [
        imp
        for module in outside.values()
        for imp in imports_of(module, modules((LIBRARY,)))
        if _is_private_library_module(imp.target)
    ]


def import_graph() -> dict[str, set[str]]:
    known = modules(PACKAGES)
    graph: dict[str, set[str]] = {name: set() for name in known}
    for module in known.values():
        for imp in imports_of(module, known):
            if imp.target not in known or imp.target == module.name:
                continue
            if module.is_package and imp.target.startswith(module.name + "."):
                continue  # a package re-exporting its own submodules
            graph[module.name].add(imp.target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph[succ]))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
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


def test_no_module_outside_the_library_imports_its_private_modules() -> None:
    offending = [f"{i.importer}:{i.line} imports {i.target}" for i in private_library_imports()]
    assert offending == []


def test_no_module_of_the_three_packages_is_in_an_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_the_checks_see_lazy_and_relative_imports_and_find_cycles() -> None:
    """The checks can fail: imports inside functions are seen, and cycles are found."""
    known = modules(PACKAGES)
    here = known["adapters.translate"]
    source = (
        "def f():\n"
        "    from vochi_crm_client._cache import NOT_LOADED\n"
        "    import vochi_crm_client._event\n"
        "from . import fastapi\n"
    )
    targets = sorted(imp.target for imp in imports_of(here, known, source))
    assert targets == ["adapters.fastapi", "vochi_crm_client._cache", "vochi_crm_client._event"]
    assert [_is_private_library_module(t) for t in targets] == [False, True, True]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_library_imports_nothing_from_the_service_or_the_adapters() -> None:
    graph = import_graph()
    leaks = [
        f"{name} -> {target}"
        for name, targets in graph.items()
        if name.split(".")[0] == LIBRARY
        for target in targets
        if target.split(".")[0] != LIBRARY
    ]
    assert leaks == []
