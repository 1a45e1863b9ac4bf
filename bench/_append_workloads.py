"""What one writer process does in each append scenario (see bench/append.py).

Every factory takes ``(params, index)`` and returns a runner whose ``op()`` stores something and
returns the number of events (rows) it stored, 0 when the operation failed.
"""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, ClassVar, Generic, TypeVar, cast
from uuid import UUID

import psycopg
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import (
    InfrastructureFactory,
    IntegrityError,
    StoredEvent,
    TrackingRecorder,
)
from eventsourcing.utils import Environment
from psycopg.conninfo import conninfo_to_dict

from adapters.eventstore import EventStoreRecorder, Factory
from commands import models as m
from commands.handlers import Actor, AgentWorks
from domain.errors import Conflict
from infra.bootstrap import build_write_side, event_store_env
from projections.batch import columns_of

LANES = ("Todo", "Doing", "Review", "Done")
CARDS_PER_BOARD = 20

RAW_TABLE_DDL = """
CREATE TABLE IF NOT EXISTS bench_raw (
    originator_id uuid NOT NULL,
    originator_version bigint NOT NULL,
    topic text NOT NULL,
    state bytea NOT NULL,
    notification_id bigserial NOT NULL,
    PRIMARY KEY (originator_id, originator_version)
);
CREATE UNIQUE INDEX IF NOT EXISTS bench_raw_notification_id_idx ON bench_raw (notification_id);
"""


_App = TypeVar("_App", bound=Application[UUID])


class _Shared:
    """What the writer threads of one worker process share: one application, as the API's
    thread pool shares one (``params["threads"]`` > 1). Each thread's runner takes a reference;
    the last to close closes it."""

    _lock = threading.Lock()
    _open: ClassVar[dict[str, _Shared]] = {}

    def __init__(self, app: Any) -> None:
        self.app = app
        self.refs = 0
        self.counting = _Counting(app) if isinstance(app, AgentWorks) else None

    @classmethod
    def take(cls, key: str, make: Callable[[], Any]) -> _Shared:
        with cls._lock:
            shared = cls._open.get(key)
            if shared is None:
                shared = cls._open[key] = cls(make())
            shared.refs += 1
            return shared

    def release(self, key: str) -> None:
        with self._lock:
            self.refs -= 1
            if self.refs == 0:
                del self._open[key]
                self.app.close()


def group_counters(app: Any) -> dict[str, int]:
    """Transactions written by the process's group commit, and the appends they held."""
    recorder = getattr(app, "recorder", None)
    if not isinstance(recorder, EventStoreRecorder):
        return {}
    sizes = recorder.group_commit.written()
    return {
        "group_transactions": sum(sizes.values()),
        "grouped_appends": sum(size * n for size, n in sizes.items()),
    }


class _Counting:
    """Counts version conflicts: each IntegrityError out of ``app.save`` is one retry."""

    def __init__(self, app: AgentWorks) -> None:
        self.conflicts = 0
        self.failures = 0
        save = app.save

        def counting_save(*objs: Any, **kwargs: Any) -> Any:
            try:
                return save(*objs, **kwargs)
            except IntegrityError:
                self.conflicts += 1
                raise

        app.save = counting_save  # type: ignore[method-assign]

    def counters(self) -> dict[str, int]:
        return {"conflict_retries": self.conflicts, "failed_commands": self.failures}


# -- (a) AgentWorks commands through the real handlers -------------------------------------------


def make_board(app: AgentWorks, actor: Actor, name: str) -> tuple[UUID, list[UUID]]:
    """A project with four lanes (no WIP limits) and CARDS_PER_BOARD cards in the first."""
    project = app.create_project(
        m.CreateProject(
            workspace_id=UUID(actor.workspace_id),
            name=name,
            lanes=[m.LaneInput(name=lane) for lane in LANES],
        ),
        actor,
    )
    cards = [
        app.create_card(m.CreateCard(project_id=project.id, title=f"card {i}"), actor).id
        for i in range(CARDS_PER_BOARD)
    ]
    return project.id, cards


