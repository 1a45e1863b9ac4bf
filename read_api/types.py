"""GraphQL object types, built from read-model rows (``from_row``), never from aggregates —
except a card's historical state, which only the event log knows.

Every object built from rows keeps the :class:`~read_api.db.ReadScope` it was read in, so its
relations (a lane's cards, a card's last run) are read in the same transaction, workspace and
DataLoaders — also in subscriptions, where each event has a scope of its own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Generic, Self, TypeVar
from uuid import NAMESPACE_URL, UUID, uuid5

import strawberry
from strawberry.scalars import JSON
from strawberry.types.nodes import SelectedField, Selection

from domain.agent_run import RunStatus
from domain.errors import ValidationFailed
from domain.roles import Role, require_role
from projections.billing import UsageDimension
from projections.kanban_queries import api_key_exists, invitation_exists
from projections.runs_queries import RunSummary
from read_api import cursors
from read_api import fields as described
from read_api.context import Info
from read_api.db import ReadScope
from read_api.limits import refuse_longer_than_estimated
from read_api.loaders import AccessPage, LanePage, Loaders, Row, RunPage
from read_api.scalars import INSTEAD, BigInt, Money

if TYPE_CHECKING:
    from psycopg import Connection
    from psycopg.rows import DictRow
    from strawberry.dataloader import DataLoader

    from projections import queries

ID = strawberry.ID

MAX_LANE_PAGE = 200
MAX_RUN_PAGE = 200
MAX_ACTIVITY_PAGE = 200
MAX_LOG_PAGE = 1000
MAX_SEARCH_PAGE = 200
MAX_ACCESS_PAGE = 500
"""API keys or invitations listed at most per page (``Workspace.apiKeys``/``invitations``)."""
DEFAULT_ACCESS_PAGE = 100


def parse_id(value: str, what: str) -> UUID:
    """An ``ID`` argument as a UUID; anything else is a VALIDATION error naming the argument."""
    try:
        return UUID(str(value))
    except ValueError:
        raise ValidationFailed(f"{what} must be a UUID, got {str(value)[:60]!r}") from None


def page_size(first: int | None, *, most: int, default: int, what: str = "first") -> int:
    """A page size argument, ``default`` when null, VALIDATION outside ``0..most``."""
    if first is None:
        return default
    if not 0 <= first <= most:
        raise ValidationFailed(f"{what} must be between 0 and {most}, got {first}")
    return first


def seq_after(after_seq: int | None) -> int:
    """A log's ``afterSeq``: 0 when null, VALIDATION when negative (no line is numbered below
    1); one rule for ``agentRunLogs`` and ``agentRunLog``, which a log pane uses together."""
    if after_seq is None:
        return 0
    if after_seq < 0:
        raise ValidationFailed(f"afterSeq must not be negative, got {after_seq}")
    return after_seq


# -- enums ----------------------------------------------------------------------------------------


RoleEnum = strawberry.enum(Role, name="Role")
RunStatusEnum = strawberry.enum(RunStatus, name="RunStatus")
UsageGroupingEnum = strawberry.enum(UsageDimension, name="UsageGrouping")
"""GraphQL's enums are the domain's and the billing read model's own (one list of each)."""


# -- connections ----------------------------------------------------------------------------------


@strawberry.type
class PageInfo:
    has_next_page: bool
    has_previous_page: bool
    start_cursor: str | None
    end_cursor: str | None


def page_info(cursors_: list[str], *, has_next: bool, has_previous: bool) -> PageInfo:
    return PageInfo(
        has_next_page=has_next,
        has_previous_page=has_previous,
        start_cursor=cursors_[0] if cursors_ else None,
        end_cursor=cursors_[-1] if cursors_ else None,
    )


def _fields(selections: list[Selection]) -> list[SelectedField]:
    found: list[SelectedField] = []
    for selection in selections:
        if isinstance(selection, SelectedField):
            found.append(selection)
        else:
            found += _fields(selection.selections)
    return found


