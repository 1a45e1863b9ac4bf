"""Helpers for write-side integration tests: a small board to work on, and reading the store back.

Kept out of ``conftest.py`` so that spawned worker processes (which do not run pytest) can import
them too.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID, uuid4

import psycopg
import psycopg.sql
from psycopg.rows import tuple_row

from commands import models as m
from commands.handlers import Actor
from domain.errors import Conflict, WipLimitExceeded
from infra.bootstrap import build_write_side

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from adapters.eventlog import EventLog
    from commands.handlers import AgentWorks
    from domain.envelope import EventEnvelope

T = TypeVar("T")

#: (name, WIP limit) of the board's lanes, in order.
LANES: tuple[tuple[str, int | None], ...] = (("Todo", None), ("Doing", 3), ("Done", 5))


@dataclass(frozen=True)
class Board:
    """Ids of a bootstrapped workspace and its project, and the owner acting in it."""

    workspace_id: UUID
    project_id: UUID
    owner: Actor


def bootstrap_board(
    app: AgentWorks,
    *,
    owner: str = "alice",
    lanes: tuple[tuple[str, int | None], ...] = LANES,
) -> Board:
    """A new workspace owned by ``owner`` with one project of the given lanes."""
    created = app.create_workspace(
        m.CreateWorkspace(name=f"{owner}'s workspace"), Actor(user_id=owner, workspace_id="*")
    )
    actor = Actor(user_id=owner, workspace_id=str(created.id))
    project = app.create_project(
        m.CreateProject(
            workspace_id=created.id,
            name="Line",
            lanes=[m.LaneInput(name=name, wip_limit=limit) for name, limit in lanes],
        ),
        actor,
    )
    return Board(workspace_id=created.id, project_id=project.id, owner=actor)


def add_member(app: AgentWorks, board: Board, user_id: str, role: str) -> Actor:
    """``user_id`` added to the board's workspace by its owner, with ``role``; as an actor."""
    app.add_member(
        m.AddMember(workspace_id=board.workspace_id, user_id=user_id, role=role), board.owner
    )
    return Actor(user_id=user_id, workspace_id=str(board.workspace_id))


def add_cards(app: AgentWorks, board: Board, count: int, *, lane: str = "Todo") -> list[UUID]:
    return [
        app.create_card(
            m.CreateCard(project_id=board.project_id, title=f"card {i}", lane=lane), board.owner
        ).id
        for i in range(count)
    ]


def fold(app: AgentWorks, aggregate_id: UUID) -> Iterator[tuple[Any, Any]]:
    """(event, aggregate after it) for each stored event of an aggregate, in version order.

    Folds the stored events directly (not through the repository and its cache); the same
    aggregate object is yielded each time, changed by the next event, so look at it before
    advancing.
    """
    aggregate: Any = None
    for stored in app.recorder.select_events(aggregate_id):
        event: Any = app.mapper.to_domain_event(stored)
        aggregate = event.mutate(aggregate)
        yield event, aggregate


def stored_rows(database_url: str) -> list[tuple[int, UUID, int]]:
    """(notification id, originator id, version) of every stored event, read as the superuser
    without the reader horizon: what is really in the table."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT notification_id, originator_id, originator_version "
            "FROM agentworks_events ORDER BY notification_id"
        ).fetchall()
    return [(int(r[0]), r[1], int(r[2])) for r in rows]


def wait_for(read: Callable[[], Sequence[T]], count: int, timeout: float = 10.0) -> Sequence[T]:
    """Read until at least ``count`` items are visible (or time is up), return the last read.

    The recorder's reader horizon is server-wide: a transaction another test session holds open
    at that moment (in another database) can hold our readers back for a short while.
    """
    deadline = time.monotonic() + timeout
    while True:
        found = read()
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def read_log_to(
    event_log: EventLog, after: int, head: int, *, timeout: float
) -> list[EventEnvelope]:
    """Every event of ``event_log`` after position ``after`` up to ``head``, in log order.

    The log holds an event back while an older transaction anywhere in the cluster is open, so
    this keeps reading until it reaches ``head`` (a position the table already shows).
    """
    found: list[EventEnvelope] = []
    deadline = time.monotonic() + timeout
    while after < head:
        batch = event_log.read(after=after, limit=1000)
        if batch:
            found.extend(batch)
            after = batch[-1].position
        elif time.monotonic() > deadline:
            raise TimeoutError(f"the event log stayed behind position {head} for {timeout:g}s")
        else:
            time.sleep(0.01)
    return found


def whole_log(event_log: EventLog, after: int = 0, *, timeout: float = 30.0) -> list[EventEnvelope]:
    """Every event of ``event_log`` after ``after``, up to :func:`stored_head`
    (:func:`read_log_to`).

    One read may stop short of events long committed: a transaction of another database that was
    running when the read's snapshot was taken and ended before the read looked up its database
    is held to be this database's (the horizon's safe side), and the tests' own database copies
    and drops run beside them. A reader that reads again, as the product's all do, gets them."""
    return read_log_to(event_log, after, stored_head(event_log), timeout=timeout)


