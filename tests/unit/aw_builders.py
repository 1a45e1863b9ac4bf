"""Builders shared by the unit tests: event metadata, aggregates and an in-memory write side.

Everything here is pure: the application runs on ``eventsourcing.popo`` (in-memory), so no test
that uses these helpers touches a database or the network.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import pytest

from commands import models as m
from commands.handlers import Actor, AgentWorks, CommandResult
from domain.agent_run import AgentRun
from domain.card import Card
from domain.errors import AgentWorksError, Forbidden
from domain.meta import EventMeta
from domain.roles import Role

POPO_ENV = {"PERSISTENCE_MODULE": "eventsourcing.popo"}
OWNER = "owner-1"


def meta(workspace_id: UUID | str, actor: str = "u1") -> EventMeta:
    return EventMeta.for_command(workspace_id=workspace_id, actor=actor)


def new_card(
    *, lane: str = "Todo", title: str = "  Write PRD ", description: str = "first draft"
) -> Card:
    """A card of a new workspace and project, its creation event still pending."""
    workspace_id = uuid4()
    return Card.create(
        card_id=uuid4(),
        workspace_id=workspace_id,
        project_id=uuid4(),
        title=title,
        description=description,
        lane=lane,
        position="V1",
        meta=meta(workspace_id),
    )


def request_run(
    *,
    workspace_id: UUID | None = None,
    agent: str = "coder",
    provider: str | None = None,
    model: str | None = None,
    max_cost: int | None = None,
) -> AgentRun:
    """``AgentRun.request`` for a card of a new project (of a new workspace unless one is named),
    its events still pending."""
    workspace = uuid4() if workspace_id is None else workspace_id
    return AgentRun.request(
        run_id=uuid4(),
        workspace_id=workspace,
        project_id=uuid4(),
        card_id=uuid4(),
        agent=agent,
        provider=provider,
        model=model,
        max_cost_micros=max_cost,
        meta=meta(workspace),
    )


def collect(aggregate: Any) -> list[Any]:
    """The aggregate's pending events, loosely typed so a test can read each event's fields."""
    return list(aggregate.collect_events())


def new_app() -> AgentWorks:
    return AgentWorks(env=dict(POPO_ENV))


def position_of_log(app: AgentWorks) -> int:
    """The highest global position written so far (0 for an empty store)."""
    return app.recorder.max_notification_id() or 0


def assert_refused(
    app: AgentWorks,
    error: type[AgentWorksError],
    send: Callable[[], object],
    *,
    match: str | None = None,
) -> AgentWorksError:
    """``send()`` raises ``error`` and nothing at all is appended to the event store."""
    before = position_of_log(app)
    with pytest.raises(error, match=match) as caught:
        send()
    assert position_of_log(app) == before, "a refused command wrote events"
    return caught.value


def stored_events(app: AgentWorks) -> list[Any]:
    """Every stored event, in global order, as domain events."""
    notifications = app.recorder.select_notifications(start=1, limit=1_000_000)
    return [app.mapper.to_domain_event(n) for n in notifications]


def walk(value: Any) -> Iterator[Any]:
    """Every value reachable from ``value`` through dicts, lists, tuples, sets and attributes."""
    yield value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from walk(key)
            yield from walk(item)
    elif isinstance(value, list | tuple | set | frozenset):
        for item in value:
            yield from walk(item)
    elif hasattr(value, "__dict__") and not isinstance(value, type):
        yield from walk(vars(value))


def state_of(aggregate: Any) -> dict[str, Any]:
    """An aggregate's state without its pending (unsaved) events."""
    return {k: v for k, v in vars(aggregate).items() if k != "_pending_events"}