def selects(info: strawberry.Info, path: tuple[str, ...]) -> bool:
    """Whether the query asks, below the current field, for ``path`` (fragments included)."""
    level = [
        child for field in _fields(info.selected_fields) for child in _fields(field.selections)
    ]
    for name in path[:-1]:
        level = [child for field in level if field.name == name
                 for child in _fields(field.selections)]  # fmt: skip
    return any(field.name == path[-1] for field in level)


# -- workspaces -----------------------------------------------------------------------------------


@strawberry.type
class Member:
    user_id: ID
    role: Role


class _Grant:
    """An API key or invitation, built from a row whose columns are named as its fields."""

    @classmethod
    def from_row(cls, row: Row) -> Self:
        values = {name: row[name] for name in cls.__annotations__}
        return cls(**values | {"id": ID(str(row["id"])), "role": Role(row["role"])})


@strawberry.type
class Invitation(_Grant):
    id: ID
    email: str
    role: Role
    expires_at: datetime
    accepted_at: datetime | None
    revoked_at: datetime | None


@strawberry.type
class ApiKey(_Grant):
    id: ID
    name: str
    role: Role
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


N = TypeVar("N")


@strawberry.type(name="Edge")
class GrantEdge(Generic[N]):
    cursor: str
    node: N


@strawberry.type(name="Connection")
class GrantConnection(Generic[N]):
    """A page of a workspace's API keys or invitations; GraphQL names it for its node
    (``ApiKeyConnection``, ``InvitationConnection``)."""

    edges: list[GrantEdge[N]]
    page_info: PageInfo


@dataclass(frozen=True)
class _GrantList:
    """How a workspace's API keys or invitations are listed, and paged (Relay, as API.md has
    every list that can grow)."""

    what: str
    cursor_kind: str
    loader: Callable[[Loaders], DataLoader[AccessPage, list[Row]]]
    exists: Callable[[Connection[DictRow], UUID], bool]


_GRANT_LISTS: dict[type[_Grant], _GrantList] = {
    ApiKey: _GrantList("API keys", "apiKey", lambda x: x.api_keys, api_key_exists),
    Invitation: _GrantList("invitations", "invitation", lambda x: x.invitations, invitation_exists),
}
API_KEYS_DOC = (
    "The workspace's API keys, newest first: live ones, revoked ones too with includeRevoked. "
    "ADMIN or OWNER only (FORBIDDEN otherwise). A Relay connection: `first` (default 100, at "
    "most 500), `after` an endCursor."
)
INVITATIONS_DOC = (
    "The workspace's invitations, newest first: pending ones (not accepted, revoked or "
    "expired), all with includeClosed. ADMIN or OWNER only (FORBIDDEN otherwise). A Relay "
    "connection: `first` (default 100, at most 500), `after` an endCursor."
)
_PAGE = DEFAULT_ACCESS_PAGE
G = TypeVar("G", bound=_Grant)


async def _admin_list(
    info: Info,
    scope: ReadScope,
    kind: type[G],
    include_closed: bool | None,
    first: int | None,
    after: str | None,
) -> GrantConnection[G]:
    """A page of the workspace's API keys or invitations (``kind``), for a caller who acts as
    an ADMIN or OWNER there (the membership's role capped by the credential's; FORBIDDEN
    below).

    An empty page after a cursor whose item is none of this workspace's is a bad cursor, said
    so, rather than an empty list that would read as "no more"."""
    listing = _GRANT_LISTS[kind]
    principal = info.context.who.principal
    require_role(
        await scope.member_role(), Role.ADMIN, action=f"listing {listing.what}",
        user_id=scope.user_id, ceiling=principal.role, api_key_id=principal.api_key_id,
    )  # fmt: skip
    size = page_size(first, most=MAX_ACCESS_PAGE, default=DEFAULT_ACCESS_PAGE)
    closed = bool(include_closed)
    kind_tag, within = listing.cursor_kind, cursors.list_of(scope.workspace_id, closed)
    page = AccessPage(
        workspace_id=scope.workspace_id,
        include_closed=closed,
        limit=size + 1,  # one more than asked: whether there is a next page
        after=None if after is None else cursors.parse_grant_cursor(after, kind_tag, within),
    )
    rows = await listing.loader(scope.loaders).load(page)
    cursor = page.after
    if not (rows or cursor is None or await scope.run(lambda c: listing.exists(c, cursor))):
        raise ValidationFailed(
            f"after must be the endCursor of a page of this workspace's {listing.what}"
        )
    edges = [
        GrantEdge(cursor=cursors.grant_cursor(kind_tag, row["id"], within), node=kind.from_row(row))
        for row in rows[:size]
    ]
    return GrantConnection(
        edges=edges,
        page_info=page_info(
            [edge.cursor for edge in edges], has_next=len(rows) > size, has_previous=bool(after)
        ),
    )