def stored_head(event_log: EventLog) -> int:
    """The highest position the table holds (0 when empty), horizon or not."""
    recorder = event_log.recorder
    table = psycopg.sql.Identifier(recorder.datastore.schema, recorder.events_table_name)
    statement = psycopg.sql.SQL("SELECT coalesce(max(notification_id), 0) FROM {}").format(table)
    with recorder.datastore.get_connection() as conn, conn.cursor(row_factory=tuple_row) as cur:
        row = cur.execute(statement).fetchone()
    assert row is not None
    return int(row[0])


def to_the_head(
    step: Callable[[], object],
    position: Callable[[], int],
    event_log: EventLog,
    *,
    timeout: float = 30.0,
) -> int:
    """Run ``step`` (a reader's pass to the end of the log) until ``position()`` reaches
    :func:`stored_head`, which it returns: one pass may end early, as :func:`whole_log` says."""
    head = stored_head(event_log)
    deadline = time.monotonic() + timeout
    step()
    while position() < head:
        if time.monotonic() > deadline:
            raise TimeoutError(f"stayed at {position()} behind position {head} for {timeout:g}s")
        time.sleep(0.01)
        step()
    return head


def command_log_count(database_url: str, command_id: UUID | None = None) -> int:
    """Records in the command log (of one command id, if given; every command has one)."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM command_log WHERE %(id)s::uuid IS NULL OR command_id = %(id)s",
            {"id": command_id},
        ).fetchone()
    assert row is not None
    return int(row[0])


# -- concurrent movers -----------------------------------------------------------------------------


@dataclass
class Moves:
    """What one worker's moves came to (picklable, so processes can send it back)."""

    worker: str
    accepted: list[tuple[UUID, UUID, int, int]] = field(default_factory=list)
    """(command id, card id, card version, position) of every accepted move."""
    refused: Counter[str] = field(default_factory=Counter)
    """Error code → how many moves the rules refused (WIP_LIMIT, CONFLICT)."""
    unexpected: list[str] = field(default_factory=list)


def move_randomly(
    app: AgentWorks, board: Board, card_ids: list[UUID], *, worker: str, seed: int, count: int
) -> Moves:
    """Move random cards to random lanes, ``count`` times; refusals are part of the game."""
    rng = random.Random(seed)
    lanes = [name for name, _ in LANES]
    moves = Moves(worker=worker)
    for _ in range(count):
        command = m.MoveCard(
            card_id=rng.choice(card_ids), to_lane=rng.choice(lanes), command_id=uuid4()
        )
        try:
            result = app.move_card(command, board.owner)
        except (WipLimitExceeded, Conflict) as refusal:
            moves.refused[refusal.code] += 1
        except Exception as error:  # noqa: BLE001 - any error is reported to the test, asserted there
            moves.unexpected.append(f"{worker}: {error!r}")
        else:
            assert command.command_id is not None
            moves.accepted.append((command.command_id, result.id, result.version, result.position))
    return moves


def _wait_for_the_start(go: Any) -> None:
    if not go.wait(timeout=120):
        raise TimeoutError("the test never started the race")


def move_in_own_process(
    database_url: str,
    board: Board,
    card_ids: list[UUID],
    worker: str,
    seed: int,
    count: int,
    *,
    ready: Any,
    go: Any,
    results: Any,
) -> None:
    """Entry point of a spawned worker process: its own write side, built from the URL.

    Puts ``(worker, None)`` on ``ready`` once connected (or ``(worker, error)`` if it could not
    start), waits for ``go``, then puts its :class:`Moves` on ``results``.
    """
    app = build_write_side(database_url, pool_size=2)
    started = False
    try:
        app.card_at(card_ids[0], board.owner)  # connect and warm up before the race starts
        ready.put((worker, None))
        started = True
        _wait_for_the_start(go)
        results.put(move_randomly(app, board, card_ids, worker=worker, seed=seed, count=count))
    except BaseException as error:
        if started:
            results.put(Moves(worker=worker, unexpected=[f"{worker} crashed: {error!r}"]))
        else:
            ready.put((worker, repr(error)))
        raise
    finally:
        app.close()
