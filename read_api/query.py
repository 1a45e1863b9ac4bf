"""The ``Query`` root: thin resolvers that scope, parse, read and shape.

Every read happens in the caller's workspace scope (row-level security); an id of another
workspace reads as nothing: ``null`` for nullable roots, ``NOT_FOUND`` for non-null ones.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, TypeVar
from uuid import UUID

import strawberry
from strawberry.scalars import JSON

from domain.card import Card as CardAggregate
from domain.errors import NotFound, UndecodableEvent
from domain.months import parse_month
from projections import history, queries
from projections.billing import UsageDimension
from read_api import cursors, eventlog
from read_api import fields as described
from read_api.context import Info
from read_api.me import Me, resolve_me
from read_api.scalars import Money
from read_api.types import (
    ID,
    MAX_ACTIVITY_PAGE,
    MAX_LOG_PAGE,
    MAX_SEARCH_PAGE,
    ActivityConnection,
    ActivityEdge,
    ActivityItem,
    AgentRun,
    Board,
    Card,
    CardHistory,
    Discrepancy,
    HistoryEvent,
    Lane,
    LogHit,
    LogLine,
    Project,
    Reconciliation,
    Statement,
    StatementLine,
    UsageRow,
    Workspace,
    actor_of,
    page_info,
    page_size,
    parse_id,
    seq_after,
)

if TYPE_CHECKING:
    from psycopg import Connection
    from psycopg.rows import DictRow
    from strawberry.dataloader import DataLoader

    from domain.envelope import EventEnvelope
    from read_api.context import RequestContext
    from read_api.db import ReadScope
    from read_api.loaders import Loaders

R = TypeVar("R")
T = TypeVar("T")


def _home(ctx: RequestContext, workspace_id: UUID | None = None) -> ReadScope | None:
    """The caller's scope, or ``None`` when ``workspace_id`` is not the caller's workspace.

    A user token has no home: it reads a named workspace if it is a member (the scope checks)."""
    if workspace_id is not None and ctx.who.principal.is_user:
        return ctx.scope(workspace_id)
    scope = ctx.home_scope()
    if scope is None or (workspace_id is not None and workspace_id != scope.workspace_id):
        return None
    return scope


def _workspace_scope(ctx: RequestContext, workspace_id: str) -> ReadScope:
    """The scope of a ``workspaceId`` argument; NOT_FOUND unless it is the caller's."""
    wanted = parse_id(workspace_id, "workspaceId")
    scope = _home(ctx, wanted)
    if scope is None:
        raise NotFound(f"workspace {wanted} does not exist")
    return scope


async def _by_id(
    ctx: RequestContext,
    wanted: UUID,
    loader: Callable[[Loaders], DataLoader[UUID, R | None]],
    build: Callable[[R, ReadScope], T],
) -> T | None:
    """The object ``wanted`` as the caller may see it: ``None`` when it does not exist or its
    workspace is not one the caller is a member of."""
    scope = await ctx.member_scope_of(wanted)
    if scope is None:
        return None
    row = await loader(scope.loaders).load(wanted)
    return None if row is None else build(row, scope)


def _activity_item(item: queries.ActivityItem) -> ActivityItem:
    actor, service = actor_of(item.actor)
    return ActivityItem(
        at=item.at,
        actor=actor,
        actor_service=service,
        kind=item.kind,
        summary=item.summary,
        card_id=None if item.card_id is None else ID(str(item.card_id)),
        project_id=None if item.project_id is None else ID(str(item.project_id)),
        position=str(item.position),
    )


