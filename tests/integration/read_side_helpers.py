"""Helpers for read-side integration tests: a write side and projector pool on one database,
commands that produce run and charge events, and feeding projectors from the real event log.

Envelopes are always built from the store (``EventLog``) after running real commands, so the
projectors see exactly what the relay and the embedded fan-out would hand them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast
from uuid import UUID

import pg
import psycopg
from board_helpers import LANES, bootstrap_board, read_log_to
from psycopg.rows import dict_row

from adapters.eventlog import EventLog
from adapters.postgres import make_pool
from commands import models as m
from commands.handlers import Actor, CommandResult
from domain.errors import AgentWorksError
from domain.positions import RESPREAD_THRESHOLD
from domain.project import Project
from infra.bootstrap import build_write_side
from projections.runner import BatchOutcome, ProjectionRunner

if TYPE_CHECKING:
    from collections.abc import Iterator

    from psycopg import Connection
    from psycopg.rows import DictRow
    from psycopg_pool import ConnectionPool

    from adapters.eventstore import EventStoreRecorder
    from commands.handlers import AgentWorks
    from domain.envelope import EventEnvelope
    from projections.base import Projector


@dataclass
class World:
    """A workspace with one project (lanes Todo / Doing (WIP 3) / Done), its owner and the
    orchestrator acting in it."""

    workspace_id: UUID
    project_id: UUID
    owner: Actor
    orchestrator: Actor

    @property
    def operator(self) -> Actor:
        """Who sets the workspace's plan (``agentworks plan``): no member may."""
        return Actor.service("operator", self.workspace_id)


