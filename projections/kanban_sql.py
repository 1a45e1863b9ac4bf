"""The Kanban read model's writes: every statement the kanban fold sends, and how card rows
travel between the table and the fold's memory.

The fold (:mod:`projections.kanban`) decides what the events do; this module knows the tables.
Cards, lane counts and board versions are written set-based, a batch's worth at a time; the rare
events (a workspace or project created or changed, lanes added, renamed, reordered, removed) are
written each with its own few statements, in their place in the log.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import orjson
from eventsourcing.utils import get_topic

from domain import events as ev
from domain.card import Card
from domain.project import Project
from projections.batch import columns_of, fetch_all
from projections.columns import CARD_COLUMNS

if TYPE_CHECKING:
    from psycopg import Cursor
    from psycopg.rows import DictRow

    from domain.envelope import EventEnvelope
    from projections.base import Tables

E = TypeVar("E", bound=ev.EventPayload)
Params = Callable[["EventEnvelope", E], tuple[Any, ...]]
"""A statement's parameters, drawn from the envelope and the event."""

CardRow = dict[str, Any]
"""A card as the fold holds it: ``rm_cards``' columns, ids as their canonical text, labels as a
list."""

CARD_NAMES = tuple(name for name, _ in CARD_COLUMNS)
_UUID_COLUMNS = ("workspace_id", "card_id", "project_id", "last_run_id")

# Labels as the fold leaves them: sorted and distinct (in the database's collation) after an
# add; in their order, less the removed one, after removals only.
_LABELS = (
    "CASE WHEN v.sort_labels"
    " THEN ARRAY(SELECT DISTINCT x FROM jsonb_array_elements_text(v.labels) AS x ORDER BY x)"
    " ELSE ARRAY(SELECT x FROM jsonb_array_elements_text(v.labels) WITH ORDINALITY AS e(x, i)"
    " ORDER BY i) END"
)
_CARD_VALUES = (
    " FROM unnest("
    + ", ".join(f"%s::{kind}[]" for _, kind in CARD_COLUMNS)
    + ", %s::boolean[]) AS v("
    + ", ".join(CARD_NAMES)
    + ", sort_labels)"
)
_INSERT_CARDS = (
    "INSERT INTO {rm_cards} ("
    + ", ".join(CARD_NAMES)
    + ") SELECT "
    + ", ".join(_LABELS if name == "labels" else f"v.{name}" for name in CARD_NAMES)
    + _CARD_VALUES
)
_UPDATE_CARDS = (
    "UPDATE {rm_cards} AS c SET "
    + ", ".join(
        f"{name} = " + (_LABELS if name == "labels" else f"v.{name}")
        for name in CARD_NAMES
        if name not in ("workspace_id", "card_id")
    )
    + _CARD_VALUES
    + " WHERE c.card_id = v.card_id"
)

# -- cards, counts and board versions, a batch at a time ----------------------------------------


def select_cards(
    cur: Cursor[DictRow],
    t: Tables,
    card_ids: set[str],
    run_ids: set[str],
    *,
    lock: bool,
) -> list[CardRow]:
    """The cards of ``card_ids`` and those whose last run is one of ``run_ids``, in card order
    (locked for the transaction when ``lock``: another worker may be folding them too)."""
    statement = (
        "SELECT " + ", ".join(CARD_NAMES) + " FROM {rm_cards} WHERE card_id = ANY(%s::uuid[])"
    )
    params: list[Any] = [sorted(card_ids)]
    if run_ids:
        statement += " OR last_run_id = ANY(%s::uuid[])"
        params.append(sorted(run_ids))
    statement += " ORDER BY card_id"
    if lock:
        statement += " FOR UPDATE"
    rows = []
    for found in fetch_all(cur, t.q(statement), params):
        row = dict(found)
        for column in _UUID_COLUMNS:
            if row[column] is not None:
                row[column] = str(row[column])
        row["labels"] = list(row["labels"])
        rows.append(row)
    return rows


def write_cards(
    cur: Cursor[DictRow],
    t: Tables,
    rows: Sequence[tuple[CardRow, bool]],
    existing: set[str],
) -> None:
    """Write each card row (with whether its labels are to be sorted in the table): one insert
    for the new cards, one update for those in ``existing``."""
    inserts: list[tuple[Any, ...]] = []
    updates: list[tuple[Any, ...]] = []
    for row, sort_labels in rows:
        values = (
            *(json.dumps(row[name]) if name == "labels" else row[name] for name in CARD_NAMES),
            sort_labels,
        )
        (updates if row["card_id"] in existing else inserts).append(values)
    width = len(CARD_COLUMNS) + 1
    if inserts:
        cur.execute(t.q(_INSERT_CARDS), columns_of(inserts, width))
    if updates:
        cur.execute(t.q(_UPDATE_CARDS), columns_of(updates, width))


