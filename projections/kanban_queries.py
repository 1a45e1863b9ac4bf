"""What the API reads of the Kanban read model (``rm_workspaces``, ``rm_members``,
``rm_projects``, ``rm_lanes``, ``rm_cards``), a batch of keys per statement.

Every read takes a connection inside a transaction scoped to the caller's workspace
(:func:`scope_to_workspace`), so row-level security confines it there. The API's DataLoaders
group the rows by key; a board of any size costs a fixed number of statements.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from uuid import UUID

from projections.batch import columns_of
from projections.columns import CARD_SELECT

if TYPE_CHECKING:
    from psycopg import Connection
    from psycopg.rows import DictRow

    BatchRead = Callable[[Connection[DictRow], Sequence[Any]], list[DictRow]]


@dataclass(frozen=True)
class LanePage:
    """Which page of a lane's cards: after ``(position, card id)``, at most ``limit`` rows."""

    project_id: UUID
    lane: str
    limit: int
    after_position: str | None = None
    after_card_id: UUID | None = None


# The statements a board read sends, named: ``bench._graphql_plain`` reads a board with them too.
SCOPE_SQL = (
    "SELECT set_config('agentworks.workspace_id', %s, true),"
    " set_config('statement_timeout', %s, true)"
)
MEMBER_SQL = "SELECT 1 AS member FROM rm_members WHERE workspace_id = %s AND user_id = %s"
PROJECTS_SQL = (
    "SELECT workspace_id, project_id, name, archived, version, created_at, updated_at"
    " FROM rm_projects WHERE project_id = ANY(%s)"
)
LANES_SQL = (
    "SELECT project_id, name, ord, wip_limit, card_count FROM rm_lanes"
    " WHERE project_id = ANY(%s) ORDER BY project_id, ord"
)
LANE_CARDS_SQL = (
    "SELECT k.ord AS page_index, c.* FROM unnest("
    "%s::uuid[], %s::text[], %s::text[], %s::uuid[], %s::int[]"
    ") WITH ORDINALITY AS k(project_id, lane, after_position, after_card_id, lim, ord)"
    " CROSS JOIN LATERAL ("
    f"  SELECT {CARD_SELECT} FROM rm_cards AS c"
    "   WHERE c.project_id = k.project_id AND c.lane = k.lane AND NOT c.archived"
    "   AND (k.after_position IS NULL OR (c.position, c.card_id)"
    '        > (k.after_position COLLATE "C", k.after_card_id))'
    "   ORDER BY c.position, c.card_id LIMIT k.lim"
    " ) AS c ORDER BY k.ord, c.position, c.card_id"
)


def scope_to_workspace(
    conn: Connection[DictRow], workspace_id: UUID, *, statement_timeout_ms: int | None = None
) -> None:
    """Confine the rest of this transaction to ``workspace_id`` (row-level security reads it)."""
    if statement_timeout_ms is None:
        conn.execute("SELECT set_config('agentworks.workspace_id', %s, true)", (str(workspace_id),))
    else:
        conn.execute(SCOPE_SQL, (str(workspace_id), str(statement_timeout_ms)))


def is_member(conn: Connection[DictRow], workspace_id: UUID, user_id: str) -> bool:
    return conn.execute(MEMBER_SQL, (workspace_id, user_id)).fetchone() is not None


def user_workspaces(conn: Connection[DictRow], user_id: str) -> list[DictRow]:
    """Every workspace ``user_id`` belongs to, with its name and the user's role there (a
    security-definer function: the API role sees no other workspace's rows)."""
    return conn.execute(
        "SELECT workspace_id, name, role FROM agentworks_user_workspaces(%s)", (user_id,)
    ).fetchall()


def batch_read(sql: str) -> BatchRead:
    """The read of a batch of keys by ``sql``, whose one parameter is the keys' array
    (``= ANY(%s)``)."""

    def read(conn: Connection[DictRow], keys: Sequence[Any]) -> list[DictRow]:
        return conn.execute(sql, (keys,)).fetchall()

    return read


# The reads by key: ``ANY(%s)`` names the column the keys are of.
workspaces = batch_read(
    "SELECT workspace_id, name, markup, billing_increment_micros, monthly_limit_micros,"
    " version, created_at, updated_at FROM rm_workspaces WHERE workspace_id = ANY(%s)"
)
members = batch_read(
    "SELECT workspace_id, user_id, role FROM rm_members WHERE workspace_id = ANY(%s)"
    " ORDER BY workspace_id, user_id"
)
projects = batch_read(PROJECTS_SQL)
projects_of_workspaces = batch_read(
    "SELECT workspace_id, project_id, name, archived, version, created_at, updated_at"
    " FROM rm_projects WHERE workspace_id = ANY(%s) ORDER BY created_at, project_id"
)
lanes = batch_read(LANES_SQL)
cards = batch_read(f"SELECT {CARD_SELECT} FROM rm_cards WHERE card_id = ANY(%s)")


def lane_cards(conn: Connection[DictRow], pages: Sequence[LanePage]) -> list[DictRow]:
    """One page of live cards per lane page asked for, in board order; ``page_index`` (from 1)
    says which page a row answers (one LATERAL join, each lane with its own cursor and size)."""
    rows = [(p.project_id, p.lane, p.after_position, p.after_card_id, p.limit) for p in pages]
    return conn.execute(LANE_CARDS_SQL, columns_of(rows, 5)).fetchall()
