"""When API keys were last used: the ``api_key_uses`` table (migration 0024) and its statements.

Not a projection: the API writes these rows itself (``read_api.key_uses`` decides when), so a
rebuild leaves them alone. Every statement runs in a transaction scoped to the key's workspace
(:func:`scope_to_workspace`); row-level security confines reads and writes to it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING
from uuid import UUID

from projections.kanban_queries import scope_to_workspace

if TYPE_CHECKING:
    from psycopg import Connection
    from psycopg.rows import DictRow

# A use is written only when the stored one is at least an interval old, so API processes that
# each write a key once per interval still rewrite its row about once per interval between them.
# Either way the answer is the use now stored: a process that finds a fresh one waits an
# interval from it, not from now, and no use goes more than an interval behind.
_RECORD_SQL = """
WITH recorded AS (
    INSERT INTO api_key_uses AS u (key_id, workspace_id, last_used_at)
    VALUES (%(key_id)s, %(workspace_id)s, %(at)s)
    ON CONFLICT (key_id) DO UPDATE SET last_used_at = excluded.last_used_at
    WHERE u.last_used_at <= excluded.last_used_at - %(interval)s
    RETURNING last_used_at
)
SELECT last_used_at FROM recorded
UNION ALL
SELECT last_used_at FROM api_key_uses
 WHERE key_id = %(key_id)s AND NOT EXISTS (SELECT 1 FROM recorded)
"""


@dataclass(frozen=True)
class KeyUse:
    """An API key used in its workspace at ``at``."""

    key_id: UUID
    workspace_id: UUID
    at: datetime


def record_key_uses(
    conn: Connection[DictRow],
    uses: Iterable[KeyUse],
    *,
    interval: timedelta,
    statement_timeout_ms: int,
) -> dict[UUID, datetime]:
    """Store ``uses`` in the caller's transaction; the use stored afterwards for each key.

    Keys are written in one order (their ids), so two API processes writing overlapping batches
    wait for each other instead of deadlocking.
    """
    stored: dict[UUID, datetime] = {}
    for use in sorted(uses, key=lambda use: use.key_id):
        scope_to_workspace(conn, use.workspace_id, statement_timeout_ms=statement_timeout_ms)
        row = conn.execute(
            _RECORD_SQL,
            {
                "key_id": use.key_id,
                "workspace_id": use.workspace_id,
                "at": use.at,
                "interval": interval,
            },
        ).fetchone()
        # No row: another process inserted the key's first use after this statement began.
        stored[use.key_id] = use.at if row is None else row["last_used_at"]
    return stored


def key_last_used(conn: Connection[DictRow], key_id: UUID) -> datetime | None:
    """The last recorded use of ``key_id`` in the connection's workspace; ``None`` if none."""
    row = conn.execute(
        "SELECT last_used_at FROM api_key_uses WHERE key_id = %s", (key_id,)
    ).fetchone()
    return None if row is None else row["last_used_at"]