def set_board_versions(
    cur: Cursor[DictRow], t: Tables, versions: Sequence[tuple[str, tuple[int, Any]]]
) -> None:
    """Projects (id → their new version and when) as their boards' events leave them."""
    if not versions:
        return
    cur.execute(
        t.q(
            "UPDATE {rm_projects} AS p SET version = v.version, updated_at = v.at"
            " FROM unnest(%s::uuid[], %s::bigint[], %s::timestamptz[])"
            " AS v(id, version, at) WHERE p.project_id = v.id"
        ),
        columns_of([(k, v, a) for k, (v, a) in versions], 3),
    )


def add_card_counts(
    cur: Cursor[DictRow], t: Tables, counts: Sequence[tuple[tuple[str, str], int]]
) -> None:
    """Add ``delta`` to the card count of each (project, lane)."""
    if not counts:
        return
    cur.execute(
        t.q(
            "UPDATE {rm_lanes} AS l SET card_count = l.card_count + v.delta"
            " FROM unnest(%s::uuid[], %s::text[], %s::integer[]) AS v(id, name, delta)"
            " WHERE l.project_id = v.id AND l.name = v.name"
        ),
        columns_of([(project, lane, d) for (project, lane), d in counts], 3),
    )


# -- the rare events, each on its own -------------------------------------------------------------


#: The rows of the aggregates whose rare events the read model applies: (table, key column).
WORKSPACE = ("rm_workspaces", "workspace_id")
BOARD = ("rm_projects", "project_id")


def touch(
    cur: Cursor[DictRow],
    t: Tables,
    row: tuple[str, str],
    env: EventEnvelope,
    columns: dict[str, Any],
) -> None:
    """Set ``columns`` of the aggregate's ``row``, and its version and update time to the
    event's."""
    table, key = row
    assignments = "".join(f"{column} = %s, " for column in columns)
    cur.execute(
        t.q(f"UPDATE {{{table}}} SET {assignments}version = %s, updated_at = %s WHERE {key} = %s"),
        (*columns.values(), env.originator_version, env.timestamp, env.originator_id),
    )


def touch_board(cur: Cursor[DictRow], t: Tables, env: EventEnvelope) -> None:
    touch(cur, t, BOARD, env, {})


class Writes(Generic[E]):
    """A rare event's statements, run in order, each with its parameters drawn from the envelope
    and the event; then, if it ``touches`` an aggregate's row (``WORKSPACE`` or ``BOARD``), that
    row's version and update time set to the event's."""

    def __init__(
        self, *statements: tuple[str, Params[E]], touches: tuple[str, str] | None = None
    ) -> None:
        self.statements = statements
        self.touches = touches

    def __call__(self, cur: Cursor[DictRow], t: Tables, env: EventEnvelope, event: E) -> None:
        for statement, params in self.statements:
            cur.execute(t.q(statement), params(env, event))
        if self.touches is not None:
            touch(cur, t, self.touches, env, {})


_INSERT_LANE = (
    "INSERT INTO {rm_lanes} (workspace_id, project_id, name, ord, wip_limit, card_count)"
    " VALUES (%s, %s, %s, %s, %s, 0)"
)

workspace_created = Writes[ev.WorkspaceCreated](
    (
        "INSERT INTO {rm_workspaces} (workspace_id, name, markup, billing_increment_micros,"
        " monthly_limit_micros, stripe_customer_id, version, created_at, updated_at)"
        " VALUES (%s, %s, '5', 250000, NULL, NULL, %s, %s, %s)",
        lambda env, event: (
            env.originator_id,
            event.name,
            env.originator_version,
            env.timestamp,
            env.timestamp,
        ),
    ),
    (
        "INSERT INTO {rm_members} (workspace_id, user_id, role) VALUES (%s, %s, 'OWNER')",
        lambda env, event: (env.originator_id, event.owner_id),
    ),
)


def workspace_changed(
    cur: Cursor[DictRow],
    t: Tables,
    env: EventEnvelope,
    event: ev.WorkspaceRenamed
    | ev.WorkspacePlanSet
    | ev.WorkspaceSpendLimitSet
    | ev.WorkspaceStripeCustomerLinked,
) -> None:
    columns: dict[str, Any]
    if isinstance(event, ev.WorkspaceRenamed):
        columns = {"name": event.name}
    elif isinstance(event, ev.WorkspacePlanSet):
        columns = {
            "markup": event.markup,
            "billing_increment_micros": event.billing_increment_micros,
        }
    elif isinstance(event, ev.WorkspaceSpendLimitSet):
        columns = {"monthly_limit_micros": event.monthly_limit_micros}
    else:
        columns = {"stripe_customer_id": event.customer_id}
    touch(cur, t, WORKSPACE, env, columns)


