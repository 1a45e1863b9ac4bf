"""The composition root: builds the write side (and later everything else) from settings, once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from adapters.aggregate_events import ApplyingRepository, DecodingEventStore
from adapters.eventlog import EventLog, open_event_log
from adapters.eventstore import (
    CONNINFO_ENV,
    POOL_TIMEOUT_ENV,
    EventStoreRecorder,
    Factory,
    PostgresCommandLog,
)
from adapters.kafka import (
    broker_dependency,
    broker_unreachable,
    create_topics,
    make_producer,
    producer_state_lost,
    topic_id,
)
from adapters.metrics import observe_command
from adapters.postgres import DEFAULT_POOL_TIMEOUT, login_url, make_pool
from adapters.spend_counter import RedisSpendCounter
from commands.handlers import AgentWorks
from domain.envelope import TOPICS
from domain.errors import ValidationFailed
from projections.registry import all_projectors, projector_named
from projections.revisions import Revisions, check_revisions
from projections.runner import ProjectionRunner
from streams.relay import Relay, RelayLease, RelayPositions

if TYPE_CHECKING:
    from pathlib import Path
    from uuid import UUID

    from eventsourcing.application import Repository
    from eventsourcing.persistence import EventStore, InfrastructureFactory, TrackingRecorder
    from eventsourcing.utils import Environment
    from psycopg import Connection
    from psycopg.rows import DictRow
    from psycopg_pool import ConnectionPool

    from commands.service import CommandObserver
    from infra.settings import DbComponent, Settings
    from projections.base import Change, Projector


#: Connection parameters the library's own settings (``POSTGRES_*``) carry.
_STORE_CONNECTION_KEYS = frozenset({"dbname", "host", "port", "user", "password"})


def event_store_env(
    database_url: str,
    *,
    db_role: str | None,
    pool_size: int,
    db_password: str | None = None,
    pool_timeout: float = DEFAULT_POOL_TIMEOUT,
) -> dict[str, str]:
    """The eventsourcing library's configuration for our store, logging in as ``db_role``.

    Tables come from migrations (``agentworks migrate``), never from the library: the application
    role may not create, alter, update or delete anything in the store.
    """
    parts = conninfo_to_dict(login_url(database_url, db_role, db_password))
    # Every other parameter of the URL (sslmode, sslrootcert, options...) goes to the store's
    # connections too: the library's own settings carry only the five above.
    others = {k: v for k, v in parts.items() if k not in _STORE_CONNECTION_KEYS}
    return {
        **({CONNINFO_ENV: make_conninfo("", **others)} if others else {}),
        "POSTGRES_DBNAME": str(parts.get("dbname") or ""),
        # No host: libpq's default, the Unix socket, as every other connection of ours uses.
        "POSTGRES_HOST": str(parts.get("host") or ""),
        "POSTGRES_PORT": str(parts.get("port") or "5432"),
        "POSTGRES_USER": str(parts.get("user") or "postgres"),
        "POSTGRES_PASSWORD": str(parts.get("password") or ""),
        "POSTGRES_POOL_SIZE": str(pool_size),
        "POSTGRES_MAX_OVERFLOW": str(pool_size),
        "POSTGRES_CONN_MAX_AGE": "3600",
        # Our pool checks connections before lending them (adapters.postgres); the library's
        # own pre-ping would check twice.
        "POSTGRES_PRE_PING": "n",
        POOL_TIMEOUT_ENV: str(pool_timeout),
        "POSTGRES_IDLE_IN_TRANSACTION_SESSION_TIMEOUT": "10",
        "CREATE_TABLE": "n",
        "AGGREGATE_CACHE_MAXSIZE": "10000",
        "AGGREGATE_CACHE_FASTFORWARD": "y",
    }


def build_write_side(
    database_url: str,
    *,
    db_role: str | None = "agentworks_app",
    db_password: str | None = None,
    pool_size: int = 10,
    retries: int = 5,
    pool_timeout: float = DEFAULT_POOL_TIMEOUT,
    settle_seconds: float = 5.0,
) -> StoredAgentWorks:
    """The application, logged in as ``db_role`` (``None``: as the URL's own user).

    Components that only read the log (projectors, the relay) build it with their own role:
    the store refuses their appends.
    """
    env = event_store_env(
        database_url,
        db_role=db_role,
        db_password=db_password,
        pool_size=pool_size,
        pool_timeout=pool_timeout,
    )
    return StoredAgentWorks(
        env, retries=retries, observe=observe_command, settle_seconds=settle_seconds
    )


class StoredAgentWorks(AgentWorks):
    """AgentWorks on our PostgreSQL event store, with its command log in the same database: the
    one place where the write side's persistence is chosen."""

    # The library names the store's tables after the application: the same as AgentWorks'.
    name = AgentWorks.name

    def __init__(
        self, env: dict[str, str], *, retries: int, observe: CommandObserver, settle_seconds: float
    ) -> None:
        # Our recorder checks a command's cached reads in its transaction (unchanged_since).
        super().__init__(
            env,
            retries=retries,
            observe=observe,
            settle_seconds=settle_seconds,
            cached_reads=True,
        )
        self.command_log = self.stored_command_log = PostgresCommandLog(self.store.datastore)

    def close(self) -> None:
        self.stored_command_log.close()
        super().close()

    def construct_factory(self, env: Environment) -> InfrastructureFactory[TrackingRecorder]:
        self.store = Factory(env)
        # The library types factories by their tracking recorder, invariantly: ours is the
        # postgres factory's, a TrackingRecorder.
        return cast("InfrastructureFactory[TrackingRecorder]", self.store)

    def construct_event_store(self) -> EventStore[UUID]:
        # A stored event that cannot be decoded refuses the command as UNDECODABLE.
        return DecodingEventStore(mapper=self.mapper, recorder=self.recorder)

    def construct_repository(self) -> Repository[UUID]:
        # A stored event that decodes and that today's apply refuses refuses it as UNDECODABLE.
        return ApplyingRepository.of(super().construct_repository())

    def construct_snapshot_store(self) -> EventStore[UUID]:
        return DecodingEventStore(
            mapper=self.mapper, recorder=self.factory.aggregate_recorder(purpose="snapshots")
        )

    def write_each_command_alone(self) -> None:
        """Turn group commit off for this write side: each command is written at once in its own
        transaction. For the orchestrator, whose concurrent commands mostly wait on one another
        (a run's own steps, a workspace's charges, runs on one card): queued behind groups they
        ran at 0.20-0.28x the direct calls' rate in its 200-run bench, against 0.43x alone."""
        recorder = self.recorder
        if not isinstance(recorder, EventStoreRecorder):  # pragma: no cover - Factory's class
            raise TypeError(f"expected the event store's recorder, got {type(recorder).__name__}")
        recorder.group_commit.max_in_flight = 0

    def event_log(self) -> EventLog:
        """The log as this application reads it (for those that write and follow, like the
        orchestrator); components that only read open their own (``open_event_log``)."""
        recorder = self.recorder
        if not isinstance(recorder, EventStoreRecorder):  # pragma: no cover - Factory's class
            raise TypeError(f"expected the event store's recorder, got {type(recorder).__name__}")
        return EventLog(recorder, self.mapper)


def event_log_from(
    settings: Settings,
    database_url: str,
    component: DbComponent,
    *,
    pool_size: int,
    data_dir: Path | None = None,
) -> EventLog:
    """The event log, read as ``component`` logs in, on connections of its own."""
    return open_event_log(
        event_store_env(
            component_url(settings, database_url, component, data_dir=data_dir),
            db_role=None,
            pool_size=pool_size,
            pool_timeout=settings.pool_timeout,
        )
    )


def component_url(
    settings: Settings, database_url: str, component: DbComponent, *, data_dir: Path | None = None
) -> str:
    """``database_url`` logging in as ``component``'s own role, with its password."""
    from infra.settings import db_login

    login = db_login(settings, component, data_dir=data_dir)
    return login_url(database_url, login.role, login.password)


def write_side_from(
    settings: Settings,
    database_url: str,
    *,
    component: DbComponent = "writer",
    pool_size: int | None = None,
    data_dir: Path | None = None,
) -> StoredAgentWorks:
    """The application as ``component`` (the writer, or a reader of the log) logs in."""
    from infra.orchestration import load_price_table

    app = build_write_side(
        component_url(settings, database_url, component, data_dir=data_dir),
        db_role=None,
        pool_size=settings.pool_size if pool_size is None else pool_size,
        retries=settings.command_retries,
        pool_timeout=settings.pool_timeout,
        settle_seconds=settings.commit_settle_seconds,
    )
    app.prices = load_price_table(settings)
    return app


@dataclass
class ReadSide:
    """The log reader, the projector pool and one runner per projector, built once."""

    event_log: EventLog
    pool: ConnectionPool[Connection[DictRow]]
    runners: list[ProjectionRunner]
    spend_counter: RedisSpendCounter | None = None

    def runner(self, name: str) -> ProjectionRunner:
        for runner in self.runners:
            if runner.name == name:
                return runner
        raise ValidationFailed(
            f"there is no projector named {name!r}; choose one of "
            f"{', '.join(r.name for r in self.runners)}"
        )

    def revisions(self) -> tuple[list[Projector], Revisions]:
        """The projectors whose read model an older revision of them built (to rebuild), and
        what the recorded revisions say (see :mod:`projections.revisions`)."""
        projectors = [runner.projector for runner in self.runners]
        with self.pool.connection() as conn:
            found = check_revisions(conn, projectors)
        return [p for p in projectors if p.name in found.stale_names], found

    def close(self) -> None:
        self.pool.close()
        self.event_log.close()
        if self.spend_counter is not None:
            self.spend_counter.close()


def build_read_side(
    settings: Settings,
    database_url: str,
    *,
    projector_names: list[str] | None = None,
    on_commit: Callable[[list[Change]], None] | None = None,
    data_dir: Path | None = None,
) -> ReadSide:
    """Projectors and the log they read, all logged in as the projector role. With Redis
    configured, what the billing projector commits feeds the spend counter that spend checks
    read."""
    event_log = event_log_from(
        settings, database_url, "projector", pool_size=settings.pool_size, data_dir=data_dir
    )
    url = component_url(settings, database_url, "projector", data_dir=data_dir)
    pool = make_pool(url, max_size=settings.pool_size, timeout=settings.pool_timeout)
    projectors = (
        [projector_named(name) for name in projector_names] if projector_names else all_projectors()
    )
    counter = spend_counter(settings)
    runners = [
        ProjectionRunner(
            p,
            pool,
            event_log,
            on_commit=on_commit,
            on_spend=None if counter is None else counter.feed,
        )
        for p in projectors
    ]
    return ReadSide(event_log, pool, runners, counter)


def spend_counter(settings: Settings) -> RedisSpendCounter | None:
    """The feed of the Redis spend counter, when Redis is configured. Short timeouts: a Redis
    that does not answer must hold a projector up for a moment, not for a socket's default."""
    if settings.redis_url is None:
        return None
    import redis

    return RedisSpendCounter(
        redis.Redis.from_url(settings.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
    )


def build_relay(
    settings: Settings, database_url: str, *, data_dir: Path | None = None
) -> tuple[Relay, EventLog]:
    """The relay and the log it tails (closed by the caller), both logged in as the relay
    role."""
    bootstrap = settings.kafka_bootstrap
    if not bootstrap:
        raise ValidationFailed("AGENTWORKS_KAFKA_BOOTSTRAP is not set; the relay needs Kafka")
    create_topics(bootstrap, [settings.topic_prefix + t for t in TOPICS], settings.topic_partitions)
    # The relay only reads the log: two connections are plenty.
    event_log = event_log_from(settings, database_url, "relay", pool_size=2, data_dir=data_dir)
    url = component_url(settings, database_url, "relay", data_dir=data_dir)
    relay = Relay(
        event_log,
        lambda: make_producer(bootstrap),
        RelayPositions(url, role=None),
        topic_prefix=settings.topic_prefix,
        listen_url=url,
        state_lost=producer_state_lost,
        topic_id=topic_id,
        lease=RelayLease(url, role=None),
        broker=broker_dependency(bootstrap),
        broker_unreachable=broker_unreachable,
    )
    return relay, event_log