@strawberry.type
class Workspace:
    id: ID
    name: str
    markup: str
    billing_increment: Money
    monthly_limit: Money | None
    version: int
    created_at: datetime
    updated_at: datetime
    scope: strawberry.Private[ReadScope]
    key: strawberry.Private[UUID]

    @classmethod
    def from_row(cls, row: Row, scope: ReadScope) -> Workspace:
        return cls(
            id=ID(str(row["workspace_id"])),
            name=row["name"],
            markup=row["markup"],
            billing_increment=Money(int(row["billing_increment_micros"])),
            monthly_limit=None
            if row["monthly_limit_micros"] is None
            else Money(int(row["monthly_limit_micros"])),
            version=int(row["version"]),
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            scope=scope,
            key=row["workspace_id"],
        )

    @strawberry.field
    async def members(self, info: Info) -> list[Member]:
        rows = await self.scope.loaders.members.load(self.key)
        _as_long_as_estimated(info, len(rows))
        return [Member(user_id=ID(row["user_id"]), role=Role(row["role"])) for row in rows]

    @described.field(
        "Net billed this UTC month: its charges less their credits and refunds (a workspace"
        " credit lowers the statement, not this)."
    )
    async def spent_this_month(self) -> Money:
        return Money(await self.scope.loaders.spend_this_month.load(self.key))

    @described.field(API_KEYS_DOC)
    async def api_keys(
        self, info: Info, include_revoked: bool | None = False, first: int | None = _PAGE,
        after: str | None = None) -> GrantConnection[ApiKey]:  # fmt: skip
        return await _admin_list(info, self.scope, ApiKey, include_revoked, first, after)

    @described.field(INVITATIONS_DOC)
    async def invitations(
        self, info: Info, include_closed: bool | None = False, first: int | None = _PAGE,
        after: str | None = None) -> GrantConnection[Invitation]:  # fmt: skip
        # Pending by the database's clock: an invitation expires without an event of its own.
        return await _admin_list(info, self.scope, Invitation, include_closed, first, after)

    @strawberry.field
    async def projects(self, info: Info, include_archived: bool = False) -> list[Project]:
        rows = await self.scope.loaders.projects_of_workspace.load(self.key)
        shown = [row for row in rows if include_archived or not row["archived"]]
        _as_long_as_estimated(info, len(shown))
        return [Project.from_row(row, self.scope) for row in shown]


def _as_long_as_estimated(
    info: Info, length: int, fullest: Mapping[str, int] = MappingProxyType({})
) -> None:
    """VALIDATION when a list of the workspace's, as long as it is, makes the operation cost
    more than the estimate allows (:func:`read_api.limits.refuse_longer_than_estimated`)."""
    raw = info._raw_info
    refuse_longer_than_estimated(
        raw.operation,
        raw.fragments,
        info.variable_values,
        field=raw.field_name,
        length=length,
        known=info.context.list_lengths,
        estimates=info.context.list_estimates,
        max_cost=info.context.runtime.services.query_limits.max_cost,
        fullest=fullest,
    )


# -- projects and boards --------------------------------------------------------------------------