@dataclass
class World:
    """A workspace with a project (default lanes) and one card, owned by :data:`OWNER`."""

    app: AgentWorks
    workspace_id: UUID
    project_id: UUID
    card_id: UUID
    users: dict[str, Role] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        *,
        lanes: list[m.LaneInput] | None = None,
        app: AgentWorks | None = None,
        owner: str = OWNER,
    ) -> World:
        """A fresh world; pass ``app`` to add a second tenant to the same event store."""
        app = app or new_app()
        boot = Actor(user_id=owner, workspace_id="*")
        workspace_id = app.create_workspace(m.CreateWorkspace(name="Acme"), boot).id
        owner_actor = Actor(user_id=owner, workspace_id=str(workspace_id))
        project_cmd = (
            m.CreateProject(workspace_id=workspace_id, name="Rocket")
            if lanes is None
            else m.CreateProject(workspace_id=workspace_id, name="Rocket", lanes=lanes)
        )
        project_id = app.create_project(project_cmd, owner_actor).id
        first = m.CreateCard(project_id=project_id, title="First")
        card_id = app.create_card(first, owner_actor).id
        return cls(app, workspace_id, project_id, card_id, {owner: Role.OWNER})

    @property
    def owner(self) -> Actor:
        return self.actor(next(u for u, r in self.users.items() if r is Role.OWNER))

    def actor(self, user_id: str) -> Actor:
        return Actor(user_id=user_id, workspace_id=str(self.workspace_id))

    def service(self) -> Actor:
        return Actor.service("orchestrator", self.workspace_id)

    def operator(self) -> Actor:
        """Who sets the workspace's plan (``agentworks plan``): no member may."""
        return Actor.service("operator", self.workspace_id)

    def member(self, user_id: str, role: Role) -> Actor:
        """Add ``user_id`` with ``role`` (by the owner) and return them as an actor."""
        self.app.add_member(
            m.AddMember(workspace_id=self.workspace_id, user_id=user_id, role=role.value),
            self.owner,
        )
        self.users[user_id] = role
        return self.actor(user_id)

    def card(self, title: str = "Card", lane: str | None = None) -> UUID:
        cmd = m.CreateCard(project_id=self.project_id, title=title, lane=lane)
        return self.app.create_card(cmd, self.owner).id

    def run(self, *, begin: bool = False) -> UUID:
        run_id = self.app.start_agent_run(
            m.StartAgentRun(card_id=self.card_id, agent="coder"), self.owner
        ).id
        if begin:
            self.app.begin_run(m.BeginRun(run_id=run_id, worker="w1"), self.service())
        return run_id

    def llm_call(
        self,
        run_id: UUID,
        *,
        call_id: str | None = None,
        cost: int = 1_000,
        at: datetime | None = None,
        actor: Actor | None = None,
    ) -> CommandResult:
        cmd = m.RecordLlmCall(
            run_id=run_id,
            call_id=call_id or f"call-{uuid4()}",
            provider="simulated",
            model="sim-1",
            input_tokens=10,
            output_tokens=20,
            latency_ms=5,
            provider_cost_micros=cost,
            price_table_version="2025-01",
            at=at or datetime.now(UTC),
        )
        return self.app.record_llm_call(cmd, actor or self.service())

    def get(self, aggregate_id: UUID) -> Any:
        return self.app.repository.get(aggregate_id)

    def refuses(
        self,
        error: type[AgentWorksError],
        handler: Callable[[Any, Actor], CommandResult],
        cmd: m.Command,
        actor: Actor | None = None,
    ) -> AgentWorksError:
        """``handler`` refuses ``cmd`` sent by ``actor`` (the owner unless named) with ``error``,
        and nothing at all is appended to the event store."""
        sender = self.owner if actor is None else actor
        return assert_refused(self.app, error, lambda: handler(cmd, sender))


#: The ids a command may be aimed by, one of which each command carries.
_TARGETS = ("workspace_id", "project_id", "card_id")


@dataclass(frozen=True)
class Spec:
    """One command, the least role it needs, and how to send it in a given world."""

    name: str
    needed: Role
    send: Callable[[World, Actor], CommandResult]
    prepare: Callable[[World], object] = lambda world: None

    def __str__(self) -> str:
        return self.name

    @classmethod
    def of(
        cls,
        needed: Role,
        handler: Callable[[AgentWorks, Any, Actor], CommandResult],
        kind: type[m.Command],
        prepare: Callable[[World], object] = lambda world: None,
        **fields: object,
    ) -> Spec:
        """The command ``kind`` with ``fields``, aimed at the world's own workspace, project or
        card (whichever id the command carries), and named as GraphQL names its mutation, so
        a table of specs reads as the schema's list of mutations and the role each needs."""
        (target,) = [name for name in _TARGETS if name in kind.model_fields]
        first, *rest = handler.__name__.split("_")
        name = first + "".join(word.title() for word in rest)

        def send(world: World, actor: Actor) -> CommandResult:
            return handler(world.app, kind(**{target: getattr(world, target)}, **fields), actor)

        return cls(name, needed, send, prepare)


def assert_role_matrix(
    world: World, role: Role, needed: Role, send: Callable[[Actor], CommandResult]
) -> Forbidden | None:
    """``send`` by a member holding ``role`` writes when that is at least ``needed``; else it is
    refused, naming the user and the role needed, and writes nothing. Returns the refusal."""
    actor = world.owner if role is Role.OWNER else world.member(f"user-{role}", role)
    if role.at_least(needed):
        before = position_of_log(world.app)
        result = send(actor)
        assert result.position > before
        return None
    error = assert_refused(world.app, Forbidden, lambda: send(actor))
    assert actor.user_id in error.message
    assert needed.value in error.message
    assert isinstance(error, Forbidden)
    return error
