"""The activity feed: one line per meaningful thing that happened in a workspace, newest first.

Each item says when, who (the event's ``actor``), what kind of thing (``card.moved``) and a short
summary written from the event alone ("moved card from Todo to Doing"). Log chunks, LLM calls
and board bookkeeping are left out: they are noise in a feed. An item is keyed by its event's
global position, which is also the feed's cursor.

Events that do not name their card or project (a card moved, a run finished) inherit them from
the earlier items about the same aggregate (``subject_id``), this projector's own rows; it never
reads another projector's tables, whose progress is not tied to its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar
from uuid import UUID

from domain import events as ev
from domain.events import EventPayload, events_of
from domain.money import format_usd
from projections.base import BatchContext, Projector, rebuild_memo
from projections.batch import fetch_all, insert_rows

if TYPE_CHECKING:
    from domain.envelope import EventEnvelope

MAX_SUMMARY_LENGTH = 240

Summary = Callable[[Any], str]
"""A payload → its one-line summary; typed per event where it is registered (:func:`_kind`)."""

E = TypeVar("E", bound=EventPayload)


def _kind(
    event: type[E], kind: str, summary: Callable[[E], str]
) -> tuple[type[EventPayload], tuple[str, Summary]]:
    """One feed entry: ``summary`` is type-checked against ``event``'s fields."""
    return event, (kind, summary)


#: Event → (kind, summary from the payload).
_WORKSPACE: dict[type[EventPayload], tuple[str, Summary]] = dict(
    [
        _kind(
            ev.WorkspaceCreated, "workspace.created", lambda p: f"created workspace {_q(p.name)}"
        ),
        _kind(
            ev.WorkspaceRenamed, "workspace.renamed", lambda p: f"renamed workspace to {_q(p.name)}"
        ),
        _kind(ev.WorkspaceMemberAdded, "member.added", lambda p: f"added {p.user_id} as {p.role}"),
        _kind(
            ev.WorkspaceRoleChanged,
            "member.role_changed",
            lambda p: f"changed the role of {p.user_id} to {p.role}",
        ),
        _kind(ev.WorkspaceMemberRemoved, "member.removed", lambda p: f"removed member {p.user_id}"),
        _kind(
            ev.WorkspacePlanSet,
            "workspace.plan_set",
            lambda p: (
                f"set the plan to markup {p.markup}x, billed in increments of"
                f" ${format_usd(p.billing_increment_micros)}"
            ),
        ),
        _kind(
            ev.WorkspaceSpendLimitSet,
            "workspace.spend_limit_set",
            lambda p: (
                "removed the monthly spend limit"
                if p.monthly_limit_micros is None
                else f"set the monthly spend limit to ${format_usd(p.monthly_limit_micros)}"
            ),
        ),
    ]
)

_PROJECT: dict[type[EventPayload], tuple[str, Summary]] = dict(
    [
        _kind(
            ev.ProjectCreated,
            "project.created",
            lambda p: (
                f"created project {_q(p.name)} with lanes "
                + ", ".join(lane["name"] for lane in p.lanes)
            ),
        ),
        _kind(ev.ProjectRenamed, "project.renamed", lambda p: f"renamed project to {_q(p.name)}"),
        _kind(ev.ProjectArchived, "project.archived", lambda p: "archived the project"),
        _kind(
            ev.ProjectLaneAdded,
            "lane.added",
            lambda p: f"added lane {_q(p.name)}" + _wip(p.wip_limit),
        ),
        _kind(
            ev.ProjectLaneRenamed,
            "lane.renamed",
            lambda p: f"renamed lane {_q(p.lane)} to {_q(p.name)}",
        ),
        _kind(
            ev.ProjectLanesReordered,
            "lanes.reordered",
            lambda p: "reordered lanes: " + ", ".join(p.order),
        ),
        _kind(ev.ProjectLaneRemoved, "lane.removed", lambda p: f"removed lane {_q(p.lane)}"),
        _kind(
            ev.ProjectWipLimitSet,
            "lane.wip_limit_set",
            lambda p: (
                f"removed the WIP limit of {p.lane}"
                if p.wip_limit is None
                else f"set the WIP limit of {p.lane} to {p.wip_limit}"
            ),
        ),
    ]
)