@strawberry.type
class Project:
    id: ID
    workspace_id: ID
    name: str
    archived: bool
    created_at: datetime
    scope: strawberry.Private[ReadScope]
    row: strawberry.Private[Row]

    @classmethod
    def from_row(cls, row: Row, scope: ReadScope) -> Project:
        return cls(
            id=ID(str(row["project_id"])),
            workspace_id=ID(str(row["workspace_id"])),
            name=row["name"],
            archived=bool(row["archived"]),
            created_at=row["created_at"],
            scope=scope,
            row=row,
        )

    @strawberry.field
    def board(self) -> Board:
        return Board.from_row(self.row, self.scope)


@strawberry.type
class Board:
    project_id: ID
    version: int = strawberry.field(description="The project's version: changes with every move.")
    scope: strawberry.Private[ReadScope]
    key: strawberry.Private[UUID]
    lanes_then: strawberry.Private[list[Lane] | None] = None
    """Set for a board as it was (``asOf``): its lanes, folded from the event store."""

    @classmethod
    def from_row(cls, row: Row, scope: ReadScope) -> Board:
        return cls(
            project_id=ID(str(row["project_id"])),
            version=int(row["version"]),
            scope=scope,
            key=row["project_id"],
        )

    @strawberry.field
    async def lanes(self, info: Info) -> list[Lane]:
        if self.lanes_then is not None:
            lanes = self.lanes_then
        else:
            rows = await self.scope.loaders.lanes.load(self.key)
            lanes = [Lane.from_row(row, self.scope) for row in rows]
        board_lists = frozenset(lane.cards_list for lane in lanes)
        for lane in lanes:
            lane.board_lists = board_lists
        _as_long_as_estimated(
            info, len(lanes), {"cards": max((lane.count for lane in lanes), default=0)}
        )
        return lanes


@strawberry.type
class Lane:
    name: str
    wip_limit: int | None
    count: int = strawberry.field(description="Live (not archived) cards in the lane.")
    scope: strawberry.Private[ReadScope]
    project_key: strawberry.Private[UUID]
    cards_then: strawberry.Private[list[Card] | None] = None
    """Set for a lane as it was: its live cards in board order."""
    as_of: strawberry.Private[datetime | None] = None
    """Set for a lane as it was: the instant shown."""
    board_lists: strawberry.Private[frozenset[str]] = frozenset()
    """The lists of cards of its board's lanes in this answer (see :meth:`cards`)."""

    @classmethod
    def from_row(cls, row: Row, scope: ReadScope) -> Lane:
        return cls(
            name=row["name"],
            wip_limit=row["wip_limit"],
            count=int(row["card_count"]),
            scope=scope,
            project_key=row["project_id"],
        )

    @property
    def cards_list(self) -> str:
        """The identity its cards' cursors are bound to: this lane of this board, as shown."""
        return cursors.list_of(self.scope.workspace_id, self.project_key, self.name, self.as_of)

    @strawberry.field
    async def cards(
        self, info: strawberry.Info, first: int | None = 100, after: str | None = None
    ) -> CardConnection:
        """A cursor of another lane of the board is no cursor of this one, yet not refused:
        ``board { lanes { cards(after:) } }`` is the one way to page a lane, and its ``after``
        reaches every lane; the others answer as if it were not given. A cursor of no lane
        of this board (another board, instant or workspace, a lane renamed since) is
        ``VALIDATION``."""
        size = page_size(first, most=MAX_LANE_PAGE, default=100)
        within = self.cards_list
        followed = (
            cursors.parse_card_cursor(after, within, beside=self.board_lists) if after else None
        )
        position, card_id = followed or (None, None)
        if self.cards_then is not None:
            return _cards_page(self.cards_then, size, position, card_id, within)
        rows = await self.scope.loaders.lane_cards.load(
            LanePage(
                project_id=self.project_key,
                lane=self.name,
                limit=size + 1,
                after_position=position,
                after_card_id=card_id,
            )
        )
        cards = [Card.from_row(row, self.scope) for row in rows[:size]]
        if selects(info, ("edges", "node", "lastRun")):
            wanted = [card.last_run_id for card in cards if card.last_run_id is not None]
            found = dict(zip(wanted, await self.scope.loaders.run.load_many(wanted), strict=True))
            for card in cards:
                run = found.get(card.last_run_id) if card.last_run_id else None
                card.knowing_last_run(
                    None if run is None else AgentRun.from_summary(run, self.scope)
                )
        edges = [CardEdge(node=card, within=within) for card in cards]
        return CardConnection(
            edges=edges,
            page_info=page_info(
                _end_cursors(cards, within),
                has_next=len(rows) > size,
                has_previous=after is not None and not (after and followed is None),
            ),
        )


