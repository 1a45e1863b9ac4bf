"""What the API reads of the Kanban read model (``rm_workspaces``, ``rm_members``,
``rm_projects``, ``rm_lanes``, ``rm_cards``, ``rm_api_keys``, ``rm_invitations``), a batch of
keys per statement.

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
class AccessPage:
    """Which page of a workspace's API keys or invitations, newest first: only the open ones
    (live keys, pending invitations) unless ``include_closed``; after the one whose id is
    ``after``; at most ``limit`` rows."""

    workspace_id: UUID
    include_closed: bool
    limit: int
    after: UUID | None = None


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
MEMBER_SQL = "SELECT role FROM rm_members WHERE workspace_id = %s AND user_id = %s"
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


def member_role(conn: Connection[DictRow], workspace_id: UUID, user_id: str) -> str | None:
    """``user_id``'s membership role in ``workspace_id``; ``None`` when not a member."""
    row = conn.execute(MEMBER_SQL, (workspace_id, user_id)).fetchone()
    return None if row is None else str(row["role"])


def is_member(conn: Connection[DictRow], workspace_id: UUID, user_id: str) -> bool:
    return member_role(conn, workspace_id, user_id) is not None


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


def _newest_first(table: str, key: str, columns: str, open_rows: str, join: str = "") -> str:
    """One page per :class:`AccessPage` of ``table``'s rows, newest first (a LATERAL join, each
    page with its own filter, cursor and size); ``page_index`` (from 1) says which page a row
    answers. A page of open rows only reads them alone (``open_rows`` is the condition of the
    table's partial index): a workspace with thousands of revoked keys lists its live ones
    without reading past the others."""
    # Rows before the cursor's row; without a cursor, before the end of time. One comparison
    # either way, so that it bounds the index scan instead of filtering it: a page deep in a long
    # list starts at its cursor. (A cursor that names no row compares with null: no rows.)
    after = (
        f"(a.created_at, a.{key}) < (SELECT c.created_at, c.{key} FROM {table} AS c"
        f" WHERE c.{key} = k.after UNION ALL SELECT 'infinity', NULL WHERE k.after IS NULL)"
    )
    page = (
        f"SELECT {columns} FROM {table} AS a {join}"
        f" WHERE a.workspace_id = k.workspace_id AND {after} AND {{filter}}"
        f" ORDER BY a.created_at DESC, a.{key} DESC LIMIT k.lim"
    )
    return (
        "SELECT k.ord AS page_index, a.* FROM unnest(%s::uuid[], %s::boolean[], %s::uuid[],"
        " %s::int[]) WITH ORDINALITY AS k(workspace_id, include_closed, after, lim, ord)"
        " CROSS JOIN LATERAL ("
        f" ({page.format(filter='k.include_closed')})"
        f" UNION ALL ({page.format(filter=f'NOT k.include_closed AND {open_rows}')})"
        f" ) AS a ORDER BY k.ord, a.created_at DESC, a.id DESC"
    )


# ``api_key_uses`` is written by the API (``projections.key_uses``), not projected: a key never
# used has no row there.
API_KEY_PAGES_SQL = _newest_first(
    "rm_api_keys",
    "key_id",
    "a.key_id AS id, a.name, a.role, a.created_at, a.revoked_at, u.last_used_at",
    "a.revoked_at IS NULL",
    join="LEFT JOIN api_key_uses AS u ON u.key_id = a.key_id",
)
# Pending: neither accepted nor revoked, and not expired by the database's clock.
INVITATION_PAGES_SQL = _newest_first(
    "rm_invitations",
    "invitation_id",
    "a.invitation_id AS id, a.email, a.role, a.created_at, a.expires_at, a.accepted_at,"
    " a.revoked_at",
    "a.accepted_at IS NULL AND a.revoked_at IS NULL AND a.expires_at > now()",
)


def _access_pages(sql: str) -> Callable[[Connection[DictRow], Sequence[AccessPage]], list[DictRow]]:
    def read(conn: Connection[DictRow], pages: Sequence[AccessPage]) -> list[DictRow]:
        rows = [(p.workspace_id, p.include_closed, p.after, p.limit) for p in pages]
        return conn.execute(sql, columns_of(rows, 4)).fetchall()

    return read


api_key_pages = _access_pages(API_KEY_PAGES_SQL)
invitation_pages = _access_pages(INVITATION_PAGES_SQL)


def _exists(table: str, key: str) -> Callable[[Connection[DictRow], UUID], bool]:
    """Whether an id is a row of ``table`` in the connection's workspace (a cursor's check)."""
    sql = f"SELECT 1 FROM {table} WHERE {key} = %s"

    def exists(conn: Connection[DictRow], wanted: UUID) -> bool:
        return conn.execute(sql, (wanted,)).fetchone() is not None

    return exists


api_key_exists = _exists("rm_api_keys", "key_id")
invitation_exists = _exists("rm_invitations", "invitation_id")
