"""Event-by-event references for the projectors' folds: the oracle the folds are held to.

A projector has one implementation, its fold (``apply_batch``), which turns a batch into a few
set-based statements. Here each handled event is written the obvious way instead, a statement or
two per event, as the projectors once did it. ``reference_of(projector)`` is that projector
applying every event on its own through these handlers (the rare kanban events, which the fold
itself applies one at a time with the statements of :mod:`projections.kanban_sql`, go through
the fold in batches of one). ``test_batch_projection`` feeds a reference and the projector the
same deliveries and wants the same rows and the same changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC
from typing import TYPE_CHECKING, Any, ClassVar, get_args
from uuid import UUID

from psycopg.types.json import Jsonb

from domain import events
from projections import kanban_sql
from projections.activity import DESCRIBED, ActivityProjector, one_line
from projections.base import BatchContext, Change, Projector, Tables
from projections.billing import INVOICE_STATUS, BillingProjector, LedgerKind, UsageDimension
from projections.kanban import (
    CARD_CHANGE_KINDS,
    CardUpdate,
    KanbanProjector,
    card_changed,
    card_columns,
    run_changed,
)
from projections.runs import (
    ATTEMPT_COLUMNS,
    TERMINAL,
    RunsProjector,
    attempt_row,
    lines_changed,
    output_row,
    status_changed,
    storable_line,
    terminal_error,
)

if TYPE_CHECKING:
    from psycopg import Cursor, sql
    from psycopg.rows import DictRow

    from domain.envelope import EventEnvelope

HandlerMethod = Callable[..., None]


def on(*handled: type[events.EventPayload]) -> Callable[[HandlerMethod], HandlerMethod]:
    """Mark a reference method as the handler of the given events; it is called as
    ``method(At(cur, envelope, tables, changes), event)``."""

    def mark(method: HandlerMethod) -> HandlerMethod:
        method.__dict__["_handles"] = handled
        return method

    return mark


@dataclass(frozen=True)
class At:
    """Where a reference handler applies its event, and where it notes the changes."""

    cur: Cursor[DictRow]
    env: EventEnvelope
    t: Tables
    changes: list[Change]


class Reference(Projector):
    """A projector applied event by event through its ``@on`` handlers.

    ``through_fold`` names the handled events the reference leaves to the projector's fold (in a
    batch of one); every other handled event must have a handler here, so a projector that
    starts handling a new event cannot be compared with a reference that skips it.
    """

    through_fold: ClassVar[frozenset[type[events.EventPayload]]] = frozenset()
    fold: ClassVar[type[Projector]]
    """The projector this is the reference of."""
    _handlers: ClassVar[dict[type[events.EventPayload], str]] = {}

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        handlers: dict[type[events.EventPayload], str] = {}
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                for event in getattr(value, "_handles", ()):
                    handlers[event] = attr
        cls._handlers = handlers
        covered = set(handlers) | cls.through_fold
        assert covered == cls.handles, (
            f"{cls.__name__} does not cover {sorted(e.event_type for e in cls.handles - covered)}"
            f" and covers {sorted(e.event_type for e in covered - cls.handles)} besides"
        )

    def apply_batch(self, ctx: BatchContext, envelopes: Sequence[EventEnvelope]) -> None:
        changes = ctx.changes if ctx.changes is not None else []
        for env in envelopes:
            ev = env.event
            method = self._handlers.get(type(ev))
            if method is not None:
                getattr(self, method)(At(ctx.cur, env, ctx.tables, changes), ev)
            elif type(ev) in self.through_fold:
                self.fold().apply_batch(BatchContext(ctx.cur, ctx.tables, ctx.changes), [env])


# -- kanban ----------------------------------------------------------------------------------------

#: The run events that change no card column, only what the board shows of the card's last run.
_RunStatus = (
    events.AgentRunStarted
    | events.AgentRunSucceeded
    | events.AgentRunFailed
    | events.AgentRunCancelled
    | events.AgentRunTimedOut
)


class KanbanReference(Reference, KanbanProjector):
    fold = KanbanProjector

    through_fold: ClassVar[frozenset[type[events.EventPayload]]] = (
        KanbanProjector.handles
        - frozenset(
            {
                events.ProjectCardPlaced,
                events.ProjectCardMoved,
                events.ProjectCardLifted,
                events.CardCreated,
                *get_args(CardUpdate),
                events.CardLabelled,
                events.CardUnlabelled,
                events.AgentRunRequested,
                events.AgentRunLlmCallCompleted,
                *get_args(_RunStatus),
            }
        )
    )

    @on(events.ProjectCardPlaced)
    def _card_placed(self, at: At, ev: events.ProjectCardPlaced) -> None:
        self._count(at.cur, at.t, at.env, ev.lane, +1)
        kanban_sql.touch_board(at.cur, at.t, at.env)

    @on(events.ProjectCardMoved)
    def _card_moved_on_board(self, at: At, ev: events.ProjectCardMoved) -> None:
        if ev.from_lane != ev.to_lane:
            self._count(at.cur, at.t, at.env, ev.from_lane, -1)
            self._count(at.cur, at.t, at.env, ev.to_lane, +1)
        kanban_sql.touch_board(at.cur, at.t, at.env)

    @on(events.ProjectCardLifted)
    def _card_lifted(self, at: At, ev: events.ProjectCardLifted) -> None:
        self._count(at.cur, at.t, at.env, ev.lane, -1)
        kanban_sql.touch_board(at.cur, at.t, at.env)

    @on(events.CardCreated)
    def _card_created(self, at: At, ev: events.CardCreated) -> None:
        at.cur.execute(
            at.t.q(
                "INSERT INTO {rm_cards} (workspace_id, card_id, project_id, title, description,"
                " lane, position, version, created_at, updated_at)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (card_id) DO UPDATE SET project_id = EXCLUDED.project_id,"
                " title = EXCLUDED.title, description = EXCLUDED.description,"
                " lane = EXCLUDED.lane, position = EXCLUDED.position, version = EXCLUDED.version,"
                " created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at"
            ),
            (
                at.env.workspace_id,
                at.env.originator_id,
                ev.project_id,
                ev.title,
                ev.description,
                self._lane_now(at, ev.project_id, ev.lane),
                ev.position,
                at.env.originator_version,
                at.env.timestamp,
                at.env.timestamp,
            ),
        )
        card_changed(at.env, at.changes, "card.created", ev.project_id)

    @on(*get_args(CardUpdate))
    def _card_updated(self, at: At, ev: CardUpdate) -> None:
        columns = card_columns(ev)
        if "lane" in columns:
            at.cur.execute(
                at.t.q("SELECT project_id FROM {rm_cards} WHERE card_id = %s"),
                (at.env.originator_id,),
            )
            card = at.cur.fetchone()
            if card is not None:
                columns["lane"] = self._lane_now(at, card["project_id"], columns["lane"])
        assignments = "".join(f"{column} = %s, " for column in columns)
        project_id = self._update_card(at, assignments, columns.values())
        kind = CARD_CHANGE_KINDS.get(type(ev), "card.updated")
        card_changed(at.env, at.changes, kind, project_id)

    @on(events.CardLabelled, events.CardUnlabelled)
    def _card_labels(self, at: At, ev: events.CardLabelled | events.CardUnlabelled) -> None:
        label = ev.label
        if isinstance(ev, events.CardLabelled):
            expression = "ARRAY(SELECT DISTINCT x FROM unnest(labels || %s::text) AS x ORDER BY x)"
        else:
            expression = "array_remove(labels, %s::text)"
        project_id = self._update_card(at, f"labels = {expression}, ", (label,))
        card_changed(at.env, at.changes, "card.updated", project_id)

    # -- runs as the board shows them ------------------------------------------------------------

    @on(events.AgentRunRequested)
    def _run_requested(self, at: At, ev: events.AgentRunRequested) -> None:
        self._card_run_upsert(
            at.cur,
            at.t,
            at.env,
            ev,
            "last_run_id = CASE WHEN EXCLUDED.last_run_position > c.last_run_position"
            " THEN EXCLUDED.last_run_id ELSE c.last_run_id END,"
            " last_run_position = GREATEST(c.last_run_position, EXCLUDED.last_run_position)",
            last_run_id=at.env.originator_id,
            last_run_position=at.env.position,
            cost_micros=0,
        )
        run_changed(at.env, at.changes, ev.project_id, ev.card_id)

    @on(events.AgentRunLlmCallCompleted)
    def _run_cost(self, at: At, ev: events.AgentRunLlmCallCompleted) -> None:
        self._card_run_upsert(
            at.cur,
            at.t,
            at.env,
            ev,
            "cost_micros = c.cost_micros + EXCLUDED.cost_micros",
            last_run_id=None,
            last_run_position=0,
            cost_micros=int(ev.billed_micros),
        )
        run_changed(at.env, at.changes, ev.project_id, ev.card_id)

    @staticmethod
    def _card_run_upsert(
        cur: Cursor[DictRow],
        t: Tables,
        env: EventEnvelope,
        ev: events.AgentRunRequested | events.AgentRunLlmCallCompleted,
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

    @on(*get_args(_RunStatus))
    def _run_status(self, at: At, ev: _RunStatus) -> None:
        at.cur.execute(
            at.t.q("SELECT project_id, card_id FROM {rm_cards} WHERE last_run_id = %s"),
            (at.env.originator_id,),
        )
        row = at.cur.fetchone()
        if row is not None:
            run_changed(at.env, at.changes, row["project_id"], row["card_id"])

    @staticmethod
    def _update_card(at: At, assignments: str, values: Iterable[object]) -> Any:
        """The card updated by ``assignments`` (each ending in a comma, their parameters
        ``values``), its version and update time set; its project (None: no card)."""
        at.cur.execute(
            at.t.q(
                "UPDATE {rm_cards} SET " + assignments + "version = %s, updated_at = %s"
                " WHERE card_id = %s RETURNING project_id"
            ),
            (*values, at.env.originator_version, at.env.timestamp, at.env.originator_id),
        )
        row = at.cur.fetchone()
        return row["project_id"] if row else None

    @staticmethod
    def _lane_now(at: At, project_id: object, lane: str) -> str:
        """The name ``lane``, entered by this event, has after the renames of the board that
        were applied before it although they came after it in the log."""
        project = str(UUID(str(project_id)))
        renames = kanban_sql.renames_applied(at.cur, at.t, [project], at.env.position)
        return kanban_sql.lane_after(renames.get(project, []), at.env.position, lane)

    @staticmethod
    def _count(cur: Cursor[DictRow], t: Tables, env: EventEnvelope, lane: str, delta: int) -> None:
        cur.execute(
            t.q(
                "UPDATE {rm_lanes} SET card_count = card_count + %s"
                " WHERE project_id = %s AND name = %s"
            ),
            (delta, env.originator_id, lane),
        )


# -- runs ------------------------------------------------------------------------------------------


class RunsReference(Reference, RunsProjector):
    fold = RunsProjector

    # -- lifecycle -------------------------------------------------------------------------------

    @on(events.AgentRunRequested)
    def _requested(self, at: At, ev: events.AgentRunRequested) -> None:
        at.cur.execute(
            at.t.q(
                "INSERT INTO {rm_runs} (workspace_id, run_id, project_id, card_id, agent, status,"
                " provider, model, max_cost_micros, requested_at, version)"
                " VALUES (%s, %s, %s, %s, %s, 'QUEUED', %s, %s, %s, %s, %s)"
            ),
            (
                at.env.workspace_id,
                at.env.originator_id,
                ev.project_id,
                ev.card_id,
                ev.agent,
                ev.provider,
                ev.model,
                ev.max_cost_micros,
                at.env.timestamp,
                at.env.originator_version,
            ),
        )
        status_changed(at.env, at.changes, "QUEUED")

    @on(events.AgentRunStarted)
    def _started(self, at: At, ev: events.AgentRunStarted) -> None:
        at.cur.execute(
            at.t.q(
                "UPDATE {rm_runs} SET status = 'RUNNING', started_at = %s, version = %s"
                " WHERE run_id = %s"
            ),
            (at.env.timestamp, at.env.originator_version, at.env.originator_id),
        )
        status_changed(at.env, at.changes, "RUNNING")

    @on(*TERMINAL)
    def _finished(self, at: At, ev: events.EventPayload) -> None:
        status = TERMINAL[type(ev)]
        at.cur.execute(
            at.t.q(
                "UPDATE {rm_runs} SET status = %s, finished_at = %s, error = %s, version = %s"
                " WHERE run_id = %s"
            ),
            (
                status,
                at.env.timestamp,
                terminal_error(ev),
                at.env.originator_version,
                at.env.originator_id,
            ),
        )
        status_changed(at.env, at.changes, status)

    @on(
        events.AgentRunStepStarted,
        events.AgentRunHeartbeat,
        events.AgentRunReclaimed,
        events.AgentRunCallStarted,
    )
    def _touched(
        self,
        at: At,
        ev: events.AgentRunStepStarted
        | events.AgentRunHeartbeat
        | events.AgentRunReclaimed
        | events.AgentRunCallStarted,
    ) -> None:
        self._touch_run(at)

    @staticmethod
    def _touch_run(at: At) -> None:
        at.cur.execute(
            at.t.q("UPDATE {rm_runs} SET version = %s WHERE run_id = %s"),
            (at.env.originator_version, at.env.originator_id),
        )

    @on(events.AgentRunAttemptRecorded)
    def _attempt(self, at: At, ev: events.AgentRunAttemptRecorded) -> None:
        self._add_run_row(
            at,
            f"INSERT INTO {{rm_run_attempts}} ({', '.join(n for n, _ in ATTEMPT_COLUMNS)})"
            f" VALUES ({', '.join(['%s'] * len(ATTEMPT_COLUMNS))})",
            attempt_row(at.env, ev),
        )

    @on(events.AgentRunOutputRecorded)
    def _output(self, at: At, ev: events.AgentRunOutputRecorded) -> None:
        self._add_run_row(
            at,
            "INSERT INTO {rm_run_outputs} (workspace_id, run_id, output) VALUES (%s, %s, %s)",
            output_row(at.env, ev),
        )

    @classmethod
    def _add_run_row(cls, at: At, statement: str, row: tuple[Any, ...]) -> None:
        """A row of a run's own child table; the run's version moves with it."""
        at.cur.execute(at.t.q(statement), row)
        cls._touch_run(at)

    # -- what the run did ------------------------------------------------------------------------

    @on(events.AgentRunLlmCallCompleted)
    def _llm_call(self, at: At, ev: events.AgentRunLlmCallCompleted) -> None:
        at.cur.execute(
            at.t.q(
                "UPDATE {rm_runs} SET provider = %s, model = %s,"
                " input_tokens = input_tokens + %s, output_tokens = output_tokens + %s,"
                " provider_cost_micros = provider_cost_micros + %s,"
                " billed_micros = billed_micros + %s, llm_calls = llm_calls + 1, version = %s"
                " WHERE run_id = %s"
            ),
            (
                ev.provider,
                ev.model,
                ev.input_tokens,
                ev.output_tokens,
                ev.provider_cost_micros,
                ev.billed_micros,
                at.env.originator_version,
                at.env.originator_id,
            ),
        )

    @on(events.AgentRunLogChunkAppended)
    def _log_chunk(self, at: At, ev: events.AgentRunLogChunkAppended) -> None:
        lines = [storable_line(line) for line in ev.lines]
        # One statement for the whole chunk (COPY would be faster but refuses tables with row-level
        # security); every line is new because the runner applies each chunk exactly once.
        at.cur.execute(
            at.t.q(
                "INSERT INTO {rm_log_lines} (workspace_id, run_id, seq, at, stream, text)"
                " SELECT %s, %s, l.seq, l.at, l.stream, l.text"
                " FROM unnest(%s::integer[], %s::timestamptz[], %s::text[], %s::text[])"
                " AS l(seq, at, stream, text)"
            ),
            (
                at.env.workspace_id,
                at.env.originator_id,
                [line["seq"] for line in lines],
                [line["at"] for line in lines],
                [line["stream"] for line in lines],
                [line["text"] for line in lines],
            ),
        )
        at.cur.execute(
            at.t.q(
                "UPDATE {rm_runs} SET log_line_count = log_line_count + %s, version = %s"
                " WHERE run_id = %s"
            ),
            (len(lines), at.env.originator_version, at.env.originator_id),
        )
        lines_changed(at.env, at.changes, lines)


# -- activity --------------------------------------------------------------------------------------

# The subject's card and project, when the event does not carry them, come from the newest
# earlier item about the same subject.
_INSERT = (
    "INSERT INTO {rm_activity} (workspace_id, position, at, actor, kind, summary, card_id,"
    " project_id, subject_id)"
    " SELECT %(ws)s, %(position)s, %(at)s, %(actor)s, %(kind)s, %(summary)s,"
    " coalesce(%(card_id)s::uuid, prior.card_id), coalesce(%(project_id)s::uuid, prior.project_id),"
    " %(subject_id)s"
    " FROM (SELECT) AS one LEFT JOIN LATERAL ("
    "  SELECT card_id, project_id FROM {rm_activity} WHERE subject_id = %(subject_id)s"
    "  ORDER BY position DESC LIMIT 1"
    " ) AS prior ON true"
)


def _family(name: str) -> list[type[events.EventPayload]]:
    return [event for event, (family, _, _) in DESCRIBED.items() if family == name]


class ActivityReference(Reference, ActivityProjector):
    fold = ActivityProjector

    @on(*_family("workspace"))
    def _workspace(self, at: At, ev: events.EventPayload) -> None:
        self._record(at)

    @on(*_family("project"))
    def _project(self, at: At, ev: events.EventPayload) -> None:
        self._record(at, project_id=at.env.originator_id)

    @on(*_family("card"))
    def _card(self, at: At, ev: events.EventPayload) -> None:
        project_id = ev.project_id if isinstance(ev, events.CardCreated) else None
        self._record(at, card_id=at.env.originator_id, project_id=project_id)

    @on(*_family("run"))
    def _run(self, at: At, ev: events.EventPayload) -> None:
        if isinstance(ev, events.AgentRunRequested):
            self._record(at, card_id=ev.card_id, project_id=ev.project_id)
        else:
            self._record(at)

    @on(*_family("spend"))
    def _spend(self, at: At, ev: events.EventPayload) -> None:
        self._record(at)

    @staticmethod
    def _record(at: At, *, card_id: object = None, project_id: object = None) -> None:
        env = at.env
        workspace_id = env.workspace_id
        if workspace_id is None and env.aggregate == "Workspace":
            workspace_id = env.originator_id
        if workspace_id is None:
            return  # not tenant-owned, so no feed can show it
        _, kind, summarise = DESCRIBED[type(env.event)]
        at.cur.execute(
            at.t.q(_INSERT),
            {
                "ws": workspace_id,
                "position": env.position,
                "at": env.timestamp,
                "actor": env.metadata.get("actor") or "unknown",
                "kind": kind,
                "summary": one_line(summarise(env.event)),
                "card_id": card_id,
                "project_id": project_id,
                "subject_id": env.originator_id,
            },
        )


# -- billing ---------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Entry:
    """One ledger entry with the dimensions it rolls up under."""

    kind: LedgerKind
    charge_id: object
    project_id: object
    card_id: object
    run_id: object
    provider: str
    model: str
    calls: int
    input_tokens: int
    output_tokens: int
    provider_cost_micros: int
    billed_micros: int
    month: str


# A ledger entry and all its rollups, as common table expressions of one statement: fewer round
# trips in a rebuild, and no way to post an entry without its rollups.
_POST = (
    "entry AS ("
    " INSERT INTO {rm_ledger_entries} (workspace_id, entry_position, charge_id, kind, project_id,"
    " card_id, run_id, provider, model, input_tokens, output_tokens, provider_cost_micros,"
    " billed_micros, month, day, at)"
    " VALUES (%(ws)s, %(position)s, %(charge_id)s, %(kind)s, %(project_id)s, %(card_id)s,"
    " %(run_id)s, %(provider)s, %(model)s, %(input_tokens)s, %(output_tokens)s, %(cost)s,"
    " %(billed)s, %(month)s, %(day)s, %(at)s)"
    "), usage AS ("
    " INSERT INTO {rm_usage_daily} AS u (workspace_id, day, dimension, key, calls, input_tokens,"
    " output_tokens, provider_cost_micros, billed_micros)"
    " SELECT %(ws)s, %(day)s, d.dimension, d.key, %(calls)s, %(input_tokens)s,"
    " %(output_tokens)s, %(cost)s, %(billed)s"
    " FROM unnest(%(dimensions)s::text[], %(keys)s::text[]) AS d(dimension, key)"
    " ON CONFLICT (workspace_id, day, dimension, key) DO UPDATE SET"
    " calls = u.calls + EXCLUDED.calls,"
    " input_tokens = u.input_tokens + EXCLUDED.input_tokens,"
    " output_tokens = u.output_tokens + EXCLUDED.output_tokens,"
    " provider_cost_micros = u.provider_cost_micros + EXCLUDED.provider_cost_micros,"
    " billed_micros = u.billed_micros + EXCLUDED.billed_micros"
    "), line AS ("
    " INSERT INTO {rm_statement_lines} AS s (workspace_id, month, project_id,"
    " billed_exact_micros) VALUES (%(ws)s, %(month)s, %(project_id)s, %(billed)s)"
    " ON CONFLICT (workspace_id, month, project_id) DO UPDATE SET"
    " billed_exact_micros = s.billed_exact_micros + EXCLUDED.billed_exact_micros"
    ")"
    " INSERT INTO {rm_monthly_spend} AS m (workspace_id, month, billed_micros, charged_micros)"
    " VALUES (%(ws)s, %(month)s, %(billed)s, %(charged)s)"
    " ON CONFLICT (workspace_id, month) DO UPDATE SET"
    " billed_micros = m.billed_micros + EXCLUDED.billed_micros,"
    " charged_micros = m.charged_micros + EXCLUDED.charged_micros"
)

# A new charge: its row, then its entry and rollups, in the same statement.
_CHARGE_AND_POST = (
    "WITH charge AS ("
    " INSERT INTO {rm_charges} (workspace_id, charge_id, project_id, card_id, run_id, call_id,"
    " provider, model, input_tokens, output_tokens, provider_cost_micros, markup, billed_micros,"
    " price_table_version, month, occurred_at)"
    " VALUES (%(ws)s, %(charge_id)s, %(project_id)s, %(card_id)s, %(run_id)s, %(call_id)s,"
    " %(provider)s, %(model)s, %(input_tokens)s, %(output_tokens)s, %(cost)s, %(markup)s,"
    " %(billed)s, %(price_table_version)s, %(month)s, %(at)s)"
    "), " + _POST
)


class BillingReference(Reference, BillingProjector):
    fold = BillingProjector

    @on(events.UsageChargeCharged)
    def _charged(self, at: At, ev: events.UsageChargeCharged) -> None:
        entry = _Entry(
            kind=LedgerKind.CHARGE,
            charge_id=at.env.originator_id,
            project_id=ev.project_id,
            card_id=ev.card_id,
            run_id=ev.run_id,
            provider=ev.provider,
            model=ev.model,
            calls=1,
            input_tokens=ev.input_tokens,
            output_tokens=ev.output_tokens,
            provider_cost_micros=ev.provider_cost_micros,
            billed_micros=ev.billed_micros,
            month=ev.month,
        )
        self._post(
            at.cur,
            at.t.q(_CHARGE_AND_POST),
            at.env,
            entry,
            call_id=ev.call_id,
            markup=ev.markup,
            price_table_version=ev.price_table_version,
        )

    @on(events.UsageChargeCredited, events.UsageChargeRefunded)
    def _corrected(
        self, at: At, ev: events.UsageChargeCredited | events.UsageChargeRefunded
    ) -> None:
        amount: int = ev.amount_micros
        at.cur.execute(
            at.t.q(
                "UPDATE {rm_charges} SET credited_micros = credited_micros + %s"
                " WHERE charge_id = %s"
                " RETURNING project_id, card_id, run_id, provider, model"
            ),
            (amount, at.env.originator_id),
        )
        charge = at.cur.fetchone()
        if charge is None:
            # The runner applies a charge's events in version order, so its Charged row exists;
            # without it the correction's dimensions are unknown and guessing would misfile money.
            raise RuntimeError(
                f"{at.env.type} at position {at.env.position} corrects charge"
                f" {at.env.originator_id}, "
                "which the billing read model does not hold"
            )
        entry = _Entry(
            kind=LedgerKind.CREDIT
            if isinstance(ev, events.UsageChargeCredited)
            else LedgerKind.REFUND,
            charge_id=at.env.originator_id,
            project_id=charge["project_id"],
            card_id=charge["card_id"],
            run_id=charge["run_id"],
            provider=charge["provider"],
            model=charge["model"],
            calls=0,
            input_tokens=0,
            output_tokens=0,
            provider_cost_micros=0,
            billed_micros=-amount,
            month=ev.month,
        )
        self._post(at.cur, at.t.q("WITH " + _POST), at.env, entry)

    @on(events.MonthlySpendCreditGranted)
    def _credit_granted(self, at: At, ev: events.MonthlySpendCreditGranted) -> None:
        at.cur.execute(
            at.t.q(
                "INSERT INTO {rm_billing_credits} (workspace_id, credit_id, month, amount_micros,"
                " reason, at) VALUES (%s, %s, %s, %s, %s, %s)"
            ),
            (at.env.workspace_id, ev.credit_id, ev.month, ev.amount_micros, ev.reason,
             at.env.timestamp),
        )  # fmt: skip

    @on(events.InvoiceDrafted)
    def _invoice_drafted(self, at: At, ev: events.InvoiceDrafted) -> None:
        at.cur.execute(
            at.t.q(
                "INSERT INTO {rm_invoices} (workspace_id, month, invoice_id, lines, total_micros,"
                " status, billing_increment_micros) VALUES (%s, %s, %s, %s, %s, 'drafted', %s)"
            ),
            (at.env.workspace_id, ev.month, at.env.originator_id, Jsonb(ev.lines),
             ev.total_micros, getattr(ev, "billing_increment_micros", None)),
        )  # fmt: skip

    @on(events.InvoiceIssued, events.InvoicePaid, events.InvoiceVoided)
    def _invoice_status(
        self, at: At, ev: events.InvoiceIssued | events.InvoicePaid | events.InvoiceVoided
    ) -> None:
        at.cur.execute(
            at.t.q(
                "UPDATE {rm_invoices} SET status = %s,"
                " stripe_invoice_id = coalesce(%s, stripe_invoice_id) WHERE invoice_id = %s"
            ),
            (
                INVOICE_STATUS[type(ev)],
                ev.stripe_invoice_id if isinstance(ev, events.InvoiceIssued) else None,
                at.env.originator_id,
            ),
        )

    @staticmethod
    def _post(
        cur: Cursor[DictRow],
        statement: sql.Composed,
        env: EventEnvelope,
        entry: _Entry,
        **more: object,
    ) -> None:
        """Run ``statement`` (which posts ``entry``) with the entry's values and ``more``."""
        day = env.timestamp.astimezone(UTC).date()
        keys: dict[UsageDimension, Any] = {
            UsageDimension.PROJECT: entry.project_id,
            UsageDimension.CARD: entry.card_id,
            UsageDimension.AGENT_RUN: entry.run_id,
            UsageDimension.PROVIDER: entry.provider,
            UsageDimension.MODEL: entry.model,
            UsageDimension.DAY: day.isoformat(),
        }
        cur.execute(
            statement,
            {
                "ws": env.workspace_id,
                "position": env.position,
                "charge_id": entry.charge_id,
                "kind": entry.kind.value,
                "project_id": entry.project_id,
                "card_id": entry.card_id,
                "run_id": entry.run_id,
                "provider": entry.provider,
                "model": entry.model,
                "calls": entry.calls,
                "input_tokens": entry.input_tokens,
                "output_tokens": entry.output_tokens,
                "cost": entry.provider_cost_micros,
                "billed": entry.billed_micros,
                # Usage, which spend limits count: charges only.
                "charged": entry.billed_micros if entry.kind is LedgerKind.CHARGE else 0,
                "month": entry.month,
                "day": day,
                "at": env.timestamp,
                "dimensions": [dimension.value for dimension in keys],
                "keys": [str(key) for key in keys.values()],
                **more,
            },
        )


REFERENCES: dict[str, type[Reference]] = {
    reference.name: reference
    for reference in (KanbanReference, RunsReference, ActivityReference, BillingReference)
}


def reference_of(projector: Projector) -> Projector:
    """``projector``'s read model, every event applied on its own by the reference handlers."""
    return REFERENCES[projector.name]()
