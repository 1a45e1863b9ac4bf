"""The Kanban read model: workspaces and members, projects, lanes with live counts, cards in
board order with their last run and cost so far."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar
from uuid import UUID

from domain.events import (
    AgentRunAttemptRecorded,
    AgentRunCancelled,
    AgentRunFailed,
    AgentRunHeartbeat,
    AgentRunLlmCallCompleted,
    AgentRunLogChunkAppended,
    AgentRunOutputRecorded,
    AgentRunReclaimed,
    AgentRunRequested,
    AgentRunStarted,
    AgentRunStepStarted,
    AgentRunSucceeded,
    AgentRunTimedOut,
    CardArchived,
    CardAssigned,
    CardBlocked,
    CardCreated,
    CardEdited,
    CardLabelled,
    CardMoved,
    CardRestored,
    CardUnblocked,
    CardUnlabelled,
    EventPayload,
    ProjectArchived,
    ProjectCardLifted,
    ProjectCardMoved,
    ProjectCardPlaced,
    ProjectCreated,
    ProjectLaneAdded,
    ProjectLaneRemoved,
    ProjectLaneRenamed,
    ProjectLanesReordered,
    ProjectRenamed,
    ProjectWipLimitSet,
    WorkspaceCreated,
    WorkspaceMemberAdded,
    WorkspaceMemberRemoved,
    WorkspacePlanSet,
    WorkspaceRenamed,
    WorkspaceRoleChanged,
    WorkspaceSpendLimitSet,
    WorkspaceStripeCustomerLinked,
    events_of,
)
from projections.base import Change, Projector, Tables, on
from projections.batch import MEMO_DROPPED, BatchContext, columns_of
from projections.columns import CARD_COLUMNS as _CARD_COLUMNS

if TYPE_CHECKING:
    from psycopg import Cursor
    from psycopg.rows import DictRow

    from domain.envelope import EventEnvelope


def board_channel(project_id: object) -> str:
    return f"board:{project_id}"


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
CardUpdate = (
    CardEdited
    | CardMoved
    | CardAssigned
    | CardBlocked
    | CardUnblocked
    | CardArchived
    | CardRestored
)
_CARD_UPDATES: frozenset[type[EventPayload]] = frozenset(
    {CardEdited, CardMoved, CardAssigned, CardBlocked, CardUnblocked, CardArchived, CardRestored}
)


def _card_columns(ev: CardUpdate) -> dict[str, Any]:
    """The card columns an update event sets, and their new values."""
    if isinstance(ev, CardEdited):
        return {"title": ev.title, "description": ev.description}
    if isinstance(ev, CardMoved):
        return {"lane": ev.to_lane, "position": ev.position}
    if isinstance(ev, CardAssigned):
        return {"assignee": ev.assignee}
    if isinstance(ev, CardBlocked):
        return {"blocked_reason": ev.reason}
    if isinstance(ev, CardUnblocked):
        return {"blocked_reason": None}
    if isinstance(ev, CardArchived):
        return {"archived": True}
    return {"archived": False, "lane": ev.lane, "position": ev.position}


_CARD_KIND: dict[type[EventPayload], str] = {
    CardMoved: "card.moved",
    CardArchived: "card.archived",
    CardRestored: "card.restored",
}
_RUN_STATUS = frozenset(
    {
        AgentRunStarted,
        AgentRunSucceeded,
        AgentRunFailed,
        AgentRunCancelled,
        AgentRunTimedOut,
    }
)
_FOLDED = frozenset(
    {
        CardCreated,
        CardLabelled,
        CardUnlabelled,
        *_CARD_UPDATES,
        AgentRunRequested,
        AgentRunLlmCallCompleted,
        *_RUN_STATUS,
        ProjectCardPlaced,
        ProjectCardMoved,
        ProjectCardLifted,
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
    ignores: ClassVar[frozenset[type[EventPayload]]] = frozenset(
        {
            AgentRunAttemptRecorded,
            AgentRunHeartbeat,
            AgentRunLogChunkAppended,
            AgentRunOutputRecorded,
            AgentRunReclaimed,
            AgentRunStepStarted,
        }
    ) | events_of(
        "ApiKey",
        "EmailClaim",
        "Invitation",
        "Invoice",
        "MonthlySpend",
        "OidcLink",
        "Session",
        "UsageCharge",
        "User",
    )

    # -- workspaces ---------------------------------------------------------------------------

    @on(WorkspaceCreated)
    def _workspace_created(
        self,
        cur: Cursor[DictRow],
        env: EventEnvelope,
        ev: WorkspaceCreated,
        t: Tables,
        changes: list[Change],
    ) -> None:
        cur.execute(
            t.q(
                "INSERT INTO {rm_workspaces} (workspace_id, name, markup, billing_increment_micros,"
                " monthly_limit_micros, stripe_customer_id, version, created_at, updated_at)"
                " VALUES (%s, %s, '5', 250000, NULL, NULL, %s, %s, %s)"
            ),
            (env.originator_id, ev.name, env.originator_version, env.timestamp, env.timestamp),
        )
        cur.execute(
            t.q("INSERT INTO {rm_members} (workspace_id, user_id, role) VALUES (%s, %s, 'OWNER')"),
            (env.originator_id, ev.owner_id),
        )

    @on(
        WorkspaceRenamed,
        WorkspacePlanSet,
        WorkspaceSpendLimitSet,
        WorkspaceStripeCustomerLinked,
    )
    def _workspace_changed(
        self,
        cur: Cursor[DictRow],
        env: EventEnvelope,
        ev: WorkspaceRenamed
        | WorkspacePlanSet
        | WorkspaceSpendLimitSet
        | WorkspaceStripeCustomerLinked,
        t: Tables,
        changes: list[Change],
    ) -> None:
        columns: dict[str, Any]
        if isinstance(ev, WorkspaceRenamed):
            columns = {"name": ev.name}
        elif isinstance(ev, WorkspacePlanSet):
            columns = {
                "markup": ev.markup,
                "billing_increment_micros": ev.billing_increment_micros,
            }
        elif isinstance(ev, WorkspaceSpendLimitSet):
            columns = {"monthly_limit_micros": ev.monthly_limit_micros}
        else:
            columns = {"stripe_customer_id": ev.customer_id}
        self._touch(cur, t, "rm_workspaces", "workspace_id", env, columns)

    @on(WorkspaceMemberAdded, WorkspaceRoleChanged)
    def _member_set(
        self,
        cur: Cursor[DictRow],
        env: EventEnvelope,
        ev: WorkspaceMemberAdded | WorkspaceRoleChanged,
        t: Tables,
        changes: list[Change],
    ) -> None:
        cur.execute(
            t.q(
                "INSERT INTO {rm_members} (workspace_id, user_id, role) VALUES (%s, %s, %s)"
                " ON CONFLICT (workspace_id, user_id) DO UPDATE SET role = EXCLUDED.role"
            ),
            (env.originator_id, ev.user_id, ev.role),
        )
        self._touch(cur, t, "rm_workspaces", "workspace_id", env, {})

    @on(WorkspaceMemberRemoved)
    def _member_removed(
        self,
        cur: Cursor[DictRow],
        env: EventEnvelope,
        ev: WorkspaceMemberRemoved,
        t: Tables,
        changes: list[Change],
    ) -> None:
        cur.execute(
            t.q("DELETE FROM {rm_members} WHERE workspace_id = %s AND user_id = %s"),
            (env.originator_id, ev.user_id),
        )
        self._touch(cur, t, "rm_workspaces", "workspace_id", env, {})

    # -- projects and lanes -------------------------------------------------------------------

    @on(ProjectCreated)
    def _project_created(
        self,
        cur: Cursor[DictRow],
        env: EventEnvelope,
        ev: ProjectCreated,
        t: Tables,
        changes: list[Change],
    ) -> None:
        cur.execute(
            t.q(
                "INSERT INTO {rm_projects} (workspace_id, project_id, name, archived, version,"
                " created_at, updated_at) VALUES (%s, %s, %s, false, %s, %s, %s)"
            ),
            (
                env.workspace_id,
                env.originator_id,
                ev.name,
                env.originator_version,
                env.timestamp,
                env.timestamp,
            ),
        )
        lanes: list[dict[str, Any]] = ev.lanes
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

    @on(ProjectRenamed, ProjectArchived)
    def _project_changed(
        self,
        cur: Cursor[DictRow],
        env: EventEnvelope,
        ev: ProjectRenamed | ProjectArchived,
        t: Tables,
        changes: list[Change],
    ) -> None:
        columns: dict[str, Any] = (
            {"name": ev.name} if isinstance(ev, ProjectRenamed) else {"archived": True}
        )
        self._touch(cur, t, "rm_projects", "project_id", env, columns)
        self._board_changed(env, changes, "board.updated")

    @on(ProjectLaneAdded)
    def _lane_added(
        self,
        cur: Cursor[DictRow],
        env: EventEnvelope,
        ev: ProjectLaneAdded,
        t: Tables,
        changes: list[Change],
    ) -> None:
        cur.execute(
            t.q("UPDATE {rm_lanes} SET ord = ord + 1 WHERE project_id = %s AND ord >= %s"),
            (env.originator_id, ev.index),
        )
        cur.execute(
            t.q(
                "INSERT INTO {rm_lanes} (workspace_id, project_id, name, ord, wip_limit,"
                " card_count) VALUES (%s, %s, %s, %s, %s, 0)"
            ),
            (env.workspace_id, env.originator_id, ev.name, ev.index, ev.wip_limit),
        )
        self._board_version(cur, t, env, changes, "lane.added")

    @on(ProjectLaneRenamed)
    def _lane_renamed(
        self,
        cur: Cursor[DictRow],
        env: EventEnvelope,
        ev: ProjectLaneRenamed,
        t: Tables,
        changes: list[Change],
    ) -> None:
        args = (ev.name, env.originator_id, ev.lane)
        cur.execute(
            t.q("UPDATE {rm_lanes} SET name = %s WHERE project_id = %s AND name = %s"), args
        )
        cur.execute(
            t.q("UPDATE {rm_cards} SET lane = %s WHERE project_id = %s AND lane = %s"), args
        )
        self._board_version(cur, t, env, changes, "lane.renamed")

    @on(ProjectLanesReordered)
    def _lanes_reordered(
        self,
        cur: Cursor[DictRow],
        env: EventEnvelope,
        ev: ProjectLanesReordered,
        t: Tables,
        changes: list[Change],
    ) -> None:
        order: list[str] = ev.order
        cur.execute(
            t.q(
                "UPDATE {rm_lanes} AS l SET ord = o.ord - 1"
                " FROM unnest(%s::text[]) WITH ORDINALITY AS o(name, ord)"
                " WHERE l.project_id = %s AND l.name = o.name"
            ),
            (order, env.originator_id),
        )
        self._board_version(cur, t, env, changes, "lanes.reordered")

    @on(ProjectLaneRemoved)
    def _lane_removed(
        self,
        cur: Cursor[DictRow],
        env: EventEnvelope,
        ev: ProjectLaneRemoved,
        t: Tables,
        changes: list[Change],
    ) -> None:
        cur.execute(
            t.q("DELETE FROM {rm_lanes} WHERE project_id = %s AND name = %s RETURNING ord"),
            (env.originator_id, ev.lane),
        )
        removed = cur.fetchone()
        if removed is not None:
            cur.execute(
                t.q("UPDATE {rm_lanes} SET ord = ord - 1 WHERE project_id = %s AND ord > %s"),
                (env.originator_id, removed["ord"]),
            )
        self._board_version(cur, t, env, changes, "lane.removed")

    @on(ProjectWipLimitSet)
    def _wip_limit_set(
        self,
        cur: Cursor[DictRow],
        env: EventEnvelope,
        ev: ProjectWipLimitSet,
        t: Tables,
        changes: list[Change],
    ) -> None:
        cur.execute(
            t.q("UPDATE {rm_lanes} SET wip_limit = %s WHERE project_id = %s AND name = %s"),
            (ev.wip_limit, env.originator_id, ev.lane),
        )
        self._board_version(cur, t, env, changes, "lane.wip_limit")

    @on(ProjectCardPlaced)
    def _card_placed(
        self,
        cur: Cursor[DictRow],
        env: EventEnvelope,
        ev: ProjectCardPlaced,
        t: Tables,
        changes: list[Change],
    ) -> None:
        self._count(cur, t, env, ev.lane, +1)
        self._board_version(cur, t, env, None, "")

    @on(ProjectCardMoved)
    def _card_moved_on_board(
        self,
        cur: Cursor[DictRow],
        env: EventEnvelope,
        ev: ProjectCardMoved,
        t: Tables,
        changes: list[Change],
    ) -> None:
        if ev.from_lane != ev.to_lane:
            self._count(cur, t, env, ev.from_lane, -1)
            self._count(cur, t, env, ev.to_lane, +1)
        self._board_version(cur, t, env, None, "")

    @on(ProjectCardLifted)
    def _card_lifted(
        self,
        cur: Cursor[DictRow],
        env: EventEnvelope,
        ev: ProjectCardLifted,
        t: Tables,
        changes: list[Change],
    ) -> None:
        self._count(cur, t, env, ev.lane, -1)
        self._board_version(cur, t, env, None, "")

    # -- cards ----------------------------------------------------------------------------------

    @on(CardCreated)
    def _card_created(
        self,
        cur: Cursor[DictRow],
        env: EventEnvelope,
        ev: CardCreated,
        t: Tables,
        changes: list[Change],
    ) -> None:
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
                ev.project_id,
                ev.title,
                ev.description,
                ev.lane,
                ev.position,
                env.originator_version,
                env.timestamp,
                env.timestamp,
            ),
        )
        self._card_changed(env, changes, "card.created", ev.project_id)

    @on(
        CardEdited,
        CardMoved,
        CardAssigned,
        CardBlocked,
        CardUnblocked,
        CardArchived,
        CardRestored,
    )
    def _card_updated(
        self,
        cur: Cursor[DictRow],
        env: EventEnvelope,
        ev: CardEdited
        | CardMoved
        | CardAssigned
        | CardBlocked
        | CardUnblocked
        | CardArchived
        | CardRestored,
        t: Tables,
        changes: list[Change],
    ) -> None:
        columns = _card_columns(ev)
        project_id = self._touch(
            cur, t, "rm_cards", "card_id", env, columns, returning="project_id"
        )
        kind = _CARD_KIND.get(type(ev), "card.updated")
        self._card_changed(env, changes, kind, project_id)

    @on(CardLabelled, CardUnlabelled)
    def _card_labels(
        self,
        cur: Cursor[DictRow],
        env: EventEnvelope,
        ev: CardLabelled | CardUnlabelled,
        t: Tables,
        changes: list[Change],
    ) -> None:
        label = ev.label
        if isinstance(ev, CardLabelled):
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
        self._card_changed(env, changes, "card.updated", row["project_id"] if row else None)

    # -- runs as the board shows them ------------------------------------------------------------

    @on(AgentRunRequested)
    def _run_requested(
        self,
        cur: Cursor[DictRow],
        env: EventEnvelope,
        ev: AgentRunRequested,
        t: Tables,
        changes: list[Change],
    ) -> None:
        self._card_run_upsert(
            cur,
            t,
            env,
            ev,
            "last_run_id = CASE WHEN EXCLUDED.last_run_position > c.last_run_position"
            " THEN EXCLUDED.last_run_id ELSE c.last_run_id END,"
            " last_run_position = GREATEST(c.last_run_position, EXCLUDED.last_run_position)",
            last_run_id=env.originator_id,
            last_run_position=env.position,
            cost_micros=0,
        )
        self._run_changed(env, changes, ev.project_id, ev.card_id)

    @on(AgentRunLlmCallCompleted)
    def _run_cost(
        self,
        cur: Cursor[DictRow],
        env: EventEnvelope,
        ev: AgentRunLlmCallCompleted,
        t: Tables,
        changes: list[Change],
    ) -> None:
        self._card_run_upsert(
            cur,
            t,
            env,
            ev,
            "cost_micros = c.cost_micros + EXCLUDED.cost_micros",
            last_run_id=None,
            last_run_position=0,
            cost_micros=int(ev.billed_micros),
        )
        self._run_changed(env, changes, ev.project_id, ev.card_id)

    @staticmethod
    def _card_run_upsert(
        cur: Cursor[DictRow],
        t: Tables,
        env: EventEnvelope,
        ev: AgentRunRequested | AgentRunLlmCallCompleted,
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
                ev.card_id,
                ev.project_id,
                env.timestamp,
                env.timestamp,
                last_run_id,
                last_run_position,
                cost_micros,
            ),
        )

    @on(AgentRunStarted, AgentRunSucceeded, AgentRunFailed, AgentRunCancelled,
        AgentRunTimedOut)  # fmt: skip
    def _run_status(
        self,
        cur: Cursor[DictRow],
        env: EventEnvelope,
        ev: AgentRunStarted
        | AgentRunSucceeded
        | AgentRunFailed
        | AgentRunCancelled
        | AgentRunTimedOut,
        t: Tables,
        changes: list[Change],
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
            ev = env.event
            if type(ev) in _FOLDED:
                segment.append(env)
                continue
            method = self._handlers.get(type(ev))
            if method is None:
                continue
            self._fold(ctx, segment)
            segment = []
            changes = ctx.changes if ctx.changes is not None else throwaway
            getattr(self, method)(ctx.cur, env, ev, ctx.tables, changes)
            if isinstance(ev, ProjectLaneRenamed):
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
            ev = env.event
            if isinstance(ev, CardUpdate):
                self._fold_card_update(seg, env, ev)
            elif isinstance(ev, ProjectCardMoved):
                if ev.from_lane != ev.to_lane:
                    self._fold_count(seg, env, ev.from_lane, -1)
                    self._fold_count(seg, env, ev.to_lane, +1)
                seg.touched[str(env.originator_id)] = (env.originator_version, env.timestamp)
            elif isinstance(ev, AgentRunLlmCallCompleted):
                self._fold_run(seg, env, ev, None, 0, int(ev.billed_micros))
                self._run_changed_in(ctx, env, ev.project_id, ev.card_id)
            elif isinstance(ev, CardLabelled | CardUnlabelled):
                self._fold_labels(seg, env, ev)
            elif type(ev) in _RUN_STATUS:
                if ctx.changes is not None:
                    run_id = str(env.originator_id)
                    card_id = seg.by_run.get(run_id)
                    row = seg.cards.get(card_id) if card_id is not None else None
                    if row is not None and row["last_run_id"] == run_id:
                        self._run_changed(env, ctx.changes, row["project_id"], row["card_id"])
            elif isinstance(ev, ProjectCardPlaced):
                self._fold_count(seg, env, ev.lane, +1)
                seg.touched[str(env.originator_id)] = (env.originator_version, env.timestamp)
            elif isinstance(ev, ProjectCardLifted):
                self._fold_count(seg, env, ev.lane, -1)
                seg.touched[str(env.originator_id)] = (env.originator_version, env.timestamp)
            elif isinstance(ev, CardCreated):
                self._fold_card_created(seg, env, ev)
            elif isinstance(ev, AgentRunRequested):
                self._fold_run(seg, env, ev, str(env.originator_id), env.position, 0)
                self._run_changed_in(ctx, env, ev.project_id, ev.card_id)
        self._write_segment(seg)

    def _load_cards(self, seg: _Segment, envelopes: list[EventEnvelope]) -> None:
        """Read (and lock) the rows of every card the segment touches; in a rebuild, from
        memory where it can."""
        ctx = seg.ctx
        wanted: set[str] = set()
        runs: set[str] = set()
        for env in envelopes:
            ev = env.event
            if env.aggregate == "Card":
                wanted.add(str(env.originator_id))
            elif isinstance(ev, AgentRunRequested | AgentRunLlmCallCompleted):
                wanted.add(_card_key(ev.card_id))
            elif type(ev) in _RUN_STATUS and ctx.changes is not None:
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
    def _fold_card_created(seg: _Segment, env: EventEnvelope, ev: CardCreated) -> None:
        card_id = str(env.originator_id)
        row = seg.cards.get(card_id)
        values = {
            "project_id": _card_key(ev.project_id),
            "title": ev.title,
            "description": ev.description,
            "lane": ev.lane,
            "position": ev.position,
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
            KanbanProjector._card_changed(env, seg.ctx.changes, "card.created", ev.project_id)

    @staticmethod
    def _fold_card_update(seg: _Segment, env: EventEnvelope, ev: CardUpdate) -> None:
        card_id = str(env.originator_id)
        row = seg.cards.get(card_id)
        if row is not None:
            row.update(_card_columns(ev))
            row["version"] = env.originator_version
            row["updated_at"] = env.timestamp
            seg.dirty.add(card_id)
        if seg.ctx.changes is not None:
            kind = _CARD_KIND.get(type(ev), "card.updated")
            project_id = row["project_id"] if row is not None else None
            KanbanProjector._card_changed(env, seg.ctx.changes, kind, project_id)

    @staticmethod
    def _fold_labels(seg: _Segment, env: EventEnvelope, ev: CardLabelled | CardUnlabelled) -> None:
        card_id = str(env.originator_id)
        row = seg.cards.get(card_id)
        if row is not None:
            label = ev.label
            labels: list[str] = [x for x in row["labels"] if x != label]
            if isinstance(ev, CardLabelled):
                labels.append(label)
                seg.sort_labels.add(card_id)
            row["labels"] = labels
            row["version"] = env.originator_version
            row["updated_at"] = env.timestamp
            seg.dirty.add(card_id)
        if seg.ctx.changes is not None:
            project_id = row["project_id"] if row is not None else None
            KanbanProjector._card_changed(env, seg.ctx.changes, "card.updated", project_id)

    @staticmethod
    def _fold_run(
        seg: _Segment,
        env: EventEnvelope,
        ev: AgentRunRequested | AgentRunLlmCallCompleted,
        run_id: str | None,
        position: int,
        cost: int,
    ) -> None:
        """:meth:`_card_run_upsert`, in memory: a request names the card's last run if it is
        the newest in the log; a call adds its cost; a card not seen yet gets a placeholder."""
        card_id = _card_key(ev.card_id)
        row = seg.cards.get(card_id)
        if row is None:
            row = {
                "workspace_id": _text(env.workspace_id),
                "card_id": card_id,
                "project_id": _card_key(ev.project_id),
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
