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

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from domain.money import format_usd
from projections.base import Change, Projector, Tables, on

if TYPE_CHECKING:
    from psycopg import Cursor
    from psycopg.rows import DictRow

    from streams.envelope import EventEnvelope

MAX_SUMMARY_LENGTH = 240

Summary = Callable[[dict[str, Any]], str]

#: Event type → (kind, summary from the payload).
_WORKSPACE: dict[str, tuple[str, Summary]] = {
    "Workspace.Created": ("workspace.created", lambda p: f"created workspace {_q(p['name'])}"),
    "Workspace.Renamed": ("workspace.renamed", lambda p: f"renamed workspace to {_q(p['name'])}"),
    "Workspace.MemberAdded": (
        "member.added",
        lambda p: f"added {p['user_id']} as {p['role']}",
    ),
    "Workspace.RoleChanged": (
        "member.role_changed",
        lambda p: f"changed the role of {p['user_id']} to {p['role']}",
    ),
    "Workspace.MemberRemoved": ("member.removed", lambda p: f"removed member {p['user_id']}"),
    "Workspace.PlanSet": (
        "workspace.plan_set",
        lambda p: (
            f"set the plan to markup {p['markup']}x, billed in increments of"
            f" ${format_usd(p['billing_increment_micros'])}"
        ),
    ),
    "Workspace.SpendLimitSet": (
        "workspace.spend_limit_set",
        lambda p: (
            "removed the monthly spend limit"
            if p["monthly_limit_micros"] is None
            else f"set the monthly spend limit to ${format_usd(p['monthly_limit_micros'])}"
        ),
    ),
}

_PROJECT: dict[str, tuple[str, Summary]] = {
    "Project.Created": (
        "project.created",
        lambda p: (
            f"created project {_q(p['name'])} with lanes "
            + ", ".join(lane["name"] for lane in p["lanes"])
        ),
    ),
    "Project.Renamed": ("project.renamed", lambda p: f"renamed project to {_q(p['name'])}"),
    "Project.Archived": ("project.archived", lambda p: "archived the project"),
    "Project.LaneAdded": (
        "lane.added",
        lambda p: f"added lane {_q(p['name'])}" + _wip(p["wip_limit"]),
    ),
    "Project.LaneRenamed": (
        "lane.renamed",
        lambda p: f"renamed lane {_q(p['lane'])} to {_q(p['name'])}",
    ),
    "Project.LanesReordered": (
        "lanes.reordered",
        lambda p: "reordered lanes: " + ", ".join(p["order"]),
    ),
    "Project.LaneRemoved": ("lane.removed", lambda p: f"removed lane {_q(p['lane'])}"),
    "Project.WipLimitSet": (
        "lane.wip_limit_set",
        lambda p: (
            f"removed the WIP limit of {p['lane']}"
            if p["wip_limit"] is None
            else f"set the WIP limit of {p['lane']} to {p['wip_limit']}"
        ),
    ),
}

_CARD: dict[str, tuple[str, Summary]] = {
    "Card.Created": (
        "card.created",
        lambda p: f"created card {_q(p['title'])} in {p['lane']}",
    ),
    "Card.Edited": ("card.edited", lambda p: f"edited card {_q(p['title'])}"),
    "Card.Moved": (
        "card.moved",
        lambda p: (
            f"moved card from {p['from_lane']} to {p['to_lane']}"
            if p["from_lane"] != p["to_lane"]
            else f"reordered card within {p['to_lane']}"
        ),
    ),
    "Card.Assigned": (
        "card.assigned",
        lambda p: (
            "unassigned card" if p["assignee"] is None else f"assigned card to {p['assignee']}"
        ),
    ),
    "Card.Labelled": ("card.labelled", lambda p: f"labelled card {_q(p['label'])}"),
    "Card.Unlabelled": ("card.unlabelled", lambda p: f"removed label {_q(p['label'])} from card"),
    "Card.Blocked": ("card.blocked", lambda p: f"blocked card: {p['reason']}"),
    "Card.Unblocked": ("card.unblocked", lambda p: "unblocked card"),
    "Card.Archived": ("card.archived", lambda p: "archived card"),
    "Card.Restored": ("card.restored", lambda p: f"restored card to {p['lane']}"),
}

_RUN: dict[str, tuple[str, Summary]] = {
    "AgentRun.Requested": (
        "run.requested",
        lambda p: f"requested agent {_q(p['agent'])}" + (f" on {p['model']}" if p["model"] else ""),
    ),
    "AgentRun.Started": ("run.started", lambda p: f"agent run started on {p['worker']}"),
    "AgentRun.Succeeded": ("run.succeeded", lambda p: "agent run succeeded"),
    "AgentRun.Failed": ("run.failed", lambda p: f"agent run failed: {p['error']}"),
    "AgentRun.Cancelled": ("run.cancelled", lambda p: f"agent run cancelled: {p['reason']}"),
    "AgentRun.TimedOut": (
        "run.timed_out",
        lambda p: f"agent run timed out after {p['after_seconds']}s",
    ),
}

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


class ActivityProjector(Projector):
    name: ClassVar[str] = "activity"
    aggregates: ClassVar[frozenset[str]] = frozenset({"Workspace", "Project", "Card", "AgentRun"})
    tables: ClassVar[tuple[str, ...]] = ("rm_activity",)

    @on(*_WORKSPACE)
    def _workspace(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        self._record(cur, t, env, _WORKSPACE[env.type])

    @on(*_PROJECT)
    def _project(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        self._record(cur, t, env, _PROJECT[env.type], project_id=env.originator_id)

    @on(*_CARD)
    def _card(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        self._record(
            cur,
            t,
            env,
            _CARD[env.type],
            card_id=env.originator_id,
            project_id=env.payload.get("project_id"),
        )

    @on(*_RUN)
    def _run(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        self._record(
            cur,
            t,
            env,
            _RUN[env.type],
            card_id=env.payload.get("card_id"),
            project_id=env.payload.get("project_id"),
        )

    @staticmethod
    def _record(
        cur: Cursor[DictRow],
        t: Tables,
        env: EventEnvelope,
        described: tuple[str, Summary],
        *,
        card_id: object = None,
        project_id: object = None,
    ) -> None:
        workspace_id = env.workspace_id
        if workspace_id is None and env.aggregate == "Workspace":
            workspace_id = env.originator_id
        if workspace_id is None:
            return  # not tenant-owned, so no feed can show it
        kind, summarise = described
        cur.execute(
            t.q(_INSERT),
            {
                "ws": workspace_id,
                "position": env.position,
                "at": env.timestamp,
                "actor": env.metadata.get("actor") or "unknown",
                "kind": kind,
                "summary": _short(summarise(env.payload)),
                "card_id": card_id,
                "project_id": project_id,
                "subject_id": env.originator_id,
            },
        )


def _q(text: object) -> str:
    return f"'{text}'"


def _wip(limit: object) -> str:
    return "" if limit is None else f" (WIP {limit})"


def _short(summary: str) -> str:
    """One line of at most ``MAX_SUMMARY_LENGTH`` characters, without NUL (``text`` refuses it)."""
    line = " ".join(summary.replace("\x00", "\ufffd").split())
    if len(line) <= MAX_SUMMARY_LENGTH:
        return line
    return line[: MAX_SUMMARY_LENGTH - 1].rstrip() + "…"