def _end_cursors(cards: list[Card], within: str) -> list[str]:
    """The cursors of a page's first and last cards, all :class:`PageInfo` needs of them."""
    return [cursors.card_cursor(c.position, c.key, within) for c in cards[:1] + cards[1:][-1:]]


def _cards_page(
    cards: list[Card], size: int, position: str | None, card_id: UUID | None, within: str
) -> CardConnection:
    """A page of a lane as it was (already in board order), after the cursor's card."""
    after = [
        c
        for c in cards
        if position is None or card_id is None or (c.position, c.key) > (position, card_id)
    ]
    page = after[:size]
    return CardConnection(
        edges=[CardEdge(node=card, within=within) for card in page],
        page_info=page_info(
            _end_cursors(page, within),
            has_next=len(after) > size,
            has_previous=position is not None,
        ),
    )


# -- runs -----------------------------------------------------------------------------------------


@strawberry.type
class ProviderAttempt:
    """One call to a provider on behalf of a run, whatever its outcome."""

    attempt: int
    provider: str
    model: str
    status: str
    http_status: int | None
    error: str | None
    latency_ms: int
    input_tokens: int
    output_tokens: int
    provider_cost: Money
    estimated: bool

    @classmethod
    def from_row(cls, row: Row) -> ProviderAttempt:
        return cls(
            attempt=int(row["attempt"]),
            provider=row["provider"],
            model=row["model"],
            status=row["status"],
            http_status=row["http_status"],
            error=row["error"],
            latency_ms=int(row["latency_ms"]),
            input_tokens=int(row["input_tokens"]),
            output_tokens=int(row["output_tokens"]),
            provider_cost=Money(int(row["provider_cost_micros"])),
            estimated=bool(row["estimated"]),
        )


_RUN_USAGE = "usage(groupBy: AGENT_RUN) { %s }"
"""Where a run's counts are read whatever their size: its row of ``usage`` by run."""


def _run_tokens(what: str, total: str) -> str:
    return (
        f"{what} of the run's LLM calls. An Int: the orchestrator keeps a run far below "
        f"2147483647 (each call's count is checked against its prompt and max_tokens, a run "
        f"makes a few calls); past it, this field is an INT_OVERFLOW error, and "
        f"{_RUN_USAGE % total} carries the count."
    )