member_set = Writes[ev.WorkspaceMemberAdded | ev.WorkspaceRoleChanged](
    (
        "INSERT INTO {rm_members} (workspace_id, user_id, role) VALUES (%s, %s, %s)"
        " ON CONFLICT (workspace_id, user_id) DO UPDATE SET role = EXCLUDED.role",
        lambda env, event: (env.originator_id, event.user_id, event.role),
    ),
    touches=WORKSPACE,
)

member_removed = Writes[ev.WorkspaceMemberRemoved](
    (
        "DELETE FROM {rm_members} WHERE workspace_id = %s AND user_id = %s",
        lambda env, event: (env.originator_id, event.user_id),
    ),
    touches=WORKSPACE,
)


def project_created(
    cur: Cursor[DictRow], t: Tables, env: EventEnvelope, event: ev.ProjectCreated
) -> None:
    cur.execute(
        t.q(
            "INSERT INTO {rm_projects} (workspace_id, project_id, name, archived, version,"
            " created_at, updated_at) VALUES (%s, %s, %s, false, %s, %s, %s)"
        ),
        (
            env.workspace_id,
            env.originator_id,
            event.name,
            env.originator_version,
            env.timestamp,
            env.timestamp,
        ),
    )
    lanes: list[dict[str, Any]] = event.lanes
    cur.executemany(
        t.q(_INSERT_LANE),
        [
            (env.workspace_id, env.originator_id, lane["name"], i, lane["wip_limit"])
            for i, lane in enumerate(lanes)
        ],
    )


def project_changed(
    cur: Cursor[DictRow],
    t: Tables,
    env: EventEnvelope,
    event: ev.ProjectRenamed | ev.ProjectArchived,
) -> None:
    columns: dict[str, Any] = (
        {"name": event.name} if isinstance(event, ev.ProjectRenamed) else {"archived": True}
    )
    touch(cur, t, BOARD, env, columns)


lane_added = Writes[ev.ProjectLaneAdded](
    (
        "UPDATE {rm_lanes} SET ord = ord + 1 WHERE project_id = %s AND ord >= %s",
        lambda env, event: (env.originator_id, event.index),
    ),
    (
        _INSERT_LANE,
        lambda env, event: (
            env.workspace_id,
            env.originator_id,
            event.name,
            event.index,
            event.wip_limit,
        ),
    ),
    touches=BOARD,
)


def _renamed(env: EventEnvelope, event: ev.ProjectLaneRenamed) -> tuple[Any, ...]:
    """(new name, project, old name)."""
    return (event.name, env.originator_id, event.lane)


def _cards_renamed(env: EventEnvelope, event: ev.ProjectLaneRenamed) -> tuple[Any, ...]:
    """:func:`_renamed`, and where the rename is in the log (see :data:`lane_renamed`)."""
    return (*_renamed(env, event), env.position, list(LANE_SETTING_TOPICS))


#: The stored topics of the card events that put a card in a lane, and of a lane's rename.
LANE_SETTING_TOPICS = tuple(
    get_topic(cls) for cls in (Card.Created, Card.Moved, Card.Respread, Card.Restored)
)
LANE_RENAMED_TOPIC = get_topic(Project.LaneRenamed)
#: As a literal in the statement, so that a prepared (generic) plan still uses the index of
#: renames alone (migration 0028), not every event of a busy board.
_LANE_RENAMED_LITERAL = "'" + LANE_RENAMED_TOPIC.replace("'", "''") + "'"

#: Renames the lane and moves its cards' rows to the new name (behind the fold's memory). Not a
#: card whose lane an event after the rename set: applied first (the rename's delivery late),
#: it was put in a lane that had that name after the rename, not in the lane renamed.
lane_renamed = Writes[ev.ProjectLaneRenamed](
    ("UPDATE {rm_lanes} SET name = %s WHERE project_id = %s AND name = %s", _renamed),
    (
        "UPDATE {rm_cards} AS c SET lane = %s WHERE c.project_id = %s AND c.lane = %s"
        " AND NOT EXISTS (SELECT FROM agentworks_events AS e"
        " WHERE e.originator_id = c.card_id AND e.originator_version <= c.version"
        " AND e.notification_id > %s AND e.topic = ANY(%s::text[]))",
        _cards_renamed,
    ),
    touches=BOARD,
)


