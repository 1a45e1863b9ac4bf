"""The import map of the top-level packages holds to DESIGN.md's layout table.

Every ``.py`` file of the packages is parsed (``TYPE_CHECKING`` blocks and imports inside
functions included: a function-level import is still a dependency, only a hidden one), and the
test fails on an arrow the table does not allow, on a cycle between packages, and on a cycle
between the files of one package.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: DESIGN.md's "may import" column; ``orchestrator`` is a top-level package outside the table,
#: allowed what the coordinator set for it. ``tests`` and ``bench`` may import anything.
MAY_IMPORT: dict[str, frozenset[str]] = {
    "domain": frozenset(),
    "commands": frozenset({"domain"}),
    "projections": frozenset({"domain", "adapters"}),
    "streams": frozenset({"domain", "projections", "adapters"}),
    "read_api": frozenset({"commands", "projections", "adapters"}),
    "adapters": frozenset({"domain"}),
    "orchestrator": frozenset({"domain", "commands", "adapters"}),
    "infra": frozenset(
        {"domain", "commands", "projections", "streams", "read_api", "adapters", "orchestrator"}
    ),
}
PACKAGES = tuple(MAY_IMPORT)


def _allowed(package: str) -> frozenset[str]:
    """What ``package`` may import: the table's arrows, and what those may import in turn.

    Dependencies point inward, so a package may use the inner layers its allowed packages
    build on (``read_api`` reads ``domain``'s errors that ``commands`` raises)."""
    seen: set[str] = set()
    todo = list(MAY_IMPORT[package])
    while todo:
        target = todo.pop()
        if target not in seen:
            seen.add(target)
            todo.extend(MAY_IMPORT[target])
    return frozenset(seen)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _imports(module: str, path: Path) -> Iterator[tuple[str, int]]:
    """Every module ``module`` imports (each name of ``from x import y`` too, when ``x.y`` is a
    module), with its line, wherever in the file the import sits."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield target, node.lineno
            for alias in node.names:
                if f"{target}.{alias.name}" in MODULES:
                    yield f"{target}.{alias.name}", node.lineno


def _arrows() -> dict[tuple[str, str], list[str]]:
    """(from package, to package) → where, for every import between two packages."""
    arrows: dict[tuple[str, str], list[str]] = {}
    for module, path in MODULES.items():
        source = module.split(".")[0]
        for target, line in _imports(module, path):
            top = target.split(".")[0]
            if top in MAY_IMPORT and top != source:
                where = f"{path.relative_to(ROOT)}:{line} imports {target}"
                arrows.setdefault((source, top), []).append(where)
    return arrows


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_every_arrow_between_packages_is_one_the_layout_allows() -> None:
    refused = {
        f"{source} -> {target}": where
        for (source, target), where in sorted(_arrows().items())
        if target not in _allowed(source)
    }
    assert not refused, refused


def test_the_packages_import_each_other_without_a_cycle() -> None:
    graph: dict[str, set[str]] = {}
    for source, target in _arrows():
        graph.setdefault(source, set()).add(target)
    assert _cycles(graph) == []


#: File cycles allowed: none (the last, the CLI's sub-command modules importing the module that
#: registers them, went with issue 11). A new cycle fails.
KNOWN_FILE_CYCLES: list[list[str]] = []


def test_the_files_of_a_package_import_each_other_without_a_cycle() -> None:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        for target, _ in _imports(module, path):
            while target and target not in MODULES:
                target = target.rpartition(".")[0]  # ``from a.b import name``: module a.b
            same_package = target.split(".")[0] == module.split(".")[0]
            # A package's __init__ is imported with any of its modules; not a dependency of theirs.
            if target and same_package and target != module and target not in PACKAGES:
                graph.setdefault(module, set()).add(target)
    assert _cycles(graph) == KNOWN_FILE_CYCLES


def test_the_import_map_sees_imports_under_type_checking_and_in_functions(
    tmp_path: Path,
) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from streams.relay import Relay\n"
        "def later():\n    import read_api.app\n"
        "from domain import events\n"
    )
    imported = {target for target, _ in _imports("projections.probe", probe)}
    assert {"streams.relay", "read_api.app", "domain.events"} <= imported
    assert "streams" not in _allowed("projections")
    assert "domain" in _allowed("read_api")