@strawberry.type
class AgentRun:
    id: ID
    card_id: ID
    project_id: ID
    agent: str
    status: RunStatus
    provider: str | None
    model: str | None
    input_tokens: int = strawberry.field(
        description=_run_tokens("Prompt tokens", "inputTokensTotal"),
        metadata={INSTEAD: _RUN_USAGE % "inputTokensTotal"},
    )
    output_tokens: int = strawberry.field(
        description=_run_tokens("Output tokens", "outputTokensTotal"),
        metadata={INSTEAD: _RUN_USAGE % "outputTokensTotal"},
    )
    provider_cost: Money
    billed: Money
    max_cost: Money | None
    llm_calls: int
    requested_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    log_line_count: int
    version: int
    scope: strawberry.Private[ReadScope | None] = None
    """The scope the run was read in: its output and attempts are read there too (a user token
    has no home scope; it reads the run's workspace, where it is a member)."""
    as_of: strawberry.Private[datetime | None] = None
    """Set for the run as it was at an instant (a card's historical state): its output and
    attempts are then those it had by then."""

    def _scope(self, info: strawberry.Info) -> ReadScope | None:
        return self.scope if self.scope is not None else info.context.home_scope()

    @described.field("The run's final text, once it succeeded.")
    async def output(self, info: strawberry.Info) -> str | None:
        scope = self._scope(info)
        if scope is None or (self.as_of is not None and self.finished_at is None):
            return None  # not yet, then
        row = await scope.loaders.run_output.load(UUID(str(self.id)))
        return None if row is None else str(row["output"])

    @described.field("Every provider call of the run, in order.")
    async def attempts(self, info: strawberry.Info) -> list[ProviderAttempt]:
        scope = self._scope(info)
        if scope is None:
            return []
        rows = await scope.loaders.run_attempts.load(UUID(str(self.id)))
        then = self.as_of
        return [ProviderAttempt.from_row(row) for row in rows if then is None or row["at"] <= then]

    @classmethod
    def from_summary(
        cls, run: RunSummary, scope: ReadScope | None = None, as_of: datetime | None = None
    ) -> AgentRun:
        """The API's view of the read model's row: ids as ``ID``, micro-USD as ``Money``;
        ``scope``: where it was read; ``as_of``: the instant it shows the run at, if not now."""
        return cls(
            id=ID(str(run.run_id)),
            card_id=ID(str(run.card_id)),
            project_id=ID(str(run.project_id)),
            agent=run.agent,
            status=RunStatus(run.status),
            provider=run.provider,
            model=run.model,
            input_tokens=int(run.input_tokens),
            output_tokens=int(run.output_tokens),
            provider_cost=Money(int(run.provider_cost_micros)),
            billed=Money(int(run.billed_micros)),
            max_cost=None if run.max_cost_micros is None else Money(int(run.max_cost_micros)),
            llm_calls=int(run.llm_calls),
            requested_at=run.requested_at,
            started_at=run.started_at,
            finished_at=run.finished_at,
            error=run.error,
            log_line_count=int(run.log_line_count),
            version=int(run.version),
            scope=scope,
            as_of=as_of,
        )


@strawberry.type
class AgentRunEdge:
    cursor: str
    node: AgentRun


@strawberry.type
class AgentRunConnection:
    edges: list[AgentRunEdge]
    page_info: PageInfo


@strawberry.type
class LogLine:
    run_id: ID
    seq: int
    at: datetime
    stream: str
    text: str


@strawberry.type
class LogHit:
    run_id: ID
    seq: int
    text: str
    at: datetime
    stream: str


# -- cards ----------------------------------------------------------------------------------------