@dataclass
class ReadSide:
    app: AgentWorks
    pool: ConnectionPool[Connection[DictRow]]
    log: EventLog
    database_url: str

    def new_world(self, owner: str = "alice") -> World:
        board = bootstrap_board(self.app, owner=owner, lanes=LANES)
        return World(
            workspace_id=board.workspace_id,
            project_id=board.project_id,
            owner=board.owner,
            orchestrator=Actor.service("orchestrator", board.workspace_id),
        )

    def envelopes(self, after: int = 0) -> list[EventEnvelope]:
        """Every event written so far after ``after``, in log order.

        The log holds an event back while any older transaction in the cluster is still open
        (another test session's, say), so this waits until it reaches what the table holds.
        """
        return read_log_to(self.log, after, pg.log_head(self.database_url), timeout=30)

    def runner(self, projector: Projector) -> ProjectionRunner:
        return ProjectionRunner(projector, self.pool, self.log)

    def project(self, projector: Projector) -> BatchOutcome:
        """Apply everything the projector has not seen yet, in one batch."""
        runner = self.runner(projector)
        return runner.process(self.envelopes(after=runner.position()))

    def rows(self, query: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(query, params)
            return cur.fetchall()

    def row(self, query: str, params: tuple[Any, ...] = ()) -> dict[str, Any]:
        found = self.rows(query, params)
        assert len(found) == 1, f"expected one row, got {found}"
        return found[0]

    def position_of(self, event_type: str, originator_id: UUID | None = None) -> int:
        """Position of the newest event of ``event_type`` (of ``originator_id``, if given)."""
        with psycopg.connect(self.database_url) as conn:
            row = conn.execute(
                "SELECT max(notification_id) FROM agentworks_events"
                " WHERE topic LIKE %s AND (%s::uuid IS NULL OR originator_id = %s::uuid)",
                (f"%:{event_type}", originator_id, originator_id),
            ).fetchone()
        assert row is not None
        assert row[0] is not None, f"no {event_type} event in the log"
        return int(row[0])

    def envelope_at(self, position: int) -> EventEnvelope:
        (envelope,) = [
            env for env in self.envelopes(after=position - 1) if env.position == position
        ]
        return envelope


@contextlib.contextmanager
def open_read_side(database_url: str) -> Iterator[ReadSide]:
    app = build_write_side(database_url, pool_size=4)
    pool = make_pool(database_url, role="agentworks_projector")
    try:
        recorder = cast("EventStoreRecorder", app.recorder)
        yield ReadSide(app, pool, EventLog(recorder, app.mapper), database_url)
    finally:
        pool.close()
        app.close()


@contextlib.contextmanager
def shared_read_side(clones: pg.Clones) -> Iterator[ReadSide]:
    """A read side on a database of its own for many tests, which keep apart by workspace."""
    name = pg.random_name("aw_t_shared_")
    with (
        clones.database(name) as url,
        open_read_side(url) as side,
    ):
        yield side


@contextlib.contextmanager
def api_connection(database_url: str, workspace_id: UUID) -> Iterator[Connection[DictRow]]:
    """A connection as the API role, in a transaction scoped to ``workspace_id`` (RLS on)."""
    pool = make_pool(database_url, role="agentworks_api", max_size=1)
    try:
        with pool.connection() as conn, conn.transaction():
            conn.execute(
                "SELECT set_config('agentworks.workspace_id', %s, true)", (str(workspace_id),)
            )
            yield conn
    finally:
        pool.close()


# -- commands --------------------------------------------------------------------------------------


#: Moves into one gap that certainly pass the key-length threshold (a character per about five).
SQUEEZES = 6 * RESPREAD_THRESHOLD


def squeeze(side: ReadSide, world: World, lane: str, card_id: UUID) -> None:
    """:data:`SQUEEZES` moves of ``card_id`` and the lane's other cards in turn, each right after
    the lane's first card: every move lands in the same, ever narrower, gap."""
    app = side.app
    for n in range(SQUEEZES):
        board: Project = app.aggregate(Project, world.project_id)
        if card_id not in board.placements:
            return
        order = [cid for _, cid in board.cards_in(lane)]
        if len(order) < 3:
            return
        mover = order[2 + n % (len(order) - 2)] if n else card_id
        others = [cid for cid in order if cid != mover]
        with contextlib.suppress(AgentWorksError):  # blocked, or a lane at its WIP limit
            app.move_card(
                m.MoveCard(
                    card_id=mover, to_lane=lane, after_card_id=others[0], before_card_id=others[1]
                ),
                world.owner,
            )


def create_card(side: ReadSide, world: World, title: str = "Fix login", lane: str = "Todo") -> UUID:
    return side.app.create_card(
        m.CreateCard(project_id=world.project_id, title=title, lane=lane), world.owner
    ).id


def request_run(
    side: ReadSide,
    world: World,
    card_id: UUID,
    *,
    agent: str = "coder",
    provider: str | None = None,
    model: str | None = None,
    max_cost: str | None = None,
) -> UUID:
    return side.app.start_agent_run(
        m.StartAgentRun(
            card_id=card_id, agent=agent, provider=provider, model=model, max_cost=max_cost
        ),
        world.owner,
    ).id


def running_run(side: ReadSide, world: World, card_id: UUID | None = None, **kwargs: Any) -> UUID:
    """A run of a (new) card that the orchestrator has begun."""
    run_id = request_run(side, world, card_id or create_card(side, world), **kwargs)
    side.app.begin_run(m.BeginRun(run_id=run_id, worker="worker-1"), world.orchestrator)
    return run_id


def append_log(
    side: ReadSide,
    world: World,
    run_id: UUID,
    texts: list[str],
    *,
    stream: str = "stdout",
    at: datetime | None = None,
) -> CommandResult:
    when = at or datetime.now(UTC)
    return side.app.append_run_log(
        m.AppendRunLog(
            run_id=run_id,
            lines=[m.LogLineInput(at=when, stream=stream, text=text) for text in texts],
        ),
        world.orchestrator,
    )


def llm_call(
    side: ReadSide,
    world: World,
    run_id: UUID,
    call_id: str,
    *,
    cost: int,
    at: datetime | None = None,
    provider: str = "simulated",
    model: str = "sim-small",
    input_tokens: int = 100,
    output_tokens: int = 50,
) -> CommandResult:
    """Record an LLM call; ``extra`` of the result holds ``charge_id`` and ``billed``."""
    return side.app.record_llm_call(
        m.RecordLlmCall(
            run_id=run_id,
            call_id=call_id,
            provider=provider,
            model=model,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            latency_ms=120,
            provider_cost_micros=cost,
            price_table_version="2025-01",
            at=at or datetime.now(UTC),
        ),
        world.orchestrator,
    )


def correct(
    side: ReadSide,
    world: World,
    charge_id: UUID | str,
    amount: str,
    *,
    refund: bool = False,
    at: datetime | None = None,
) -> CommandResult:
    return side.app.credit_charge(
        m.CreditCharge(
            charge_id=UUID(str(charge_id)),
            amount=amount,
            reason="goodwill" if not refund else "refund after invoice",
            refund=refund,
            at=at or datetime.now(UTC),
        ),
        world.orchestrator,
    )
