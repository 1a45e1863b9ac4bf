"""One definition per read-side shape, and no import cycle between read_api's files."""

from __future__ import annotations

import ast
from pathlib import Path

from projections.billing import UsageDimension
from projections.columns import CARD_COLUMNS, CARD_SELECT, RUN_COLUMNS, RUN_SELECT
from projections.registry import ALL_PROJECTORS
from projections.runs_queries import RunSummary
from read_api.consistency import followers
from read_api.schema import schema_sdl

ROOT = Path(__file__).resolve().parents[2]


def test_run_summary_is_the_rm_runs_row() -> None:
    assert set(RunSummary.__dataclass_fields__) == {name for name, _ in RUN_COLUMNS}
    assert RUN_SELECT.split(", ") == [name for name, _ in RUN_COLUMNS]


def test_the_api_reads_every_card_column_but_the_folds_bookkeeping() -> None:
    assert CARD_SELECT.split(", ") == [n for n, _ in CARD_COLUMNS if n != "last_run_position"]


def test_usage_grouping_in_graphql_is_the_billing_dimension() -> None:
    sdl = schema_sdl()
    block = sdl[sdl.index("enum UsageGrouping {") :].split("}", 1)[0]
    assert block.split()[3:] == [d.name for d in UsageDimension]


def test_a_consistency_token_of_a_key_or_invitation_waits_for_the_read_model_listing_it() -> None:
    assert followers(ALL_PROJECTORS, "ApiKey") == ["kanban"]
    assert followers(ALL_PROJECTORS, "Invitation") == ["kanban"]


def _imports(path: Path, package: str) -> set[str]:
    """Modules of ``package`` that ``path`` imports anywhere (in functions and under
    ``TYPE_CHECKING`` too: a cycle hidden there is still a cycle)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == package:
                found.update(f"{package}.{alias.name}" for alias in node.names)
            elif node.module.startswith(package + "."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith(package + "."))
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt in graph and nxt not in state:
                found = visit(nxt, [*path, nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_file_of_read_api_or_projections_imports_itself_round_a_cycle() -> None:
    for package in ("read_api", "projections"):
        graph = {
            f"{package}.{path.stem}": _imports(path, package) - {f"{package}.{path.stem}"}
            for path in sorted((ROOT / package).glob("*.py"))
        }
        assert _cycle(graph) is None, package