_CARD: dict[type[EventPayload], tuple[str, Summary]] = dict(
    [
        _kind(ev.CardCreated, "card.created", lambda p: f"created card {_q(p.title)} in {p.lane}"),
        _kind(ev.CardEdited, "card.edited", lambda p: f"edited card {_q(p.title)}"),
        _kind(
            ev.CardMoved,
            "card.moved",
            lambda p: (
                f"moved card from {p.from_lane} to {p.to_lane}"
                if p.from_lane != p.to_lane
                else f"reordered card within {p.to_lane}"
            ),
        ),
        _kind(
            ev.CardAssigned,
            "card.assigned",
            lambda p: "unassigned card" if p.assignee is None else f"assigned card to {p.assignee}",
        ),
        _kind(ev.CardLabelled, "card.labelled", lambda p: f"labelled card {_q(p.label)}"),
        _kind(
            ev.CardUnlabelled, "card.unlabelled", lambda p: f"removed label {_q(p.label)} from card"
        ),
        _kind(ev.CardBlocked, "card.blocked", lambda p: f"blocked card: {p.reason}"),
        _kind(ev.CardUnblocked, "card.unblocked", lambda p: "unblocked card"),
        _kind(ev.CardArchived, "card.archived", lambda p: "archived card"),
        _kind(ev.CardRestored, "card.restored", lambda p: f"restored card to {p.lane}"),
    ]
)

_RUN: dict[type[EventPayload], tuple[str, Summary]] = dict(
    [
        _kind(
            ev.AgentRunRequested,
            "run.requested",
            lambda p: f"requested agent {_q(p.agent)}" + (f" on {p.model}" if p.model else ""),
        ),
        _kind(ev.AgentRunStarted, "run.started", lambda p: f"agent run started on {p.worker}"),
        _kind(ev.AgentRunSucceeded, "run.succeeded", lambda p: "agent run succeeded"),
        _kind(ev.AgentRunFailed, "run.failed", lambda p: f"agent run failed: {p.error}"),
        _kind(ev.AgentRunCancelled, "run.cancelled", lambda p: f"agent run cancelled: {p.reason}"),
        _kind(
            ev.AgentRunTimedOut,
            "run.timed_out",
            lambda p: f"agent run timed out after {p.after_seconds}s",
        ),
    ]
)

_SPEND: dict[type[EventPayload], tuple[str, Summary]] = dict(
    [
        _kind(
            ev.MonthlySpendThresholdCrossed,
            "budget.threshold",
            lambda p: (
                f"spend in {p.month} reached {p.threshold}% of the monthly limit "
                f"({format_usd(int(p.spent_micros))} of {format_usd(int(p.limit_micros))})"
            ),
        ),
    ]
)

_COLUMNS = (
    ("workspace_id", "uuid"),
    ("position", "bigint"),
    ("at", "timestamptz"),
    ("actor", "text"),
    ("kind", "text"),
    ("summary", "text"),
    ("card_id", "uuid"),
    ("project_id", "uuid"),
    ("subject_id", "uuid"),
)

#: Event type → (which aggregate family, kind, summary): what the feed shows of an event.
DESCRIBED: dict[type[EventPayload], tuple[str, str, Summary]] = {
    **{t: ("workspace", kind, summary) for t, (kind, summary) in _WORKSPACE.items()},
    **{t: ("project", kind, summary) for t, (kind, summary) in _PROJECT.items()},
    **{t: ("card", kind, summary) for t, (kind, summary) in _CARD.items()},
    **{t: ("run", kind, summary) for t, (kind, summary) in _RUN.items()},
    **{t: ("spend", kind, summary) for t, (kind, summary) in _SPEND.items()},
}

Subject = tuple[str | None, str | None]
"""The card and project (as text) of a subject's newest item."""

_MEMO_SUBJECTS = "activity.subjects"
#: How many subjects a rebuild remembers before it forgets them and asks the table instead.
MEMO_LIMIT = 1_000_000


