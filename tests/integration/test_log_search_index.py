"""Log search reads its own workspace's lines only, through an index that holds the workspace
(migration 0023), and ranks a bounded window of the newest matches instead of every match
(bench.scale: a common word cost 2.1 s in a 13.8M-line workspace, and a 200-card workspace paid
1.6 s for its neighbour's lines)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID, uuid4

import pg
import psycopg
import pytest
from psycopg.rows import dict_row
from read_side_helpers import ReadSide, api_connection, append_log, running_run

from projections import queries
from projections.rebuild import rebuild
from projections.runs import RunsProjector

if TYPE_CHECKING:
    from collections.abc import Iterator

T0 = datetime(2026, 3, 1, tzinfo=UTC)


class _Explaining:
    """A connection that answers each statement with its plan (run, in JSON) instead of its
    rows."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn
        self.plan: dict[str, Any] = {}

    def cursor(self, **kwargs: Any) -> _Explaining:
        return self

    def __enter__(self) -> _Explaining:
        return self

    def __exit__(self, *_: object) -> None:
        return None

    def execute(self, statement: str, params: Any = None, **kwargs: Any) -> None:
        row = self._conn.execute(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + statement, params, **kwargs
        ).fetchone()
        assert row is not None
        doc = row["QUERY PLAN"]
        self.plan = (json.loads(doc) if isinstance(doc, str) else doc)[0]["Plan"]

    def fetchall(self) -> list[Any]:
        return []


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


@pytest.fixture(scope="module")
def two_workspaces(migrated_template: str) -> Iterator[tuple[str, UUID, UUID]]:
    """A database whose log lines belong to a BIG workspace (40,000 lines, every other one
    saying ``pytest``, three ``frobnicator``) and a SMALL one (2,000 lines, three saying
    ``frobnicator``), analysed."""
    name = pg.random_name("aw_t_search_")
    url = pg.create_database(name, template=migrated_template)
    big, small = uuid4(), uuid4()
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            for workspace, lines, text in (
                (
                    big,
                    40_000,
                    "CASE WHEN i IN (1, 20001, 39999) THEN 'frobnicator failed'"
                    " WHEN i %% 2 = 0 THEN 'ran pytest -q' ELSE 'compiled ok' END",
                ),
                (small, 2_000, "CASE WHEN i %% 700 = 1 THEN 'frobnicator failed' ELSE 'idle' END"),
            ):
                conn.execute(
                    "INSERT INTO rm_log_lines (workspace_id, run_id, seq, at, stream, text)"
                    " SELECT %s, %s, i, %s + i * interval '1 second', 'stdout', " + text
                    + " FROM generate_series(1, %s) AS i",
                    (workspace, uuid4(), T0, lines),
                )  # fmt: skip
            conn.execute("VACUUM ANALYZE rm_log_lines")
        yield url, big, small
    finally:
        pg.drop_database(name)


def _plan(url: str, workspace: UUID, word: str, *, seqscan: bool = True) -> dict[str, Any]:
    with psycopg.connect(url, row_factory=dict_row) as conn:
        if not seqscan:
            conn.execute("SET enable_seqscan = off")
        explaining = _Explaining(conn)
        queries.search_logs(explaining, workspace, query=word, first=50)  # type: ignore[arg-type]
    return explaining.plan


def test_the_text_index_holds_the_workspace(two_workspaces: tuple[str, UUID, UUID]) -> None:
    url, _, _ = two_workspaces
    with psycopg.connect(url) as conn:
        definitions = [
            str(row[0])
            for row in conn.execute(
                "SELECT pg_get_indexdef(indexrelid) FROM pg_index"
                " WHERE indrelid = 'rm_log_lines'::regclass"
            )
        ]
    assert [d for d in definitions if "USING gin" in d] == [
        "CREATE INDEX rm_log_lines_search_idx ON public.rm_log_lines USING gin (workspace_id, tsv)"
    ], definitions