@strawberry.type
class Query:
    @described.field("The signed-in user and the workspaces they belong to.")
    async def me(self, info: Info) -> Me:
        return await resolve_me(info)

    @strawberry.field
    async def workspace(self, info: Info, id: ID) -> Workspace | None:
        wanted = parse_id(id, "id")
        scope = _home(info.context, wanted)
        if scope is None or not await scope.is_member():
            return None
        row = await scope.loaders.workspace.load(wanted)
        return None if row is None else Workspace.from_row(row, scope)

    @strawberry.field
    async def project(self, info: Info, id: ID) -> Project | None:
        return await _by_id(info.context, parse_id(id, "id"), lambda x: x.project, Project.from_row)

    @described.field(
        "A project's board; with asOf, the board as it was at that instant, folded from the "
        "event store (null when the project did not exist then)."
    )
    async def board(
        self, info: Info, project_id: ID, as_of: datetime | None = None
    ) -> Board | None:
        wanted = parse_id(project_id, "projectId")
        scope = await info.context.member_scope_of(wanted)
        if scope is None:
            return None
        if as_of is not None:
            return await _board_then(info.context, scope, wanted, as_of, info.path.as_list())
        row = await scope.loaders.project.load(wanted)
        return None if row is None else Board.from_row(row, scope)

    @strawberry.field
    async def card(self, info: Info, id: ID) -> Card | None:
        return await _by_id(info.context, parse_id(id, "id"), lambda x: x.card, Card.from_row)

    @described.field("A card as it was at a version (or at a time), with the events up to it.")
    async def card_history(
        self,
        info: Info,
        card_id: ID,
        as_of_version: int | None = None,
        as_of: datetime | None = None,
    ) -> CardHistory:
        ctx = info.context
        wanted = parse_id(card_id, "cardId")
        scope = await ctx.member_scope_of(wanted)
        if scope is None:
            raise NotFound(f"card {wanted} does not exist")
        write = ctx.runtime.services.write
        workspace_id = scope.workspace_id
        actor = ctx.actor()

        def read(
            conn: Connection[DictRow],
        ) -> tuple[CardAggregate, list[EventEnvelope], int, str]:
            envelopes = eventlog.card_events(
                conn,
                write.mapper,
                card_id=wanted,
                workspace_id=workspace_id,
                last_version=write.last_version(wanted),
            )
            version = eventlog.chosen_version(envelopes, as_of_version=as_of_version, as_of=as_of)
            folded = eventlog.foldable_version(wanted, envelopes, version)
            state = write.card_at(wanted, actor, version=folded)
            # Its lane by the board's name for it then (at a version, when that was made).
            then = state.modified_on if as_of_version is not None else as_of
            lane = history.lane_then(conn, write.mapper, state, envelopes, as_of=then)
            return state, envelopes[:version], version, lane

        state, envelopes, version, lane = await scope.run(read)
        # The card's runs and cost by the instant asked about (now, without asOf or
        # asOfVersion); at a version, by the moment that version was made.
        if as_of is not None:
            until = as_of
        elif as_of_version is None:
            until = datetime.now(UTC)
        else:
            until = state.modified_on
        cost = await scope.loaders.card_cost_until.load((wanted, until))
        card = _card_from_aggregate(state, scope, cost, until)
        card.lane = lane
        card.as_of_now = as_of is None and as_of_version is None
        entries = history.history_entries(envelopes)
        path = info.path.as_list()
        for index, entry in enumerate(entries):
            if entry.reason:
                ctx.report(_unread(wanted, entry, state.version), [*path, "events", index])
        return CardHistory(
            card_id=ID(str(wanted)),
            version=version,
            state=card,
            events=[
                HistoryEvent(
                    version=e.version,
                    type=e.type,
                    at=e.at,
                    actor=actor,
                    position=e.position,
                    data=JSON(e.data),
                    actor_service=service,
                )
                for e in entries
                for actor, service in [actor_of(e.actor)]
            ],
        )

    @strawberry.field
    async def agent_run(self, info: Info, id: ID) -> AgentRun | None:
        return await _by_id(
            info.context,
            parse_id(id, "id"),
            lambda x: x.run,
            AgentRun.from_summary,
        )

    @described.field("A run's log lines after afterSeq, in order.")
    async def agent_run_logs(
        self, info: Info, run_id: ID, after_seq: int | None = None, first: int | None = 500
    ) -> list[LogLine]:
        wanted = parse_id(run_id, "runId")
        after = seq_after(after_seq)
        size = page_size(first, most=MAX_LOG_PAGE, default=500)
        scope = await info.context.member_scope_of(wanted)
        if scope is None or await scope.loaders.run.load(wanted) is None:
            raise NotFound(f"agent run {wanted} does not exist")
        lines = await scope.run(
            lambda conn: queries.run_logs(conn, wanted, after_seq=after, first=size)
        )
        return [
            LogLine(run_id=ID(str(x.run_id)), seq=x.seq, at=x.at, stream=x.stream, text=x.text)
            for x in lines
        ]

    @described.field(
        "Log lines matching a web-search style query, best first among the newest 1,000 matches."
    )
    async def search_logs(
        self, info: Info, workspace_id: ID, query: str, first: int | None = 50
    ) -> list[LogHit]:
        scope = _workspace_scope(info.context, workspace_id)
        size = page_size(first, most=MAX_SEARCH_PAGE, default=50)
        text = query[:1000]
        hits = await scope.run(
            lambda conn: queries.search_logs(conn, scope.workspace_id, query=text, first=size)
        )
        return [
            LogHit(run_id=ID(str(h.run_id)), seq=h.seq, text=h.text, at=h.at, stream=h.stream)
            for h in hits
        ]

    @described.field(
        "Usage between from and to (UTC days they touch) by one dimension, ordered by key. "
        "Counts past Int's 32 bits: read the BigInt ones (inputTokensTotal...), see UsageRow."
    )
    async def usage(
        self,
        info: Info,
        workspace_id: ID,
        from_: Annotated[datetime, strawberry.argument(name="from")],
        to: datetime,
        group_by: UsageDimension,
    ) -> list[UsageRow]:
        scope = _workspace_scope(info.context, workspace_id)
        rows = await scope.run(
            lambda conn: queries.usage(
                conn, scope.workspace_id, from_=from_, to=to, group_by=group_by
            )
        )
        return [UsageRow.from_row(r) for r in rows]

    @described.field("The month's statement (month = YYYY-MM), lines rounded up.")
    async def statement(self, info: Info, workspace_id: ID, month: str) -> Statement:
        scope = _workspace_scope(info.context, workspace_id)
        month = parse_month(month)
        s = await scope.run(lambda conn: queries.statement(conn, scope.workspace_id, month))
        return Statement(
            workspace_id=ID(str(s.workspace_id)),
            month=s.month,
            billing_increment=Money(s.billing_increment_micros),
            lines=[
                StatementLine(
                    project_id=ID(str(line.project_id)),
                    kind=line.kind,
                    description=line.description,
                    billed_exact=Money(line.billed_exact_micros),
                    billed=Money(line.billed_micros),
                )
                for line in s.lines
            ],
            total=Money(s.total_micros),
            invoice_id=s.invoice_id,
            invoice_status=s.invoice_status,
        )

    @described.field("The month's billing recomputed from the event log, compared.")
    async def reconciliation(self, info: Info, workspace_id: ID, month: str) -> Reconciliation:
        ctx = info.context
        scope = _workspace_scope(ctx, workspace_id)
        month = parse_month(month)
        mapper = ctx.runtime.services.write.mapper
        plain = mapper.cipher is None and mapper.compressor is None
        comparison = await scope.run(
            lambda conn: eventlog.reconcile(
                conn, mapper, workspace_id=scope.workspace_id, month=month, prefilter_json=plain
            )
        )
        discrepancies = _discrepancies(comparison)
        return Reconciliation(
            month=month,
            event_log_total=Money(comparison.event_log_total),
            read_model_total=Money(comparison.read_model_total),
            invoiced_total=(
                None if comparison.invoiced_total is None else Money(comparison.invoiced_total)
            ),
            ok=not discrepancies,
            discrepancies=discrepancies,
        )

    @described.field("The workspace's activity feed, newest first.")
    async def activity(
        self, info: Info, workspace_id: ID, first: int | None = 50, after: str | None = None
    ) -> ActivityConnection:
        scope = _workspace_scope(info.context, workspace_id)
        size = page_size(first, most=MAX_ACTIVITY_PAGE, default=50)
        within = cursors.list_of(scope.workspace_id)
        after_position = cursors.parse_activity_cursor(after, within) if after else None
        page = await scope.run(
            lambda conn: queries.activity_page(
                conn, scope.workspace_id, first=size, after_position=after_position
            )
        )
        edges = [
            ActivityEdge(
                cursor=cursors.activity_cursor(item.position, within),
                node=_activity_item(item),
            )
            for item in page.items
        ]
        return ActivityConnection(
            edges=edges,
            page_info=page_info(
                [e.cursor for e in edges], has_next=page.has_next_page, has_previous=bool(after)
            ),
        )


