"""The Kanban read model: workspaces and members (and the API keys and invitations that let
others in), projects, lanes with live counts, cards in board order with their last run and cost
so far.

This module is the fold (what each event does to the rows, and what subscribers are told);
:mod:`projections.kanban_sql` holds the statements that write them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar
from uuid import UUID

from domain import events as ev
from domain.events import EventPayload, events_of
from projections import kanban_sql as sql
from projections.base import MEMO_DROPPED, BatchContext, Change, Projector
from projections.text import storable

if TYPE_CHECKING:
    from psycopg import Cursor
    from psycopg.rows import DictRow

    from domain.envelope import EventEnvelope
    from projections.base import Tables


def board_channel(project_id: object) -> str:
    return f"board:{project_id}"


def _news(
    env: EventEnvelope, kind: str, *, card_id: object = None, run_id: object = None
) -> dict[str, object]:
    """What a board's subscribers are told of ``env``: its kind and card or run, and which
    write it is (position, aggregate, version: what a mutation's consistency token says, so a
    read sent with them waits for every read model to hold it, not the board's alone)."""
    return {
        "kind": kind,
        "cardId": None if card_id is None else str(card_id),
        "runId": None if run_id is None else str(run_id),
        "position": env.position,
        "aggregateId": str(env.originator_id),
        "version": env.originator_version,
    }


def board_changed(env: EventEnvelope, changes: list[Change], kind: str) -> None:
    """A board-wide change (lanes, the project itself) for the board's subscribers."""
    changes.append(Change(board_channel(env.originator_id), _news(env, kind)))


def card_changed(env: EventEnvelope, changes: list[Change], kind: str, project_id: object) -> None:
    """A card event, for the subscribers of its board (none known: nobody to tell)."""
    if project_id is None:
        return
    changes.append(Change(board_channel(project_id), _news(env, kind, card_id=env.originator_id)))


def run_changed(
    env: EventEnvelope, changes: list[Change], project_id: object, card_id: object
) -> None:
    """A run event, for the subscribers of the board of the run's card."""
    if project_id is None:
        return
    kind = f"run.{env.type.split('.', 1)[1].lower()}"
    news = _news(env, kind, card_id=card_id or None, run_id=env.originator_id)
    changes.append(Change(board_channel(project_id), news))


#: Card and run events the batch path folds; every other handled event is applied on its own,
#: in its place, after what came before it has been written.
CardUpdate = (
    ev.CardEdited
    | ev.CardMoved
    | ev.CardRespread
    | ev.CardAssigned
    | ev.CardBlocked
    | ev.CardUnblocked
    | ev.CardArchived
    | ev.CardRestored
)
_CARD_UPDATES: frozenset[type[EventPayload]] = frozenset(
    {
        ev.CardEdited,
        ev.CardMoved,
        ev.CardRespread,
        ev.CardAssigned,
        ev.CardBlocked,
        ev.CardUnblocked,
        ev.CardArchived,
        ev.CardRestored,
    }
)


#: Card updates that put the card in a lane (as :data:`ev.CardCreated` does).
_LANE_SETTING = (ev.CardMoved, ev.CardRespread, ev.CardRestored)


def card_columns(event: CardUpdate) -> dict[str, Any]:
    """The card columns an update event sets, and their new values."""
    if isinstance(event, ev.CardEdited):
        return {"title": event.title, "description": event.description}
    if isinstance(event, ev.CardMoved):
        return {"lane": event.to_lane, "position": event.position}
    if isinstance(event, ev.CardRespread):
        return {"lane": event.lane, "position": event.position}
    if isinstance(event, ev.CardAssigned):
        return {"assignee": event.assignee}
    if isinstance(event, ev.CardBlocked):
        return {"blocked_reason": event.reason}
    if isinstance(event, ev.CardUnblocked):
        return {"blocked_reason": None}
    if isinstance(event, ev.CardArchived):
        return {"archived": True}
    return {"archived": False, "lane": event.lane, "position": event.position}


#: A re-spread card changed its position (not its neighbours): subscribers are told as of a move.
CARD_CHANGE_KINDS: dict[type[EventPayload], str] = {
    ev.CardMoved: "card.moved",
    ev.CardRespread: "card.moved",
    ev.CardArchived: "card.archived",
    ev.CardRestored: "card.restored",
}
_RUN_STATUS: frozenset[type[EventPayload]] = frozenset(
    {
        ev.AgentRunStarted,
        ev.AgentRunSucceeded,
        ev.AgentRunFailed,
        ev.AgentRunCancelled,
        ev.AgentRunTimedOut,
    }
)
_FOLDED: frozenset[type[EventPayload]] = frozenset(
    {
        ev.CardCreated,
        ev.CardLabelled,
        ev.CardUnlabelled,
        *_CARD_UPDATES,
        ev.AgentRunRequested,
        ev.AgentRunLlmCallCompleted,
        *_RUN_STATUS,
        ev.ProjectCardPlaced,
        ev.ProjectCardMoved,
        ev.ProjectCardLifted,
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
        self.renames: dict[str, list[tuple[int, str, str]]] = {}
        """Project → lane renames applied before the segment that may come after its events
        (see :meth:`KanbanProjector._load_renames`)."""

    def lane(self, project_id: str, position: int, lane: str) -> str:
        """The lane a card put in ``lane`` at ``position`` is in after the renames applied."""
        renames = self.renames.get(project_id)
        return sql.lane_after(renames, position, lane) if renames else lane


E = TypeVar("E", bound=EventPayload)
_Write = Callable[["Cursor[DictRow]", "Tables", "EventEnvelope", Any], None]


def _step(event: type[E], write: Callable[[Cursor[DictRow], Tables, EventEnvelope, E], None],
          change: str = "") -> tuple[type[EventPayload], tuple[_Write, str]]:  # fmt: skip
    """One event applied on its own: ``write`` is type-checked against ``event``'s fields;
    ``change``, the kind of board change it tells subscribers of (none if empty)."""
    return event, (write, change)


#: The rare events, applied one at a time in their place (see :meth:`KanbanProjector.apply_batch`):
#: event → (its statements, the board change it makes).
_APPLIED: dict[type[EventPayload], tuple[_Write, str]] = dict(
    [
        _step(ev.WorkspaceCreated, sql.workspace_created),
        _step(ev.WorkspaceRenamed, sql.workspace_changed),
        _step(ev.WorkspacePlanSet, sql.workspace_changed),
        _step(ev.WorkspaceSpendLimitSet, sql.workspace_changed),
        _step(ev.WorkspaceStripeCustomerLinked, sql.workspace_changed),
        _step(ev.WorkspaceMemberAdded, sql.member_set),
        _step(ev.WorkspaceRoleChanged, sql.member_set),
        _step(ev.WorkspaceMemberRemoved, sql.member_removed),
        _step(ev.ProjectCreated, sql.project_created, "board.created"),
        _step(ev.ProjectRenamed, sql.project_changed, "board.updated"),
        _step(ev.ProjectArchived, sql.project_changed, "board.updated"),
        _step(ev.ProjectLaneAdded, sql.lane_added, "lane.added"),
        _step(ev.ProjectLaneRenamed, sql.lane_renamed, "lane.renamed"),
        _step(ev.ProjectLanesReordered, sql.lanes_reordered, "lanes.reordered"),
        _step(ev.ProjectLaneRemoved, sql.lane_removed, "lane.removed"),
        _step(ev.ProjectWipLimitSet, sql.wip_limit_set, "lane.wip_limit"),
        _step(ev.ApiKeyCreated, sql.api_key_created),
        _step(ev.ApiKeyRevoked, sql.api_key_revoked),
        _step(ev.InvitationCreated, sql.invitation_created),
        _step(ev.InvitationAccepted, sql.invitation_accepted),
        _step(ev.InvitationRevoked, sql.invitation_revoked),
    ]
)


class KanbanProjector(Projector):
    name: ClassVar[str] = "kanban"
    aggregates: ClassVar[frozenset[str]] = frozenset(
        {"Workspace", "Project", "Card", "AgentRun", "ApiKey", "Invitation"}
    )
    tables: ClassVar[tuple[str, ...]] = (
        "rm_workspaces",
        "rm_members",
        "rm_projects",
        "rm_lanes",
        "rm_cards",
        "rm_api_keys",
        "rm_invitations",
    )
    revision: ClassVar[int] = 2
    """2: API keys and invitations (migration 0025), tables filled from events older than them."""
    handles: ClassVar[frozenset[type[EventPayload]]] = _FOLDED | frozenset(_APPLIED)
    ignores: ClassVar[frozenset[type[EventPayload]]] = frozenset(
        {
            ev.AgentRunAttemptRecorded,
            ev.AgentRunCallStarted,
            ev.AgentRunHeartbeat,
            ev.AgentRunLogChunkAppended,
            ev.AgentRunOutputRecorded,
            ev.AgentRunReclaimed,
            ev.AgentRunStepStarted,
        }
    ) | events_of(
        "EmailClaim",
        "Invoice",
        "MonthlySpend",
        "OidcLink",
        "Session",
        "UsageCharge",
        "User",
    )

    # -- the batch path ---------------------------------------------------------------------------

    def apply_batch(self, ctx: BatchContext, envelopes: Sequence[EventEnvelope]) -> None:
        """The board's rows and changes for a batch, with a few statements per batch.

        Card, run and board-counter events are folded: the cards they touch are read once (and
        locked), changed in memory in log order, and written back with one insert and one
        update; lane counts and board versions with one update each. Any other event (a new
        project, a renamed lane, workspace changes: rare) is applied on its own, in its place,
        after writing what the events before it did.
        """
        segment: list[EventEnvelope] = []
        for env in envelopes:
            event = env.event
            if type(event) in _FOLDED:
                segment.append(env)
                continue
            applied = _APPLIED.get(type(event))
            if applied is None:
                continue
            self._fold(ctx, segment)
            segment = []
            write, change = applied
            write(ctx.cur, ctx.tables, env, event)
            if change and ctx.changes is not None:
                board_changed(env, ctx.changes, change)
            if isinstance(event, ev.ProjectLaneRenamed):
                ctx.memo.pop(_MEMO_CARDS, None)  # it rewrote cards behind the memo's back
                ctx.memo[_MEMO_COMPLETE] = False
        self._fold(ctx, segment)

    def _fold(self, ctx: BatchContext, envelopes: list[EventEnvelope]) -> None:
        if not envelopes:
            return
        seg = _Segment(ctx)
        self._load_cards(seg, envelopes)
        self._load_renames(seg, envelopes)
        for env in envelopes:
            event = env.event
            if isinstance(event, CardUpdate):
                self._fold_card_update(seg, env, event)
            elif isinstance(event, ev.ProjectCardMoved):
                if event.from_lane != event.to_lane:
                    self._fold_count(seg, env, event.from_lane, -1)
                    self._fold_count(seg, env, event.to_lane, +1)
                seg.touched[str(env.originator_id)] = (env.originator_version, env.timestamp)
            elif isinstance(event, ev.AgentRunLlmCallCompleted):
                self._fold_run(seg, env, event, None, 0, int(event.billed_micros))
                self._run_changed_in(ctx, env, event.project_id, event.card_id)
            elif isinstance(event, ev.CardLabelled | ev.CardUnlabelled):
                self._fold_labels(seg, env, event)
            elif type(event) in _RUN_STATUS:
                if ctx.changes is not None:
                    run_id = str(env.originator_id)
                    card_id = seg.by_run.get(run_id)
                    row = seg.cards.get(card_id) if card_id is not None else None
                    if row is not None and row["last_run_id"] == run_id:
                        run_changed(env, ctx.changes, row["project_id"], row["card_id"])
            elif isinstance(event, ev.ProjectCardPlaced):
                self._fold_count(seg, env, event.lane, +1)
                seg.touched[str(env.originator_id)] = (env.originator_version, env.timestamp)
            elif isinstance(event, ev.ProjectCardLifted):
                self._fold_count(seg, env, event.lane, -1)
                seg.touched[str(env.originator_id)] = (env.originator_version, env.timestamp)
            elif isinstance(event, ev.CardCreated):
                self._fold_card_created(seg, env, event)
            elif isinstance(event, ev.AgentRunRequested):
                self._fold_run(seg, env, event, str(env.originator_id), env.position, 0)
                self._run_changed_in(ctx, env, event.project_id, event.card_id)
        self._write_segment(seg)

    def _load_cards(self, seg: _Segment, envelopes: list[EventEnvelope]) -> None:
        """Read (and lock) the rows of every card the segment touches; in a rebuild, from
        memory where it can."""
        ctx = seg.ctx
        wanted: set[str] = set()
        runs: set[str] = set()
        for env in envelopes:
            event = env.event
            if env.aggregate == "Card":
                wanted.add(str(env.originator_id))
            elif isinstance(event, ev.AgentRunRequested | ev.AgentRunLlmCallCompleted):
                wanted.add(_card_key(event.card_id))
            elif type(event) in _RUN_STATUS and ctx.changes is not None:
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
            for row in sql.select_cards(ctx.cur, ctx.tables, wanted, runs, lock=not ctx.exclusive):
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
    def _load_renames(seg: _Segment, envelopes: list[EventEnvelope]) -> None:
        """The lane renames applied already that come after an event of the segment that puts
        a card in a lane (see :func:`kanban_sql.renames_applied`). A rebuild applies the log in
        order, so it has none: it is not asked."""
        if seg.ctx.exclusive:
            return
        projects: set[str] = set()
        after: int | None = None
        for env in envelopes:
            event = env.event
            if isinstance(event, ev.CardCreated):
                project: str | None = _card_key(event.project_id)
            elif isinstance(event, _LANE_SETTING):
                row = seg.cards.get(str(env.originator_id))
                project = row["project_id"] if row is not None else None
            else:
                continue
            if project is not None:
                projects.add(project)
                after = env.position if after is None else min(after, env.position)
        if projects and after is not None:
            seg.renames = sql.renames_applied(seg.ctx.cur, seg.ctx.tables, sorted(projects), after)

    @staticmethod
    def _fold_card_created(seg: _Segment, env: EventEnvelope, event: ev.CardCreated) -> None:
        card_id = str(env.originator_id)
        row = seg.cards.get(card_id)
        project_id = _card_key(event.project_id)
        values = {
            "project_id": project_id,
            "title": event.title,
            "description": event.description,
            "lane": seg.lane(project_id, env.position, event.lane),
            "position": event.position,
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
            card_changed(env, seg.ctx.changes, "card.created", event.project_id)

    @staticmethod
    def _fold_card_update(seg: _Segment, env: EventEnvelope, event: CardUpdate) -> None:
        card_id = str(env.originator_id)
        row = seg.cards.get(card_id)
        if row is not None:
            columns = card_columns(event)
            if "lane" in columns:
                columns["lane"] = seg.lane(row["project_id"], env.position, columns["lane"])
            row.update(columns)
            row["version"] = env.originator_version
            row["updated_at"] = env.timestamp
            seg.dirty.add(card_id)
        if seg.ctx.changes is not None:
            kind = CARD_CHANGE_KINDS.get(type(event), "card.updated")
            project_id = row["project_id"] if row is not None else None
            card_changed(env, seg.ctx.changes, kind, project_id)

    @staticmethod
    def _fold_labels(
        seg: _Segment, env: EventEnvelope, event: ev.CardLabelled | ev.CardUnlabelled
    ) -> None:
        card_id = str(env.originator_id)
        row = seg.cards.get(card_id)
        if row is not None:
            # As the table holds it (labels reach it as JSON, where a NUL or a lone surrogate
            # is an escape PostgreSQL refuses), so that a removal finds what was added.
            label = storable(event.label)
            labels: list[str] = [x for x in row["labels"] if x != label]
            if isinstance(event, ev.CardLabelled):
                labels.append(label)
                seg.sort_labels.add(card_id)
            row["labels"] = labels
            row["version"] = env.originator_version
            row["updated_at"] = env.timestamp
            seg.dirty.add(card_id)
        if seg.ctx.changes is not None:
            project_id = row["project_id"] if row is not None else None
            card_changed(env, seg.ctx.changes, "card.updated", project_id)

    @staticmethod
    def _fold_run(
        seg: _Segment,
        env: EventEnvelope,
        event: ev.AgentRunRequested | ev.AgentRunLlmCallCompleted,
        run_id: str | None,
        position: int,
        cost: int,
    ) -> None:
        """:meth:`_card_run_upsert`, in memory: a request names the card's last run if it is
        the newest in the log; a call adds its cost; a card not seen yet gets a placeholder."""
        card_id = _card_key(event.card_id)
        row = seg.cards.get(card_id)
        if row is None:
            row = {
                "workspace_id": _text(env.workspace_id),
                "card_id": card_id,
                "project_id": _card_key(event.project_id),
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
            run_changed(env, ctx.changes, project_id, card_id)

    @staticmethod
    def _write_segment(seg: _Segment) -> None:
        cur, t = seg.ctx.cur, seg.ctx.tables
        rows: list[tuple[sql.CardRow, bool]] = []
        for card_id in sorted(seg.dirty):
            row = seg.cards[card_id]
            assert row is not None
            rows.append((row, card_id in seg.sort_labels or _SORTED in row))
        sql.write_cards(cur, t, rows, seg.existing)
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
        sql.set_board_versions(cur, t, sorted(seg.touched.items()))
        sql.add_card_counts(cur, t, sorted((k, d) for k, d in seg.counts.items() if d))


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def _card_key(value: object) -> str:
    """A card or project id as the batch path keys it (the canonical text of the UUID)."""
    text = str(value)
    if len(text) == 36 and text.islower():
        return text
    return str(UUID(text))
