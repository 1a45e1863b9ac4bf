"""The Kanban read model: workspaces and members, projects, lanes with live counts, cards in
board order with their last run and cost so far."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar
from uuid import UUID

from projections.base import Change, Projector, Tables, on
from projections.batch import MEMO_DROPPED, BatchContext, columns_of

if TYPE_CHECKING:
    from psycopg import Cursor
    from psycopg.rows import DictRow

    from domain.envelope import EventEnvelope


def board_channel(project_id: object) -> str:
    return f"board:{project_id}"


#: rm_cards as the batch path reads and writes it, with each column's SQL type.
_CARD_COLUMNS: tuple[tuple[str, str], ...] = (
    ("workspace_id", "uuid"),
    ("card_id", "uuid"),
    ("project_id", "uuid"),
    ("title", "text"),
    ("description", "text"),
    ("lane", "text"),
    ("position", "text"),
    ("assignee", "text"),
    ("labels", "jsonb"),  # sent as JSON: unnest cannot carry one array per row
    ("blocked_reason", "text"),
    ("archived", "boolean"),
    ("version", "bigint"),
    ("created_at", "timestamptz"),
    ("updated_at", "timestamptz"),
    ("last_run_id", "uuid"),
    ("last_run_position", "bigint"),
    ("cost_micros", "bigint"),
)
_CARD_NAMES = tuple(name for name, _ in _CARD_COLUMNS)
_UUID_COLUMNS = ("workspace_id", "card_id", "project_id", "last_run_id")

# Labels as the per-event statements leave them: sorted and distinct (in the database's
# collation) after an add; in their order, less the removed one, after removals only.
_LABELS = (
    "CASE WHEN v.sort_labels"
    " THEN ARRAY(SELECT DISTINCT x FROM jsonb_array_elements_text(v.labels) AS x ORDER BY x)"
    " ELSE ARRAY(SELECT x FROM jsonb_array_elements_text(v.labels) WITH ORDINALITY AS e(x, i)"
    " ORDER BY i) END"
)
_CARD_VALUES = (
    " FROM unnest("
    + ", ".join(f"%s::{kind}[]" for _, kind in _CARD_COLUMNS)
    + ", %s::boolean[]) AS v("
    + ", ".join(_CARD_NAMES)
    + ", sort_labels)"
)
_INSERT_CARDS = (
    "INSERT INTO {rm_cards} ("
    + ", ".join(_CARD_NAMES)
    + ") SELECT "
    + ", ".join(_LABELS if name == "labels" else f"v.{name}" for name in _CARD_NAMES)
    + _CARD_VALUES
)
_UPDATE_CARDS = (
    "UPDATE {rm_cards} AS c SET "
    + ", ".join(
        f"{name} = " + (_LABELS if name == "labels" else f"v.{name}")
        for name in _CARD_NAMES
        if name not in ("workspace_id", "card_id")
    )
    + _CARD_VALUES
    + " WHERE c.card_id = v.card_id"
)

#: Card and run events the batch path folds; every other handled event is applied on its own,
#: in its place, after what came before it has been written.
_CARD_SETS: dict[str, tuple[tuple[str, str], ...]] = {
    "Card.Edited": (("title", "title"), ("description", "description")),
    "Card.Moved": (("lane", "to_lane"), ("position", "position")),
    "Card.Assigned": (("assignee", "assignee"),),
    "Card.Blocked": (("blocked_reason", "reason"),),
    "Card.Unblocked": (),
    "Card.Archived": (),
    "Card.Restored": (("lane", "lane"), ("position", "position")),
}
_CARD_KIND = {
    "Card.Moved": "card.moved",
    "Card.Archived": "card.archived",
    "Card.Restored": "card.restored",
}
_RUN_STATUS = frozenset(
    {
        "AgentRun.Started",
        "AgentRun.Succeeded",
        "AgentRun.Failed",
        "AgentRun.Cancelled",
        "AgentRun.TimedOut",
    }
)
_FOLDED = frozenset(
    {
        "Card.Created",
        "Card.Labelled",
        "Card.Unlabelled",
        *_CARD_SETS,
        "AgentRun.Requested",
        "AgentRun.LlmCallCompleted",
        *_RUN_STATUS,
        "Project.CardPlaced",
        "Project.CardMoved",
        "Project.CardLifted",
    }
)

_MEMO_CARDS = "kanban.cards"
_SORTED = "_labels_sorted"
_MEMO_COMPLETE = "kanban.complete"
#: How many cards a rebuild keeps in memory before it forgets them and reads them back.
MEMO_CARDS_LIMIT = 200_000


class _Segment:
    """A run of folded events: the card rows they touch, held in memory, and board counters."""

    def __init__(self, ctx: BatchContext) -> None:
        self.ctx = ctx
        self.cards: dict[str, dict[str, Any] | None] = {}
        """Card id → its row as the events so far leave it (None: no row)."""
        self.existing: set[str] = set()
        self.dirty: set[str] = set()
        self.sort_labels: set[str] = set()
        self.by_run: dict[str, str] = {}
        self.touched: dict[str, tuple[int, Any]] = {}
        self.counts: dict[tuple[str, str], int] = {}


class KanbanProjector(Projector):
    name: ClassVar[str] = "kanban"
    aggregates: ClassVar[frozenset[str]] = frozenset({"Workspace", "Project", "Card", "AgentRun"})
    tables: ClassVar[tuple[str, ...]] = (
        "rm_workspaces",
        "rm_members",
        "rm_projects",
        "rm_lanes",
        "rm_cards",
    )

    # -- workspaces ---------------------------------------------------------------------------

    @on("Workspace.Created")
    def _workspace_created(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        p = env.payload
        cur.execute(
            t.q(
                "INSERT INTO {rm_workspaces} (workspace_id, name, markup, billing_increment_micros,"
                " monthly_limit_micros, stripe_customer_id, version, created_at, updated_at)"
                " VALUES (%s, %s, '5', 250000, NULL, NULL, %s, %s, %s)"
            ),
            (env.originator_id, p["name"], env.originator_version, env.timestamp, env.timestamp),
        )
        cur.execute(
            t.q("INSERT INTO {rm_members} (workspace_id, user_id, role) VALUES (%s, %s, 'OWNER')"),
            (env.originator_id, p["owner_id"]),
        )

    @on(
        "Workspace.Renamed",
        "Workspace.PlanSet",
        "Workspace.SpendLimitSet",
        "Workspace.StripeCustomerLinked",
    )
    def _workspace_changed(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        columns = {
            "Workspace.Renamed": {"name": env.payload.get("name")},
            "Workspace.PlanSet": {
                "markup": env.payload.get("markup"),
                "billing_increment_micros": env.payload.get("billing_increment_micros"),
            },
            "Workspace.SpendLimitSet": {
                "monthly_limit_micros": env.payload.get("monthly_limit_micros")
            },
            "Workspace.StripeCustomerLinked": {
                "stripe_customer_id": env.payload.get("customer_id")
            },
        }[env.type]
        self._touch(cur, t, "rm_workspaces", "workspace_id", env, columns)

    @on("Workspace.MemberAdded", "Workspace.RoleChanged")
    def _member_set(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        cur.execute(
            t.q(
                "INSERT INTO {rm_members} (workspace_id, user_id, role) VALUES (%s, %s, %s)"
                " ON CONFLICT (workspace_id, user_id) DO UPDATE SET role = EXCLUDED.role"
            ),
            (env.originator_id, env.payload["user_id"], env.payload["role"]),
        )
        self._touch(cur, t, "rm_workspaces", "workspace_id", env, {})

    @on("Workspace.MemberRemoved")
    def _member_removed(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        cur.execute(
            t.q("DELETE FROM {rm_members} WHERE workspace_id = %s AND user_id = %s"),
            (env.originator_id, env.payload["user_id"]),
        )
        self._touch(cur, t, "rm_workspaces", "workspace_id", env, {})

    # -- projects and lanes -------------------------------------------------------------------

    @on("Project.Created")
    def _project_created(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        cur.execute(
            t.q(
                "INSERT INTO {rm_projects} (workspace_id, project_id, name, archived, version,"
                " created_at, updated_at) VALUES (%s, %s, %s, false, %s, %s, %s)"
            ),
            (
                env.workspace_id,
                env.originator_id,
                env.payload["name"],
                env.originator_version,
                env.timestamp,
                env.timestamp,
            ),
        )
        lanes: list[dict[str, Any]] = env.payload["lanes"]
        cur.executemany(
            t.q(
                "INSERT INTO {rm_lanes} (workspace_id, project_id, name, ord, wip_limit,"
                " card_count) VALUES (%s, %s, %s, %s, %s, 0)"
            ),
            [
                (env.workspace_id, env.originator_id, lane["name"], i, lane["wip_limit"])
                for i, lane in enumerate(lanes)
            ],
        )
        self._board_changed(env, changes, "board.created")

    @on("Project.Renamed", "Project.Archived")
    def _project_changed(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        columns: dict[str, Any] = (
            {"name": env.payload["name"]} if env.type == "Project.Renamed" else {"archived": True}
        )
        self._touch(cur, t, "rm_projects", "project_id", env, columns)
        self._board_changed(env, changes, "board.updated")

    @on("Project.LaneAdded")
    def _lane_added(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        p = env.payload
        cur.execute(
            t.q("UPDATE {rm_lanes} SET ord = ord + 1 WHERE project_id = %s AND ord >= %s"),
            (env.originator_id, p["index"]),
        )
        cur.execute(
            t.q(
                "INSERT INTO {rm_lanes} (workspace_id, project_id, name, ord, wip_limit,"
                " card_count) VALUES (%s, %s, %s, %s, %s, 0)"
            ),
            (env.workspace_id, env.originator_id, p["name"], p["index"], p["wip_limit"]),
        )
        self._board_version(cur, t, env, changes, "lane.added")

    @on("Project.LaneRenamed")
    def _lane_renamed(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        args = (env.payload["name"], env.originator_id, env.payload["lane"])
        cur.execute(
            t.q("UPDATE {rm_lanes} SET name = %s WHERE project_id = %s AND name = %s"), args
        )
        cur.execute(
            t.q("UPDATE {rm_cards} SET lane = %s WHERE project_id = %s AND lane = %s"), args
        )
        self._board_version(cur, t, env, changes, "lane.renamed")

    @on("Project.LanesReordered")
    def _lanes_reordered(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        order: list[str] = env.payload["order"]
        cur.execute(
            t.q(
                "UPDATE {rm_lanes} AS l SET ord = o.ord - 1"
                " FROM unnest(%s::text[]) WITH ORDINALITY AS o(name, ord)"
                " WHERE l.project_id = %s AND l.name = o.name"
            ),
            (order, env.originator_id),
        )
        self._board_version(cur, t, env, changes, "lanes.reordered")

    @on("Project.LaneRemoved")
    def _lane_removed(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        cur.execute(
            t.q("DELETE FROM {rm_lanes} WHERE project_id = %s AND name = %s RETURNING ord"),
            (env.originator_id, env.payload["lane"]),
        )
        removed = cur.fetchone()
        if removed is not None:
            cur.execute(
                t.q("UPDATE {rm_lanes} SET ord = ord - 1 WHERE project_id = %s AND ord > %s"),
                (env.originator_id, removed["ord"]),
            )
        self._board_version(cur, t, env, changes, "lane.removed")

    @on("Project.WipLimitSet")
    def _wip_limit_set(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        cur.execute(
            t.q("UPDATE {rm_lanes} SET wip_limit = %s WHERE project_id = %s AND name = %s"),
            (env.payload["wip_limit"], env.originator_id, env.payload["lane"]),
        )
        self._board_version(cur, t, env, changes, "lane.wip_limit")

    @on("Project.CardPlaced")
    def _card_placed(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        self._count(cur, t, env, env.payload["lane"], +1)
        self._board_version(cur, t, env, None, "")

    @on("Project.CardMoved")
    def _card_moved_on_board(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        if env.payload["from_lane"] != env.payload["to_lane"]:
            self._count(cur, t, env, env.payload["from_lane"], -1)
            self._count(cur, t, env, env.payload["to_lane"], +1)
        self._board_version(cur, t, env, None, "")

    @on("Project.CardLifted")
    def _card_lifted(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        self._count(cur, t, env, env.payload["lane"], -1)
        self._board_version(cur, t, env, None, "")

    # -- cards ----------------------------------------------------------------------------------

    @on("Card.Created")
    def _card_created(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        p = env.payload
        # Upsert: run events (another topic) may already have left a row carrying run data.
        cur.execute(
            t.q(
                "INSERT INTO {rm_cards} (workspace_id, card_id, project_id, title, description,"
                " lane, position, version, created_at, updated_at)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (card_id) DO UPDATE SET project_id = EXCLUDED.project_id,"
                " title = EXCLUDED.title, description = EXCLUDED.description,"
                " lane = EXCLUDED.lane, position = EXCLUDED.position, version = EXCLUDED.version,"
                " created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at"
            ),
            (
                env.workspace_id,
                env.originator_id,
                p["project_id"],
                p["title"],
                p["description"],
                p["lane"],
                p["position"],
                env.originator_version,
                env.timestamp,
                env.timestamp,
            ),
        )
        self._card_changed(env, changes, "card.created", p["project_id"], p["position"])

    @on(
        "Card.Edited",
        "Card.Moved",
        "Card.Assigned",
        "Card.Blocked",
        "Card.Unblocked",
        "Card.Archived",
        "Card.Restored",
    )
    def _card_updated(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        p = env.payload
        by_type: dict[str, dict[str, Any]] = {
            "Card.Edited": {"title": p.get("title"), "description": p.get("description")},
            "Card.Moved": {"lane": p.get("to_lane"), "position": p.get("position")},
            "Card.Assigned": {"assignee": p.get("assignee")},
            "Card.Blocked": {"blocked_reason": p.get("reason")},
            "Card.Unblocked": {"blocked_reason": None},
            "Card.Archived": {"archived": True},
            "Card.Restored": {
                "archived": False,
                "lane": p.get("lane"),
                "position": p.get("position"),
            },
        }
        columns = by_type[env.type]
        project_id = self._touch(
            cur, t, "rm_cards", "card_id", env, columns, returning="project_id"
        )
        kind = {
            "Card.Moved": "card.moved",
            "Card.Archived": "card.archived",
            "Card.Restored": "card.restored",
        }.get(env.type, "card.updated")
        self._card_changed(env, changes, kind, project_id, p.get("position"))

    @on("Card.Labelled", "Card.Unlabelled")
    def _card_labels(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        label = env.payload["label"]
        if env.type == "Card.Labelled":
            expression = "ARRAY(SELECT DISTINCT x FROM unnest(labels || %s::text) AS x ORDER BY x)"
        else:
            expression = "array_remove(labels, %s::text)"
        cur.execute(
            t.q(
                "UPDATE {rm_cards} SET labels = " + expression + ", version = %s, updated_at = %s"
                " WHERE card_id = %s RETURNING project_id"
            ),
            (label, env.originator_version, env.timestamp, env.originator_id),
        )
        row = cur.fetchone()
        self._card_changed(env, changes, "card.updated", row["project_id"] if row else None, None)

    # -- runs as the board shows them ------------------------------------------------------------

    @on("AgentRun.Requested")
    def _run_requested(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        self._card_run_upsert(
            cur,
            t,
            env,
            "last_run_id = CASE WHEN EXCLUDED.last_run_position > c.last_run_position"
            " THEN EXCLUDED.last_run_id ELSE c.last_run_id END,"
            " last_run_position = GREATEST(c.last_run_position, EXCLUDED.last_run_position)",
            last_run_id=env.originator_id,
            last_run_position=env.position,
            cost_micros=0,
        )
        self._run_changed(env, changes, env.payload["project_id"], env.payload["card_id"])

    @on("AgentRun.LlmCallCompleted")
    def _run_cost(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        self._card_run_upsert(
            cur,
            t,
            env,
            "cost_micros = c.cost_micros + EXCLUDED.cost_micros",
            last_run_id=None,
            last_run_position=0,
            cost_micros=int(env.payload["billed_micros"]),
        )
        self._run_changed(env, changes, env.payload["project_id"], env.payload["card_id"])

    @staticmethod
    def _card_run_upsert(
        cur: Cursor[DictRow],
        t: Tables,
        env: EventEnvelope,
        assignments: str,
        *,
        last_run_id: object,
        last_run_position: int,
        cost_micros: int,
    ) -> None:
        """Apply run data to the card whether or not the card's own events arrived yet.

        A card not seen yet gets a placeholder row (empty lane, version 0) that its creation
        event fills in; both updates commute, so any delivery order ends in the same row.
        """
        cur.execute(
            t.q(
                "INSERT INTO {rm_cards} AS c (workspace_id, card_id, project_id, title,"
                " description, lane, position, version, created_at, updated_at, last_run_id,"
                " last_run_position, cost_micros)"
                " VALUES (%s, %s, %s, '', '', '', '', 0, %s, %s, %s, %s, %s)"
                " ON CONFLICT (card_id) DO UPDATE SET " + assignments
            ),
            (
                env.workspace_id,
                env.payload["card_id"],
                env.payload["project_id"],
                env.timestamp,
                env.timestamp,
                last_run_id,
                last_run_position,
                cost_micros,
            ),
        )

    @on("AgentRun.Started", "AgentRun.Succeeded", "AgentRun.Failed", "AgentRun.Cancelled",
        "AgentRun.TimedOut")  # fmt: skip
    def _run_status(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        cur.execute(
            t.q("SELECT project_id, card_id FROM {rm_cards} WHERE last_run_id = %s"),
            (env.originator_id,),
        )
        row = cur.fetchone()
        if row is not None:
            self._run_changed(env, changes, row["project_id"], row["card_id"])

    # -- the batch path ---------------------------------------------------------------------------

    def apply_batch(self, ctx: BatchContext, envelopes: Sequence[EventEnvelope]) -> None:
        """The same rows and changes as event by event, with a few statements per batch.

        Card, run and board-counter events are folded: the cards they touch are read once (and
        locked), changed in memory in log order, and written back with one insert and one
        update; lane counts and board versions with one update each. Any other event (a new
        project, a renamed lane, workspace changes: rare) is applied on its own, in its place,
        after writing what the events before it did.
        """
        segment: list[EventEnvelope] = []
        throwaway: list[Change] = []
        for env in envelopes:
            if env.type in _FOLDED:
                segment.append(env)
                continue
            method = self._handlers.get(env.type)
            if method is None:
                continue
            self._fold(ctx, segment)
            segment = []
            changes = ctx.changes if ctx.changes is not None else throwaway
            getattr(self, method)(ctx.cur, env, ctx.tables, changes)
            if env.type == "Project.LaneRenamed":
                ctx.memo.pop(_MEMO_CARDS, None)  # it rewrote cards behind the memo's back
                ctx.memo[_MEMO_COMPLETE] = False
            throwaway.clear()
        self._fold(ctx, segment)

    def _fold(self, ctx: BatchContext, envelopes: list[EventEnvelope]) -> None:
        if not envelopes:
            return
        seg = _Segment(ctx)
        self._load_cards(seg, envelopes)
        for env in envelopes:
            kind = env.type
            if kind in _CARD_SETS:
                self._fold_card_update(seg, env)
            elif kind == "Project.CardMoved":
                p = env.payload
                if p["from_lane"] != p["to_lane"]:
                    self._fold_count(seg, env, p["from_lane"], -1)
                    self._fold_count(seg, env, p["to_lane"], +1)
                seg.touched[str(env.originator_id)] = (env.originator_version, env.timestamp)
            elif kind == "AgentRun.LlmCallCompleted":
                self._fold_run(seg, env, None, 0, int(env.payload["billed_micros"]))
                self._run_changed_in(ctx, env, env.payload["project_id"], env.payload["card_id"])
            elif kind == "Card.Labelled" or kind == "Card.Unlabelled":
                self._fold_labels(seg, env)
            elif kind in _RUN_STATUS:
                if ctx.changes is not None:
                    run_id = str(env.originator_id)
                    card_id = seg.by_run.get(run_id)
                    row = seg.cards.get(card_id) if card_id is not None else None
                    if row is not None and row["last_run_id"] == run_id:
                        self._run_changed(env, ctx.changes, row["project_id"], row["card_id"])
            elif kind == "Project.CardPlaced":
                self._fold_count(seg, env, env.payload["lane"], +1)
                seg.touched[str(env.originator_id)] = (env.originator_version, env.timestamp)
            elif kind == "Project.CardLifted":
                self._fold_count(seg, env, env.payload["lane"], -1)
                seg.touched[str(env.originator_id)] = (env.originator_version, env.timestamp)
            elif kind == "Card.Created":
                self._fold_card_created(seg, env)
            elif kind == "AgentRun.Requested":
                self._fold_run(seg, env, str(env.originator_id), env.position, 0)
                self._run_changed_in(ctx, env, env.payload["project_id"], env.payload["card_id"])
        self._write_segment(seg)

    def _load_cards(self, seg: _Segment, envelopes: list[EventEnvelope]) -> None:
        """Read (and lock) the rows of every card the segment touches; in a rebuild, from
        memory where it can."""
        ctx = seg.ctx
        wanted: set[str] = set()
        runs: set[str] = set()
        for env in envelopes:
            if env.aggregate == "Card":
                wanted.add(str(env.originator_id))
            elif env.type == "AgentRun.Requested" or env.type == "AgentRun.LlmCallCompleted":
                wanted.add(_card_key(env.payload["card_id"]))
            elif env.type in _RUN_STATUS and ctx.changes is not None:
                runs.add(str(env.originator_id))
        memo: dict[str, dict[str, Any]] | None = None
        if ctx.exclusive and ctx.copy and not runs:
            memo = ctx.memo.setdefault(_MEMO_CARDS, {})
            complete = ctx.memo.setdefault(_MEMO_COMPLETE, MEMO_DROPPED not in ctx.memo)
            missing = set()
            for card_id in wanted:
                row = memo.get(card_id)
                if row is not None:
                    seg.cards[card_id] = row
                    seg.existing.add(card_id)
                elif complete:
                    seg.cards[card_id] = None
                else:
                    missing.add(card_id)
            wanted = missing
        if wanted or runs:
            statement = (
                "SELECT " + ", ".join(_CARD_NAMES) + " FROM {rm_cards}"
                " WHERE card_id = ANY(%s::uuid[])"
            )
            params: list[Any] = [sorted(wanted)]
            if runs:
                statement += " OR last_run_id = ANY(%s::uuid[])"
                params.append(sorted(runs))
            statement += " ORDER BY card_id"
            if not ctx.exclusive:
                statement += " FOR UPDATE"
            ctx.cur.execute(ctx.tables.q(statement), params)
            for found in ctx.cur.fetchall():
                row = dict(found)
                for column in _UUID_COLUMNS:
                    if row[column] is not None:
                        row[column] = str(row[column])
                row["labels"] = list(row["labels"])
                seg.cards[row["card_id"]] = row
                seg.existing.add(row["card_id"])
                if row["last_run_id"] is not None:
                    seg.by_run[row["last_run_id"]] = row["card_id"]
            for card_id in wanted:
                seg.cards.setdefault(card_id, None)
        if memo is not None:
            for card_id in seg.existing:
                row = seg.cards[card_id]
                if row is not None:
                    memo[card_id] = row

    @staticmethod
    def _fold_card_created(seg: _Segment, env: EventEnvelope) -> None:
        p = env.payload
        card_id = str(env.originator_id)
        row = seg.cards.get(card_id)
        values = {
            "project_id": _card_key(p["project_id"]),
            "title": p["title"],
            "description": p["description"],
            "lane": p["lane"],
            "position": p["position"],
            "version": env.originator_version,
            "created_at": env.timestamp,
            "updated_at": env.timestamp,
        }
        if row is None:
            row = {
                "workspace_id": _text(env.workspace_id),
                "card_id": card_id,
                "assignee": None,
                "labels": [],
                "blocked_reason": None,
                "archived": False,
                "last_run_id": None,
                "last_run_position": 0,
                "cost_micros": 0,
                **values,
            }
            seg.cards[card_id] = row
        else:
            row.update(values)
        seg.dirty.add(card_id)
        if seg.ctx.changes is not None:
            KanbanProjector._card_changed(
                env, seg.ctx.changes, "card.created", p["project_id"], p["position"]
            )

    @staticmethod
    def _fold_card_update(seg: _Segment, env: EventEnvelope) -> None:
        card_id = str(env.originator_id)
        row = seg.cards.get(card_id)
        p = env.payload
        if row is not None:
            for column, key in _CARD_SETS[env.type]:
                row[column] = p.get(key)
            if env.type == "Card.Unblocked":
                row["blocked_reason"] = None
            elif env.type == "Card.Archived":
                row["archived"] = True
            elif env.type == "Card.Restored":
                row["archived"] = False
            row["version"] = env.originator_version
            row["updated_at"] = env.timestamp
            seg.dirty.add(card_id)
        if seg.ctx.changes is not None:
            kind = _CARD_KIND.get(env.type, "card.updated")
            project_id = row["project_id"] if row is not None else None
            KanbanProjector._card_changed(env, seg.ctx.changes, kind, project_id, p.get("position"))

    @staticmethod
    def _fold_labels(seg: _Segment, env: EventEnvelope) -> None:
        card_id = str(env.originator_id)
        row = seg.cards.get(card_id)
        if row is not None:
            label = env.payload["label"]
            labels: list[str] = [x for x in row["labels"] if x != label]
            if env.type == "Card.Labelled":
                labels.append(label)
                seg.sort_labels.add(card_id)
            row["labels"] = labels
            row["version"] = env.originator_version
            row["updated_at"] = env.timestamp
            seg.dirty.add(card_id)
        if seg.ctx.changes is not None:
            project_id = row["project_id"] if row is not None else None
            KanbanProjector._card_changed(env, seg.ctx.changes, "card.updated", project_id, None)

    @staticmethod
    def _fold_run(
        seg: _Segment, env: EventEnvelope, run_id: str | None, position: int, cost: int
    ) -> None:
        """:meth:`_card_run_upsert`, in memory: a request names the card's last run if it is
        the newest in the log; a call adds its cost; a card not seen yet gets a placeholder."""
        p = env.payload
        card_id = _card_key(p["card_id"])
        row = seg.cards.get(card_id)
        if row is None:
            row = {
                "workspace_id": _text(env.workspace_id),
                "card_id": card_id,
                "project_id": _card_key(p["project_id"]),
                "title": "",
                "description": "",
                "lane": "",
                "position": "",
                "assignee": None,
                "labels": [],
                "blocked_reason": None,
                "archived": False,
                "version": 0,
                "created_at": env.timestamp,
                "updated_at": env.timestamp,
                "last_run_id": run_id,
                "last_run_position": position,
                "cost_micros": cost,
            }
            seg.cards[card_id] = row
        else:
            if run_id is not None and position > row["last_run_position"]:
                row["last_run_id"] = run_id
            row["last_run_position"] = max(row["last_run_position"], position)
            row["cost_micros"] += cost
        if run_id is not None and row["last_run_id"] == run_id:
            seg.by_run[run_id] = card_id
        seg.dirty.add(card_id)

    @staticmethod
    def _fold_count(seg: _Segment, env: EventEnvelope, lane: str, delta: int) -> None:
        key = (str(env.originator_id), lane)
        seg.counts[key] = seg.counts.get(key, 0) + delta

    @staticmethod
    def _run_changed_in(
        ctx: BatchContext, env: EventEnvelope, project_id: object, card_id: object
    ) -> None:
        if ctx.changes is not None:
            KanbanProjector._run_changed(env, ctx.changes, project_id, card_id)

    @staticmethod
    def _write_segment(seg: _Segment) -> None:
        cur, t = seg.ctx.cur, seg.ctx.tables
        inserts: list[tuple[Any, ...]] = []
        updates: list[tuple[Any, ...]] = []
        for card_id in sorted(seg.dirty):
            row = seg.cards[card_id]
            assert row is not None
            values = (
                *(json.dumps(row[name]) if name == "labels" else row[name] for name in _CARD_NAMES),
                card_id in seg.sort_labels or _SORTED in row,
            )
            (updates if card_id in seg.existing else inserts).append(values)
        width = len(_CARD_COLUMNS) + 1
        if inserts:
            cur.execute(t.q(_INSERT_CARDS), columns_of(inserts, width))
        if updates:
            cur.execute(t.q(_UPDATE_CARDS), columns_of(updates, width))
        if seg.ctx.exclusive and seg.ctx.copy and _MEMO_CARDS in seg.ctx.memo:
            memo: dict[str, dict[str, Any]] = seg.ctx.memo[_MEMO_CARDS]
            for card_id in seg.dirty:
                row = seg.cards[card_id]
                assert row is not None
                if card_id in seg.sort_labels:
                    # The table now holds them sorted in the database's collation, which Python
                    # may not share: from now on every write of this row sorts them there.
                    row[_SORTED] = True
                memo[card_id] = row
            if len(memo) > MEMO_CARDS_LIMIT:
                memo.clear()
                seg.ctx.memo[_MEMO_COMPLETE] = False
        if seg.touched:
            touched = sorted(seg.touched.items())
            cur.execute(
                t.q(
                    "UPDATE {rm_projects} AS p SET version = v.version, updated_at = v.at"
                    " FROM unnest(%s::uuid[], %s::bigint[], %s::timestamptz[])"
                    " AS v(id, version, at) WHERE p.project_id = v.id"
                ),
                (
                    [k for k, _ in touched],
                    [v for _, (v, _) in touched],
                    [a for _, (_, a) in touched],
                ),
            )
        counts = sorted((k, d) for k, d in seg.counts.items() if d)
        if counts:
            cur.execute(
                t.q(
                    "UPDATE {rm_lanes} AS l SET card_count = l.card_count + v.delta"
                    " FROM unnest(%s::uuid[], %s::text[], %s::integer[]) AS v(id, name, delta)"
                    " WHERE l.project_id = v.id AND l.name = v.name"
                ),
                ([k[0] for k, _ in counts], [k[1] for k, _ in counts], [d for _, d in counts]),
            )

    # -- helpers -----------------------------------------------------------------------------------

    @staticmethod
    def _touch(
        cur: Cursor[DictRow],
        t: Tables,
        table: str,
        key: str,
        env: EventEnvelope,
        columns: dict[str, Any],
        *,
        returning: str | None = None,
    ) -> Any:
        assignments = "".join(f"{column} = %s, " for column in columns)
        statement = (
            f"UPDATE {{{table}}} SET {assignments}version = %s, updated_at = %s WHERE {key} = %s"
        )
        if returning:
            statement += f" RETURNING {returning}"
        cur.execute(
            t.q(statement),
            (*columns.values(), env.originator_version, env.timestamp, env.originator_id),
        )
        if returning:
            row = cur.fetchone()
            return row[returning] if row else None
        return None

    @staticmethod
    def _count(cur: Cursor[DictRow], t: Tables, env: EventEnvelope, lane: str, delta: int) -> None:
        cur.execute(
            t.q(
                "UPDATE {rm_lanes} SET card_count = card_count + %s"
                " WHERE project_id = %s AND name = %s"
            ),
            (delta, env.originator_id, lane),
        )

    def _board_version(
        self,
        cur: Cursor[DictRow],
        t: Tables,
        env: EventEnvelope,
        changes: list[Change] | None,
        kind: str,
    ) -> None:
        self._touch(cur, t, "rm_projects", "project_id", env, {})
        if changes is not None and kind:
            self._board_changed(env, changes, kind)

    @staticmethod
    def _board_changed(env: EventEnvelope, changes: list[Change], kind: str) -> None:
        changes.append(
            Change(
                board_channel(env.originator_id),
                {"kind": kind, "cardId": None, "runId": None, "position": env.position},
            )
        )

    @staticmethod
    def _card_changed(
        env: EventEnvelope,
        changes: list[Change],
        kind: str,
        project_id: object,
        _card_position: object,
    ) -> None:
        if project_id is None:
            return
        changes.append(
            Change(
                board_channel(project_id),
                {
                    "kind": kind,
                    "cardId": str(env.originator_id),
                    "runId": None,
                    "position": env.position,
                },
            )
        )

    @staticmethod
    def _run_changed(
        env: EventEnvelope, changes: list[Change], project_id: object, card_id: object
    ) -> None:
        if project_id is None:
            return
        changes.append(
            Change(
                board_channel(project_id),
                {
                    "kind": f"run.{env.type.split('.', 1)[1].lower()}",
                    "cardId": str(card_id) if card_id else None,
                    "runId": str(env.originator_id),
                    "position": env.position,
                },
            )
        )


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def _card_key(value: object) -> str:
    """A card or project id as the batch path keys it (the canonical text of the UUID)."""
    text = str(value)
    if len(text) == 36 and text.islower():
        return text
    return str(UUID(text))