def test_a_rare_word_is_found_through_the_text_index_by_workspace(
    two_workspaces: tuple[str, UUID, UUID],
) -> None:
    url, big, _ = two_workspaces
    # As on a log of any size: 42,000 lines are still cheapest to scan whole.
    plan = _plan(url, big, "frobnicator", seqscan=False)
    (scan,) = [n for n in _nodes(plan) if n.get("Index Name") == "rm_log_lines_search_idx"]
    assert "workspace_id" in scan["Index Cond"], scan
    assert "tsv" in scan["Index Cond"], scan
    # The index hands over this workspace's three matches, not the other's three too.
    assert scan["Actual Rows"] == 3, plan


def test_a_common_word_reads_the_newest_matches_only(
    two_workspaces: tuple[str, UUID, UUID],
) -> None:
    url, big, _ = two_workspaces
    plan = _plan(url, big, "pytest")
    (scan,) = [n for n in _nodes(plan) if n.get("Relation Name") == "rm_log_lines"]
    assert scan["Index Name"] == "rm_log_lines_recent_idx", plan
    assert scan["Scan Direction"] == "Backward", plan
    # 20,000 lines match; the search stops at its window of the newest.
    assert scan["Actual Rows"] == queries.SEARCH_CANDIDATES, plan
    assert scan["Rows Removed by Filter"] <= queries.SEARCH_CANDIDATES + 1, plan


def test_results_and_pages_across_two_workspaces(
    side: ReadSide, monkeypatch: pytest.MonkeyPatch
) -> None:
    mine, theirs = side.new_world(owner="al"), side.new_world(owner="bo")
    my_run, their_run = running_run(side, mine), running_run(side, theirs)
    # Older lines rank higher ("needle" twice), newer ones lower; the other workspace's lines
    # rank highest of all and are the newest.
    for minute in range(8):
        text = f"needle needle old {minute}" if minute < 4 else f"needle new {minute}"
        append_log(side, mine, my_run, [text], at=T0 + timedelta(minutes=minute))
    append_log(side, theirs, their_run, ["needle needle needle"] * 3, at=T0 + timedelta(hours=1))
    side.project(RunsProjector())

    def search(world_id: UUID, first: int) -> list[str]:
        with api_connection(side.database_url, world_id) as conn:
            hits = queries.search_logs(conn, world_id, query="needle", first=first)
        return [hit.text for hit in hits]

    everything = [f"needle needle old {m}" for m in range(4)] + [
        f"needle new {m}" for m in range(4, 8)
    ]
    assert search(mine.workspace_id, 50) == everything
    for first in range(1, 9):
        assert search(mine.workspace_id, first) == everything[:first]
    assert search(theirs.workspace_id, 50) == ["needle needle needle"] * 3

    # More matches than the window: the best of the newest five, still each page a prefix of
    # the next, and still only the caller's lines.
    monkeypatch.setattr(queries, "SEARCH_CANDIDATES", 5)
    newest_five = ["needle needle old 3"] + [f"needle new {m}" for m in range(4, 8)]
    assert search(mine.workspace_id, 50) == newest_five
    for first in range(1, 6):
        assert search(mine.workspace_id, first) == newest_five[:first]
    assert search(theirs.workspace_id, 2) == ["needle needle needle"] * 2

    # A rebuild builds both indexes again (under its scratch tables' names) and answers alike.
    rebuild(RunsProjector(), side.pool, side.log)
    definitions = {
        re.sub(r"INDEX \S+ ON", "INDEX ON", str(row["definition"]))
        for row in side.rows(
            "SELECT pg_get_indexdef(indexrelid) AS definition FROM pg_index"
            " WHERE indrelid = 'rm_log_lines'::regclass AND NOT indisprimary"
        )
    }
    assert definitions == {
        "CREATE INDEX ON public.rm_log_lines USING gin (workspace_id, tsv)",
        "CREATE INDEX ON public.rm_log_lines USING btree (workspace_id, at, run_id, seq)",
    }
    assert search(mine.workspace_id, 50) == newest_five