def _discrepancies(comparison: eventlog.LedgerComparison) -> list[Discrepancy]:
    found = []
    projects = (
        set(comparison.event_log_by_project)
        | set(comparison.ledger_by_project)
        | set(comparison.statement_by_project)
    )
    for project in sorted(projects, key=str):
        expected = comparison.event_log_by_project.get(project, 0)
        for kind, figures in (
            ("ledger", comparison.ledger_by_project),
            ("statementLine", comparison.statement_by_project),
        ):
            actual = figures.get(project, 0)
            if actual != expected:
                found.append(
                    Discrepancy(
                        kind=kind,
                        key=str(project),
                        expected=Money(expected),
                        actual=Money(actual),
                    )
                )
    for credit in sorted(
        set(comparison.event_log_credits) | set(comparison.read_model_credits), key=str
    ):
        expected = -comparison.event_log_credits.get(credit, 0)
        actual = -comparison.read_model_credits.get(credit, 0)
        if actual != expected:
            found.append(
                Discrepancy(
                    kind="credit", key=str(credit), expected=Money(expected), actual=Money(actual)
                )
            )
    return found


async def _board_then(
    ctx: RequestContext,
    scope: ReadScope,
    project_id: UUID,
    as_of: datetime,
    path: list[str | int],
) -> Board | None:
    mapper = ctx.runtime.services.write.mapper
    try:
        then = await scope.run(
            lambda conn: history.board_as_of(conn, mapper, project_id=project_id, as_of=as_of)
        )
    except NotFound:
        return None
    if then.workspace_id != scope.workspace_id:
        return None
    for card_id, version in then.unreadable.items():
        # Beside the board, at its path: the card is there, as of the version before.
        unread = UndecodableEvent(
            f"card {card_id}: its event at version {version} could not be read (decoded and "
            f"applied); the card is shown as of version {version - 1}" if version > 1 else
            f"card {card_id}: its first event could not be read (decoded and applied); the card "
            "is not shown",
            version=version,
        )  # fmt: skip
        ctx.report(unread, path)
    every = [card.card for lane in then.lanes for card in lane.cards]
    # Runs and costs by the board's instant: a card unchanged since long before it had the runs
    # requested (and the charges made) in between.
    costs = await scope.loaders.card_cost_until.load_many([(c.id, as_of) for c in every])
    cost_of = {card.id: cost for card, cost in zip(every, costs, strict=True)}
    lanes = []
    for lane in then.lanes:
        cards = []
        for shown in lane.cards:
            card = _card_from_aggregate(shown.card, scope, cost_of[shown.card.id], as_of)
            card.lane = shown.lane
            cards.append(card)
        lanes.append(
            Lane(
                name=lane.name,
                wip_limit=lane.wip_limit,
                count=lane.count,
                scope=scope,
                project_key=project_id,
                cards_then=cards,
                as_of=as_of,
            )
        )
    return Board(
        project_id=ID(str(project_id)),
        version=then.version,
        scope=scope,
        key=project_id,
        lanes_then=lanes,
    )


