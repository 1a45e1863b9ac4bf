"""Spend checks' reading of the billing read model: a workspace-month's usage.

Usage is ``rm_monthly_spend.charged_micros``: the billed amounts of the month's charges, not
lowered by credits or refunds (the spend limit counts usage, as the write side's
``MonthlySpend`` does; ``billed_micros`` beside it is the net the statement shows). The same
statement says which of the asked-about charges the billing projector has counted: the projector
writes a charge's row and the month's total in one transaction, so in one snapshot a charge is
either in both or in neither — which is what lets a budget hold wait exactly until its charge
is counted.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING
from uuid import UUID

from domain.budget_holds import SpendReading

if TYPE_CHECKING:
    from psycopg import Connection
    from psycopg.rows import DictRow
    from psycopg_pool import ConnectionPool

_READ = (
    "SELECT coalesce((SELECT charged_micros FROM rm_monthly_spend"
    " WHERE workspace_id = %(ws)s AND month = %(month)s), 0) AS spent,"
    " ARRAY(SELECT charge_id FROM rm_charges WHERE charge_id = ANY(%(pending)s::uuid[])"
    " AND workspace_id = %(ws)s) AS counted"
)


class ReadModelSpend:
    """Reads through ``pool``, which may log in as the API (row-level security: each read is
    scoped to its workspace) or as the projector."""

    def __init__(self, pool: ConnectionPool[Connection[DictRow]]) -> None:
        self._pool = pool

    def close(self) -> None:
        """The pool is its owner's (the API's or the orchestrator's), closed by them."""

    def read(self, workspace_id: UUID, month: str, pending: Collection[UUID] = ()) -> SpendReading:
        with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            cur.execute(
                "SELECT set_config('agentworks.workspace_id', %s, true)", (str(workspace_id),)
            )
            cur.execute(_READ, {"ws": workspace_id, "month": month, "pending": list(pending)})
            row = cur.fetchone()
        if row is None:  # pragma: no cover - a SELECT without FROM returns its one row
            return SpendReading(0)
        return SpendReading(int(row["spent"]), frozenset(UUID(str(c)) for c in row["counted"]))