def renames_applied(
    cur: Cursor[DictRow], t: Tables, projects: Sequence[str], after: int
) -> dict[str, list[tuple[int, str, str]]]:
    """The lane renames of ``projects`` stored after position ``after`` that the read model
    has applied (up to each board's version), in order: project → (position, old name, new
    name). A card event that puts a card in a lane, applied after such a rename (its delivery
    late), names the lane as the board named it before the rename: the rename, when it was
    applied, did not move that card. A rename that cannot be read ends its project's list (the
    board's events stop before it: its aggregate is parked)."""
    renames = fetch_all(
        cur,
        t.q(
            "SELECT e.originator_id::text AS project_id, e.notification_id AS position, e.state"
            " FROM agentworks_events AS e JOIN {rm_projects} AS p"
            " ON p.project_id = e.originator_id"
            " WHERE e.originator_id = ANY(%s::uuid[]) AND e.topic = "
            + _LANE_RENAMED_LITERAL
            + " AND e.notification_id > %s AND e.originator_version <= p.version"
            " ORDER BY e.originator_id, e.originator_version"
        ),
        (sorted(projects), after),
    )
    found: dict[str, list[tuple[int, str, str]]] = {}
    ended: set[str] = set()
    for row in renames:
        project = row["project_id"]
        if project in ended:
            continue
        try:
            state = orjson.loads(bytes(row["state"]))
        except ValueError:
            state = None
        old = state.get("lane") if isinstance(state, dict) else None
        new = state.get("name") if isinstance(state, dict) else None
        if not (isinstance(old, str) and isinstance(new, str)):
            ended.add(project)
            continue
        found.setdefault(project, []).append((int(row["position"]), old, new))
    return found


def lane_after(renames: Sequence[tuple[int, str, str]], position: int, lane: str) -> str:
    """The name ``lane``, entered at ``position``, has after ``renames`` (those later)."""
    for renamed_at, old, new in renames:
        if renamed_at > position and old == lane:
            lane = new
    return lane


lanes_reordered = Writes[ev.ProjectLanesReordered](
    (
        "UPDATE {rm_lanes} AS l SET ord = o.ord - 1"
        " FROM unnest(%s::text[]) WITH ORDINALITY AS o(name, ord)"
        " WHERE l.project_id = %s AND l.name = o.name",
        lambda env, event: (event.order, env.originator_id),
    ),
    touches=BOARD,
)

wip_limit_set = Writes[ev.ProjectWipLimitSet](
    (
        "UPDATE {rm_lanes} SET wip_limit = %s WHERE project_id = %s AND name = %s",
        lambda env, event: (event.wip_limit, env.originator_id, event.lane),
    ),
    touches=BOARD,
)


def lane_removed(
    cur: Cursor[DictRow], t: Tables, env: EventEnvelope, event: ev.ProjectLaneRemoved
) -> None:
    removed = fetch_all(
        cur,
        t.q("DELETE FROM {rm_lanes} WHERE project_id = %s AND name = %s RETURNING ord"),
        (env.originator_id, event.lane),
    )
    if removed:
        cur.execute(
            t.q("UPDATE {rm_lanes} SET ord = ord - 1 WHERE project_id = %s AND ord > %s"),
            (env.originator_id, removed[0]["ord"]),
        )
    touch_board(cur, t, env)


# -- API keys and invitations (listed by admins; never their secrets' digests) -------------------

api_key_created = Writes[ev.ApiKeyCreated](
    (
        "INSERT INTO {rm_api_keys} (workspace_id, key_id, name, role, created_by, created_at,"
        " revoked_at) VALUES (%s, %s, %s, %s, %s, %s, NULL)",
        lambda env, event: (
            event.workspace_id,
            env.originator_id,
            event.name,
            event.role,
            event.created_by,
            env.timestamp,
        ),
    ),
)

api_key_revoked = Writes[ev.ApiKeyRevoked](
    (
        "UPDATE {rm_api_keys} SET revoked_at = %s WHERE key_id = %s",
        lambda env, event: (env.timestamp, env.originator_id),
    ),
)

invitation_created = Writes[ev.InvitationCreated](
    (
        "INSERT INTO {rm_invitations} (workspace_id, invitation_id, email, role, invited_by,"
        " created_at, expires_at, accepted_by, accepted_at, revoked_at)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, NULL, NULL, NULL)",
        lambda env, event: (
            event.workspace_id,
            env.originator_id,
            event.email,
            event.role,
            event.invited_by,
            env.timestamp,
            event.expires_at,
        ),
    ),
)

invitation_accepted = Writes[ev.InvitationAccepted](
    (
        "UPDATE {rm_invitations} SET accepted_by = %s, accepted_at = %s WHERE invitation_id = %s",
        lambda env, event: (event.user_id, env.timestamp, env.originator_id),
    ),
)

invitation_revoked = Writes[ev.InvitationRevoked](
    (
        "UPDATE {rm_invitations} SET revoked_at = %s WHERE invitation_id = %s",
        lambda env, event: (env.timestamp, env.originator_id),
    ),
)