@strawberry.type
class Card:
    id: ID
    project_id: ID
    title: str
    description: str
    lane: str
    position: str
    assignee: ID | None
    labels: list[str]
    blocked_reason: str | None
    archived: bool
    version: int
    created_at: datetime
    updated_at: datetime
    cost: Money = strawberry.field(
        description="Billed for the card's runs so far (for a historical state: by then)."
    )
    scope: strawberry.Private[ReadScope]
    key: strawberry.Private[UUID]
    last_run_id: strawberry.Private[UUID | None]
    as_of: strawberry.Private[datetime | None]
    """Set for a historical state: runs are then limited to those requested by then."""
    as_of_now: strawberry.Private[bool] = False
    """``as_of`` is the request's own instant (``cardHistory`` at no ``asOf``/``asOfVersion``):
    its runs are the live list, and so are their cursors'."""

    @property
    def _then(self) -> datetime | None:
        """The instant its runs are shown at, when not now."""
        return None if self.as_of_now else self.as_of

    known_last_run: strawberry.Private[AgentRun | None] = None
    last_run_known: strawberry.Private[bool] = False
    """The last run was read with the card's page (see :meth:`Lane.cards`)."""

    @classmethod
    def from_row(cls, row: Row, scope: ReadScope) -> Card:
        return cls(
            id=ID(str(row["card_id"])),
            project_id=ID(str(row["project_id"])),
            title=row["title"],
            description=row["description"],
            lane=row["lane"],
            position=row["position"],
            assignee=None if row["assignee"] is None else ID(row["assignee"]),
            labels=list(row["labels"] or []),
            blocked_reason=row["blocked_reason"],
            archived=bool(row["archived"]),
            version=int(row["version"]),
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            cost=Money(int(row["cost_micros"])),
            scope=scope,
            key=row["card_id"],
            last_run_id=row["last_run_id"],
            as_of=None,
        )

    def knowing_last_run(self, run: AgentRun | None) -> Card:
        self.known_last_run = run
        self.last_run_known = True
        return self

    def _last_run(self) -> Awaitable[AgentRun | None] | AgentRun | None:
        # Synchronous when the last run came with the card's page: a board of 200 cards then
        # resolves its last runs without 200 awaitables.
        if self.last_run_known:
            return self.known_last_run
        return self._load_last_run()

    async def _load_last_run(self) -> AgentRun | None:
        if self.as_of is not None:
            rows = await self.scope.loaders.card_runs.load(
                RunPage(card_id=self.key, limit=1, until=self.as_of)
            )
            return AgentRun.from_summary(rows[0], self.scope, self._then) if rows else None
        if self.last_run_id is None:
            return None
        run = await self.scope.loaders.run.load(self.last_run_id)
        return None if run is None else AgentRun.from_summary(run, self.scope)

    last_run: Awaitable[AgentRun | None] | AgentRun | None = strawberry.field(
        resolver=_last_run, graphql_type=AgentRun | None
    )

    @described.field("The card's runs, newest first.")
    async def runs(self, first: int | None = 20, after: str | None = None) -> AgentRunConnection:
        size = page_size(first, most=MAX_RUN_PAGE, default=20)
        within = cursors.list_of(
            self.scope.workspace_id, self.key, None if self.as_of_now else self.as_of
        )
        at, run_id = cursors.parse_run_cursor(after, within) if after else (None, None)
        rows = await self.scope.loaders.card_runs.load(
            RunPage(
                card_id=self.key,
                limit=size + 1,
                after_requested_at=at,
                after_run_id=run_id,
                until=self.as_of,
            )
        )
        edges = [
            AgentRunEdge(cursor=cursors.run_cursor(run.requested_at, run.run_id, within),
                         node=AgentRun.from_summary(run, self.scope, self._then))
            for run in rows[:size]
        ]  # fmt: skip
        return AgentRunConnection(
            edges=edges,
            page_info=page_info(
                [e.cursor for e in edges], has_next=len(rows) > size, has_previous=after is not None
            ),
        )


@strawberry.type
class CardEdge:
    node: Card
    within: strawberry.Private[str]
    """The lane's list (:attr:`Lane.cards_list`)."""

    @strawberry.field
    def cursor(self) -> str:
        """Made on demand: a board shows 200 cards and rarely asks for their cursors."""
        return cursors.card_cursor(self.node.position, self.node.key, self.within)


@strawberry.type
class CardConnection:
    edges: list[CardEdge]
    page_info: PageInfo


# -- billing --------------------------------------------------------------------------------------


def _past_int(what: str, total: str) -> str:
    return (
        f"{what}. An Int (at most 2147483647): a larger value is an INT_OVERFLOW error at "
        f"this field, and, the row, the list and usage being non-null, the answer's data is "
        f"null; {total} carries the same count whatever its size."
    )


def _total(what: str, old: str) -> str:
    return f"{what}, as a BigInt (a decimal string): {old} whatever its size, exactly."