class _AppRunner(Generic[_App]):
    """A runner on one application: its own, or (``params["threads"]`` > 1) the one the writer
    threads of its process share, which the last of them to close closes."""

    key: ClassVar[str]  # the shared application's name in _Shared

    def __init__(self, params: dict[str, Any], index: int, make: Callable[[int], _App]) -> None:
        """``make(pool_size)`` builds the application."""
        threads = int(params.get("threads", 1))
        self.shared: _Shared | None = None
        # One thread of each process reports the counters the process's threads share.
        self.reports = index % threads == 0
        if threads > 1:
            self.shared = _Shared.take(self.key, lambda: make(threads))
            self.app: _App = self.shared.app
        else:
            self.app = make(1)

    def close(self) -> None:
        if self.shared is not None:
            self.shared.release(self.key)
        else:
            self.app.close()


class MoveCards(_AppRunner[AgentWorks]):
    """``move_card`` of a random card of the board to another lane: card + project, 2 events."""

    key = "agentworks"

    def __init__(self, params: dict[str, Any], index: int) -> None:
        super().__init__(
            params, index, lambda pool_size: build_write_side(params["url"], pool_size=pool_size)
        )
        if self.shared is None:
            self.counting = _Counting(self.app)
        else:
            assert self.shared.counting is not None
            self.counting = self.shared.counting
        self.actor = Actor(user_id=params["user"], workspace_id=params["workspace_id"])
        if params.get("project_id"):
            project_id, cards = UUID(params["project_id"]), [UUID(c) for c in params["cards"]]
        else:
            project_id, cards = make_board(self.app, self.actor, f"board {index}")
        self.cards = cards
        self.lane_of = dict.fromkeys(cards, LANES[0])
        self.rng = random.Random(index)
        # Later rounds reuse this board (see bench/append.py) instead of building another.
        self.info = {"reuse": {"project_id": str(project_id), "cards": [str(c) for c in cards]}}

    def op(self) -> int:
        card = self.rng.choice(self.cards)
        lane = self.rng.choice([x for x in LANES if x != self.lane_of[card]])
        try:
            self.app.move_card(m.MoveCard(card_id=card, to_lane=lane), self.actor)
        except Conflict:
            self.counting.failures += 1
            return 0
        self.lane_of[card] = lane
        return 2

    def counters(self) -> dict[str, int]:
        if not self.reports:
            return {}
        return {**self.counting.counters(), **group_counters(self.app)}


class AssignCards(MoveCards):
    """``assign_card`` (a single-event command: the card only) on the writer's own board; with
    ``command_ids``, each command carries a new ``commandId`` of its own, as a client that
    retries sends it (the write side then looks the id up and runs it one at a time)."""

    def __init__(self, params: dict[str, Any], index: int) -> None:
        super().__init__(params, index)
        self.assigned: dict[UUID, bool] = {}
        self.command_ids = bool(params.get("command_ids"))

    def op(self) -> int:
        card = self.rng.choice(self.cards)
        # Assignees must be members: the writer assigns itself and unassigns in turn, so every
        # command changes the card and records an event.
        who = None if self.assigned.get(card) else self.actor.user_id
        try:
            command_id = uuid.uuid4() if self.command_ids else None
            self.app.assign_card(
                m.AssignCard(card_id=card, assignee=who, command_id=command_id), self.actor
            )
        except Conflict:
            self.counting.failures += 1
            return 0
        self.assigned[card] = who is not None
        return 1