class ActivityProjector(Projector):
    name: ClassVar[str] = "activity"
    aggregates: ClassVar[frozenset[str]] = frozenset(
        {"Workspace", "Project", "Card", "AgentRun", "MonthlySpend"}
    )
    tables: ClassVar[tuple[str, ...]] = ("rm_activity",)
    handles: ClassVar[frozenset[type[EventPayload]]] = frozenset(DESCRIBED)
    ignores: ClassVar[frozenset[type[EventPayload]]] = frozenset(
        {
            ev.AgentRunAttemptRecorded,
            ev.AgentRunCallStarted,
            ev.AgentRunHeartbeat,
            ev.AgentRunLlmCallCompleted,
            ev.AgentRunLogChunkAppended,
            ev.AgentRunOutputRecorded,
            ev.AgentRunReclaimed,
            ev.AgentRunStepStarted,
            # The board's bookkeeping, not anyone's act: the placement that needed the room is
            # in the feed, and a re-spread of hundreds of cards would bury it.
            ev.CardRespread,
            ev.MonthlySpendAdded,
            ev.MonthlySpendClosed,
            ev.MonthlySpendCorrectionFiled,
            ev.MonthlySpendCreditGranted,
            ev.MonthlySpendOpened,
            ev.ProjectCardLifted,
            ev.ProjectCardMoved,
            ev.ProjectCardPlaced,
            ev.WorkspaceStripeCustomerLinked,
        }
    ) | events_of(
        "ApiKey",
        "EmailClaim",
        "Invitation",
        "Invoice",
        "OidcLink",
        "Session",
        "UsageCharge",
        "User",
    )
    #: Tables the projector only ever inserts into, new rows only: a rebuild builds their keys
    #: after loading them (see :mod:`projections.rebuild`).
    insert_only: ClassVar[frozenset[str]] = frozenset({"rm_activity"})

    # -- the batch path ----------------------------------------------------------------------------

    def apply_batch(self, ctx: BatchContext, envelopes: Sequence[EventEnvelope]) -> None:
        """All of a batch's items in one insert.

        An item that lacks its card or project takes them from the subject's newest earlier item:
        one written earlier in this batch, or else the newest in the table (one query for all).
        In a rebuild the table holds only what this runner wrote, so it remembers every
        subject's newest item instead of asking.
        """
        remembered: dict[UUID, Subject]
        remembered, complete = rebuild_memo(ctx, _MEMO_SUBJECTS, MEMO_LIMIT)
        items: list[tuple[EventEnvelope, str, str, Summary, str | None, str | None]] = []
        ask: set[UUID] = set()
        seen: set[UUID] = set()
        for env in envelopes:
            event = env.event
            described = DESCRIBED.get(type(event))
            if described is None:
                continue
            workspace_id = env.workspace_id
            if workspace_id is None and env.aggregate == "Workspace":
                workspace_id = env.originator_id
            if workspace_id is None:
                continue
            family, kind, summarise = described
            card_id, project_id = _given(family, env)
            subject = env.originator_id
            if (
                (card_id is None or project_id is None)
                and subject not in seen
                and subject not in remembered
                and not complete
            ):
                ask.add(subject)
            seen.add(subject)
            items.append((env, str(workspace_id), kind, summarise, card_id, project_id))
        if not items:
            return
        newest: dict[UUID, Subject] = remembered
        if ask:
            subjects = fetch_all(
                ctx.cur,
                ctx.tables.q(
                    "SELECT DISTINCT ON (subject_id) subject_id, card_id, project_id"
                    " FROM {rm_activity} WHERE subject_id = ANY(%s::uuid[])"
                    " ORDER BY subject_id, position DESC"
                ),
                (list(ask),),
            )
            for row in subjects:
                newest[row["subject_id"]] = (_text(row["card_id"]), _text(row["project_id"]))
        rows = []
        for env, ws, kind, summarise, card_id, project_id in items:
            subject = env.originator_id
            if card_id is None or project_id is None:
                prior_card, prior_project = newest.get(subject, (None, None))
                card_id = card_id if card_id is not None else prior_card
                project_id = project_id if project_id is not None else prior_project
            newest[subject] = (card_id, project_id)
            rows.append(
                (
                    ws,
                    env.position,
                    env.timestamp,
                    env.metadata.get("actor") or "unknown",
                    kind,
                    one_line(summarise(env.event)),
                    card_id,
                    project_id,
                    str(subject),
                )
            )
        insert_rows(ctx, "rm_activity", _COLUMNS, rows)


def _given(family: str, env: EventEnvelope) -> Subject:
    """The card and project an event names itself; its subject's earlier items give the rest."""
    if family == "workspace":
        return None, None
    if family == "project":
        return None, str(env.originator_id)
    event = env.event
    if family == "card":
        return str(env.originator_id), _text(
            event.project_id if isinstance(event, ev.CardCreated) else None
        )
    if isinstance(event, ev.AgentRunRequested):
        return _text(event.card_id), _text(event.project_id)
    return None, None


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def _q(text: object) -> str:
    return f"'{text}'"


def _wip(limit: object) -> str:
    return "" if limit is None else f" (WIP {limit})"


def one_line(summary: str) -> str:
    """One line of at most ``MAX_SUMMARY_LENGTH`` characters."""
    line = " ".join(summary.split())
    if len(line) <= MAX_SUMMARY_LENGTH:
        return line
    return line[: MAX_SUMMARY_LENGTH - 1].rstrip() + "…"