@strawberry.type(
    description=(
        "One key's usage over the window. Its counts are Int (the contract's) and BigInt "
        "(callsTotal, inputTokensTotal, outputTokensTotal): the same numbers, the BigInt ones "
        "exact past 32 bits. A client that may meet a month of a busy workspace reads those."
    )
)
class UsageRow:
    key: str
    calls: int = strawberry.field(
        description=_past_int("LLM calls", "callsTotal"), metadata={INSTEAD: "callsTotal"}
    )
    input_tokens: int = strawberry.field(
        description=_past_int("Prompt tokens", "inputTokensTotal"),
        metadata={INSTEAD: "inputTokensTotal"},
    )
    output_tokens: int = strawberry.field(
        description=_past_int("Output tokens", "outputTokensTotal"),
        metadata={INSTEAD: "outputTokensTotal"},
    )
    provider_cost: Money
    billed: Money
    calls_total: BigInt = strawberry.field(description=_total("LLM calls", "calls"))
    input_tokens_total: BigInt = strawberry.field(
        description=_total("Prompt tokens", "inputTokens")
    )
    output_tokens_total: BigInt = strawberry.field(
        description=_total("Output tokens", "outputTokens")
    )

    @classmethod
    def from_row(cls, row: queries.UsageRow) -> UsageRow:
        """The API's view of one key's sums: each count as Int and as BigInt alike (which of
        them fits is for the field to say, when it is asked for)."""
        return cls(
            key=row.key,
            calls=row.calls,
            input_tokens=row.input_tokens,
            output_tokens=row.output_tokens,
            provider_cost=Money(row.provider_cost_micros),
            billed=Money(row.billed_micros),
            calls_total=BigInt(row.calls),
            input_tokens_total=BigInt(row.input_tokens),
            output_tokens_total=BigInt(row.output_tokens),
        )


@strawberry.type
class StatementLine:
    project_id: ID = strawberry.field(
        description="The project of a usage line; the credit's id on a credit line."
    )
    kind: str = strawberry.field(description="usage or credit.")
    description: str
    billed_exact: Money
    billed: Money = strawberry.field(
        description="billedExact rounded up to the workspace's billing increment."
    )


@strawberry.type
class Statement:
    workspace_id: ID
    month: str
    billing_increment: Money
    lines: list[StatementLine]
    total: Money
    invoice_id: str | None
    invoice_status: str | None


@strawberry.type
class Discrepancy:
    kind: str
    key: str
    expected: Money = strawberry.field(description="What the event log says.")
    actual: Money = strawberry.field(description="What the read model (or invoice) says.")


@strawberry.type
class Reconciliation:
    month: str
    event_log_total: Money
    read_model_total: Money
    invoiced_total: Money | None
    ok: bool
    discrepancies: list[Discrepancy]


# -- history, activity, live events ---------------------------------------------------------------

_SERVICES = uuid5(NAMESPACE_URL, "https://agentworks.dev/services")
"""The namespace of the ids the API gives services that act (uuid5 of their names)."""

_ACTOR_SERVICE = (
    "The service that acted, when no user did (orchestrator, billing-cli, ...); null for a user."
)


def actor_of(actor: str) -> tuple[ID, str | None]:
    """An event's actor as the API names it: the user's id, or, for a service (the orchestrator,
    an operator's command), an id made from the service's name, the same wherever it acted, and
    the name. IDs are UUIDs (API.md): a service named by its bare name was none, so a client
    looking actors up by id failed on it."""
    try:
        return ID(str(UUID(actor))), None
    except ValueError:
        return ID(str(uuid5(_SERVICES, actor))), actor


@strawberry.type
class HistoryEvent:
    version: int
    type: str
    at: datetime
    actor: ID
    position: str
    data: JSON
    actor_service: str | None = strawberry.field(default=None, description=_ACTOR_SERVICE)


@strawberry.type
class CardHistory:
    card_id: ID
    version: int
    state: Card
    events: list[HistoryEvent]


@strawberry.type
class ActivityItem:
    at: datetime
    actor: ID
    kind: str
    summary: str
    card_id: ID | None
    project_id: ID | None
    position: str
    actor_service: str | None = strawberry.field(default=None, description=_ACTOR_SERVICE)


@strawberry.type
class ActivityEdge:
    cursor: str
    node: ActivityItem


@strawberry.type
class ActivityConnection:
    edges: list[ActivityEdge]
    page_info: PageInfo


@strawberry.type
class BoardEvent:
    kind: str
    card_id: ID | None
    card: Card | None
    run_id: ID | None
    position: str
    consistency_token: str | None = strawberry.field(
        description="The write this event tells of, as a mutation's consistencyToken: sent "
        "as X-Consistency-Token, a read of its card or run waits until every read model holds "
        "it (this event comes once the board's does). Null for board.resync."
    )