class AppendRunLog:
    """``append_run_log`` with ``lines`` lines per command: ONE LogChunkAppended event each."""

    def __init__(self, params: dict[str, Any], index: int) -> None:
        self.app = build_write_side(params["url"], pool_size=1)
        self.actor = Actor(user_id=params["user"], workspace_id=params["workspace_id"])
        if params.get("run_id"):
            self.run_id = UUID(params["run_id"])
        else:
            _, cards = make_board(self.app, self.actor, f"log board {index}")
            run = self.app.start_agent_run(
                m.StartAgentRun(card_id=cards[0], agent="coder"), self.actor
            )
            self.app.begin_run(m.BeginRun(run_id=run.id, worker=f"bench-{index}"), self.actor)
            self.run_id = run.id
        self.lines = int(params["lines"])
        self.text = "2026-01-01T00:00:00Z  INFO  compiling module agentworks.bench … ok " + "x" * 20
        self.info = {"reuse": {"run_id": str(self.run_id)}}

    def op(self) -> int:
        at = datetime.now(UTC)
        lines = [m.LogLineInput(at=at, text=self.text) for _ in range(self.lines)]
        self.app.append_run_log(m.AppendRunLog(run_id=self.run_id, lines=lines), self.actor)
        return 1

    def counters(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        self.app.close()


# -- (b) bare eventsourcing saves ----------------------------------------------------------------


class BenchCard(Aggregate):
    """Shaped like domain.card.Card's move: same field names, meta dict, similar sizes."""

    class Created(Aggregate.Created):
        meta: dict[str, str]
        lane: str

        def apply(self, aggregate: Any) -> None:
            aggregate.lane = self.lane

    class Moved(Aggregate.Event):
        meta: dict[str, str]
        from_lane: str
        to_lane: str
        position: str

        def apply(self, aggregate: Any) -> None:
            aggregate.lane = self.to_lane


class BenchBoard(Aggregate):
    """Shaped like domain.project.Project's CardMoved."""

    class Created(Aggregate.Created):
        meta: dict[str, str]

    class CardMoved(Aggregate.Event):
        meta: dict[str, str]
        card_id: UUID
        from_lane: str
        to_lane: str
        position: str


class BareApp(Application[UUID]):
    """A plain eventsourcing application: no handlers, no loads, just ``save(card, board)``."""


def _meta(workspace_id: str) -> dict[str, str]:
    cid = str(uuid.uuid4())
    return {
        "workspace_id": workspace_id,
        "actor": "alice",
        "command_id": cid,
        "correlation_id": cid,
        "causation_id": cid,
        "traceparent": "",
        "schema_version": "1",
    }


def library_env(url: str, *, create_table: bool, pool_size: int = 1) -> dict[str, str]:
    """The library's stock PostgreSQL persistence (EXCLUSIVE table lock per insert)."""
    parts = conninfo_to_dict(url)
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": str(parts["dbname"]),
        "POSTGRES_HOST": str(parts.get("host") or "127.0.0.1"),
        "POSTGRES_PORT": str(parts.get("port") or "5432"),
        "POSTGRES_USER": str(parts.get("user") or "postgres"),
        "POSTGRES_PASSWORD": str(parts.get("password") or ""),
        "POSTGRES_POOL_SIZE": str(pool_size),
        "CREATE_TABLE": "y" if create_table else "n",
    }


def bare_app(url: str, *, recorder: str, create_table: bool = False, pool_size: int = 1) -> BareApp:
    if recorder == "library":
        return BareApp(library_env(url, create_table=create_table, pool_size=pool_size))
    # Our recorder on the migrated schema: the application must be named like ours so the
    # factory picks the agentworks_events table, and its factory is chosen in code (as
    # infra.bootstrap.StoredAgentWorks does): the env names no persistence module, so without
    # it the library would fall back to its in-memory store.
    env = event_store_env(url, db_role="agentworks_app", pool_size=pool_size)
    return OurStoreBareApp(env)


class OurStoreBareApp(BareApp):
    """The bare application on our event store (``adapters.eventstore.Factory``)."""

    name = "AgentWorks"

    def construct_factory(self, env: Environment) -> InfrastructureFactory[TrackingRecorder]:
        return cast("InfrastructureFactory[TrackingRecorder]", Factory(env))


class BareSaves(_AppRunner[BareApp]):
    """Two aggregates, one event each, one ``save(card, board)`` per operation."""

    key = "bare"

    def __init__(self, params: dict[str, Any], index: int) -> None:
        super().__init__(
            params,
            index,
            lambda pool_size: bare_app(
                params["url"], recorder=params["recorder"], pool_size=pool_size
            ),
        )
        self.workspace_id = str(uuid.uuid4())
        self.rng = random.Random(index)
        self.board = BenchBoard._create(BenchBoard.Created, meta=_meta(self.workspace_id))
        self.cards = [
            BenchCard._create(BenchCard.Created, meta=_meta(self.workspace_id), lane=LANES[0])
            for _ in range(CARDS_PER_BOARD)
        ]
        self.app.save(self.board, *self.cards)
        self.info: dict[str, Any] = {}
        self.position = 1

    def op(self) -> int:
        card = self.rng.choice(self.cards)
        lane = self.rng.choice([x for x in LANES if x != card.lane])  # type: ignore[attr-defined]
        meta = _meta(self.workspace_id)
        self.position += 1
        position = f"W{self.position % 1000:03d}"  # positions like the board's: a few chars
        from_lane = card.lane  # type: ignore[attr-defined]
        card.trigger_event(
            BenchCard.Moved, meta=meta, from_lane=from_lane, to_lane=lane, position=position
        )
        self.board.trigger_event(
            BenchBoard.CardMoved,
            meta=meta,
            card_id=card.id,
            from_lane=from_lane,
            to_lane=lane,
            position=position,
        )
        self.app.save(card, self.board)
        return 2

    def counters(self) -> dict[str, int]:
        return group_counters(self.app) if self.reports else {}


