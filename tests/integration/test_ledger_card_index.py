"""A card's cost until an instant reads the ledger through an index on the card (migration
0021), not by scanning every workspace's ledger (bench.scale found cardHistory spending 229 ms
on that scan at 350,000 entries)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import psycopg
from psycopg.rows import dict_row

from projections import queries


class _Explaining:
    """A connection that answers each statement with its plan instead of its rows."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, statement: str, params: Any = None) -> psycopg.Cursor[Any]:
        return self._conn.execute("EXPLAIN " + statement, params)


def test_card_costs_until_reads_the_ledger_by_card(database_url: str) -> None:
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        # As on a ledger of any size: an empty table is cheapest to scan whole.
        conn.execute("SET enable_seqscan = off")
        plan = queries.card_costs_until(
            _Explaining(conn),  # type: ignore[arg-type]
            [(uuid4(), datetime.now(UTC)), (uuid4(), None)],
        )
    text = "\n".join(str(row["QUERY PLAN"]) for row in plan)
    assert "rm_ledger_entries_card_at_idx" in text, text