def _unread(card_id: UUID, entry: history.HistoryEntry, folded: int) -> UndecodableEvent:
    """The error reported beside a history entry that could not be read."""
    said = (
        f"card {card_id}: the event at version {entry.version} could not be decoded; its "
        f"entry (type {entry.type!r}) shows what the log still tells of it"
    )
    if not entry.at_known:
        said += ", its time is unknown (at shows the time of the entry before it)"
    if entry.version == folded + 1:
        said += f"; the card's state is shown as of version {folded}, the last before it"
    return UndecodableEvent(
        said, version=entry.version, at=entry.at.isoformat() if entry.at_known else None
    )


def _card_from_aggregate(
    card: CardAggregate, scope: ReadScope, cost_micros: int, until: datetime
) -> Card:
    """A card's historical state as the GraphQL type (the one place an aggregate is shown);
    its runs are those requested by ``until``, the instant it is shown at."""
    return Card(
        id=ID(str(card.id)),
        project_id=ID(str(card.project_id)),
        title=card.title,
        description=card.description,
        lane=card.lane,
        position=card.position,
        assignee=None if card.assignee is None else ID(card.assignee),
        labels=list(card.labels),
        blocked_reason=card.blocked_reason,
        archived=card.archived,
        version=card.version,
        created_at=card.created_on,
        updated_at=card.modified_on,
        scope=scope,
        key=card.id,
        cost=Money(cost_micros),
        last_run_id=None,
        as_of=until,
    )