# -- (c) raw psycopg -----------------------------------------------------------------------------


class RawInserts:
    """INSERT two rows of the sampled payload sizes, (optionally NOTIFY), COMMIT."""

    def __init__(self, params: dict[str, Any], index: int) -> None:
        self.conn = psycopg.connect(params["url"], autocommit=True)
        self.notify = bool(params.get("notify"))
        self.payloads = [bytes(p) for p in params["payloads"]]
        self.topics = list(params["topics"])
        self.ids = [uuid.uuid4() for _ in self.payloads]
        self.version = 0
        self.info: dict[str, Any] = {}
        self.insert = (
            "INSERT INTO bench_raw (originator_id, originator_version, topic, state) VALUES "
            + ", ".join(["(%s, %s, %s, %s)"] * len(self.payloads))
        )

    def op(self) -> int:
        self.version += 1
        params: list[Any] = []
        for oid, topic, payload in zip(self.ids, self.topics, self.payloads, strict=True):
            params += [oid, self.version, topic, payload]
        # One round trip, like our recorder's pipeline: BEGIN, [NOTIFY,] INSERT, COMMIT.
        with self.conn.pipeline(), self.conn.transaction(), self.conn.cursor() as cur:
            if self.notify:
                cur.execute("NOTIFY bench_raw")
            cur.execute(self.insert, params, prepare=True)
        return len(self.payloads)

    def counters(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        self.conn.close()


# -- (d) bulk ------------------------------------------------------------------------------------


class _Batches:
    """What the bulk runners share: each round, ``batch`` stored events of 10 fresh originators
    (think: agent runs) x batch/10 new versions."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.payloads = [bytes(p) for p in params["payloads"]]
        self.topics = list(params["topics"])
        self.batch = int(params["batch"])
        self.rng = random.Random(uuid.uuid4().int)  # fresh ids in every round
        self.info: dict[str, Any] = {}

    def rows(self) -> list[StoredEvent]:
        originators = [UUID(int=self.rng.getrandbits(128), version=4) for _ in range(10)]
        per = self.batch // len(originators)
        payloads, topics = self.payloads, self.topics
        return [
            StoredEvent(
                originator_id=oid,
                originator_version=v,
                topic=topics[(i * per + v) % len(topics)],
                state=payloads[(i * per + v) % len(payloads)],
            )
            for i, oid in enumerate(originators)
            for v in range(1, per + 1)
        ]

    def counters(self) -> dict[str, int]:
        return {}


class RecorderBatches(_Batches):
    """``app.recorder.insert_events([...])`` of ``batch`` StoredEvents per call (our recorder)."""

    def __init__(self, params: dict[str, Any], index: int) -> None:
        super().__init__(params)
        self.app = build_write_side(params["url"], pool_size=1)

    def op(self) -> int:
        ids = self.app.recorder.insert_events(self.rows())
        return len(ids or ())

    def close(self) -> None:
        self.app.close()


class RawBatches(_Batches):
    """The same rows by raw psycopg: ``COPY ... FROM STDIN`` or one multi-row INSERT of four
    binary-format arrays through ``unnest`` (psycopg's text dumping of large arrays costs more
    client CPU than the server spends inserting)."""

    def __init__(self, params: dict[str, Any], index: int) -> None:
        super().__init__(params)
        self.conn = psycopg.connect(params["url"])
        self.mode = params["mode"]

    def op(self) -> int:
        rows = [(r.originator_id, r.originator_version, r.topic, r.state) for r in self.rows()]
        with self.conn.cursor() as cur:
            if self.mode == "copy":
                with cur.copy(
                    "COPY bench_raw (originator_id, originator_version, topic, state) "
                    "FROM STDIN (FORMAT BINARY)"
                ) as copy:
                    copy.set_types(["uuid", "int8", "text", "bytea"])
                    for row in rows:
                        copy.write_row(row)
            else:
                cur.execute(
                    "INSERT INTO bench_raw (originator_id, originator_version, topic, state) "
                    "SELECT * FROM unnest(%b::uuid[], %b::bigint[], %b::text[], %b::bytea[])",
                    columns_of(rows, 4),
                    prepare=True,
                )
        self.conn.commit()
        return len(rows)

    def close(self) -> None:
        self.conn.close()
