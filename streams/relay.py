"""The relay: the event log, in global order, onto Kafka.

It publishes a batch, waits until the broker has acknowledged all of it (``acks=all``), and only
then records the batch's last position in Postgres. A relay killed at any moment therefore
resumes at or before the first unacknowledged event: delivery is at-least-once, and projectors
turn that into an exactly-once effect.

A broker can also lose what it acknowledged (one that keeps its log in memory and restarts, an
unclean leader election, a topic deleted and created again). The relay keeps, with its position,
marks of what the broker acknowledged (:class:`BrokerMarks`) and compares every acknowledgement
with them: a topic whose id changed was re-created empty; an offset at or below one acknowledged
before on the same partition means the log under it was lost (offsets only grow); and a delivery
that failed because the broker no longer knew the producer (``state_lost``) says the same. Then,
at its next successful batch, the relay rewinds to the lowest sweep watermark of the projectors
(below it, everything is applied everywhere) and publishes again from there: republishing is
always safe, projectors ignore what they have applied.
"""

from __future__ import annotations

import json
import threading
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol
from uuid import UUID

import psycopg
import structlog
from opentelemetry.trace import SpanKind

from adapters.eventlog import MAX_BATCH_BYTES, header_envelope
from adapters.metrics import BROKER_LOG_LOST
from adapters.outages import OUTAGES, is_connection_error, is_database_error, is_outage
from adapters.postgres import connect, login_url
from adapters.telemetry import continue_trace, current_traceparent, tracing_enabled
from adapters.wakeup import LogWakeup
from domain.envelope import OMITTED
from domain.text import replace_unstorable

if TYPE_CHECKING:
    from adapters.eventlog import EventLog
    from domain.envelope import EventEnvelope

log = structlog.get_logger(__name__)


@dataclass
class BrokerMarks:
    """What the broker acknowledged so far: enough to notice that it lost some of it."""

    offsets: dict[str, int] = field(default_factory=dict)
    """``"topic:partition"`` → the highest offset acknowledged there."""
    topic_ids: dict[str, str] = field(default_factory=dict)
    """Topic → the id the broker gave it (Kafka ≥ 2.8); a new id means a new, empty topic."""

    def to_json(self) -> str:
        return json.dumps({"offsets": self.offsets, "topic_ids": self.topic_ids})

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> BrokerMarks:
        data = data or {}
        return cls(
            {key: int(offset) for key, offset in (data.get("offsets") or {}).items()},
            {topic: str(ident) for topic, ident in (data.get("topic_ids") or {}).items()},
        )

    def note(
        self, acknowledged: Sequence[Acknowledgement], topic_ids: dict[str, str | None]
    ) -> list[str]:
        """Take in a batch's acknowledgements; return what they reveal was lost."""
        lost = sorted(
            f"{topic} (re-created)"
            for topic, ident in topic_ids.items()
            if ident and self.topic_ids.get(topic, ident) != ident
        )
        lowest: dict[str, int] = {}
        highest: dict[str, int] = {}
        for metadata in acknowledged:
            offset = getattr(metadata, "offset", None)
            if offset is None or offset < 0:
                continue
            key = f"{metadata.topic}:{metadata.partition}"
            lowest[key] = min(offset, lowest.get(key, offset))
            highest[key] = max(offset, highest.get(key, offset))
        lost += sorted(key for key, offset in lowest.items() if offset <= self.offsets.get(key, -1))
        if lost:
            self.forget()
        self.offsets.update(highest)
        self.topic_ids.update({topic: ident for topic, ident in topic_ids.items() if ident})
        return lost

    def forget(self) -> None:
        """The marks belong to a log the broker lost: start afresh."""
        self.offsets.clear()
        self.topic_ids.clear()


class Acknowledgement(Protocol):
    """Where the broker put a record: the part of kafka-python's ``RecordMetadata`` read here."""

    @property
    def topic(self) -> str: ...

    @property
    def partition(self) -> int: ...

    @property
    def offset(self) -> int: ...


class Delivery(Protocol):
    def get(self, timeout: float | None = ...) -> Acknowledgement: ...


class Producer(Protocol):
    """The part of kafka-python's ``KafkaProducer`` the relay uses."""

    def send(
        self,
        topic: str,
        value: bytes | None = ...,
        key: bytes | None = ...,
        headers: list[tuple[str, bytes]] | None = ...,
    ) -> Delivery: ...

    def flush(self, timeout: float | None = ...) -> None: ...

    def close(self, timeout: float | None = ...) -> None: ...


RELAY = "relay"
"""The relay's name (its row of ``relay_positions``, its lease): a deployment runs one."""


class RelayPositions:
    """The relay's published position and its :class:`BrokerMarks`, kept in Postgres."""

    def __init__(self, database_url: str, *, role: str | None, relay: str = RELAY) -> None:
        """Logs in as ``role`` (``None``: the URL's own user)."""
        self._url = login_url(database_url, role)
        self.relay = relay
        self._conn: psycopg.Connection[Any] | None = None

    def load(self) -> int:
        return self.load_with_marks()[0]

    def load_with_marks(self) -> tuple[int, BrokerMarks]:
        row = self._execute(
            "SELECT position, broker_marks FROM relay_positions WHERE relay = %s", (self.relay,)
        ).fetchone()
        if not row:
            return 0, BrokerMarks()
        return int(row[0]), BrokerMarks.from_json(row[1])

    def save(self, position: int, marks: BrokerMarks | None = None) -> None:
        self._execute(
            "INSERT INTO relay_positions (relay, position, broker_marks) "
            "VALUES (%s, %s, coalesce(%s::jsonb, '{}')) "
            "ON CONFLICT (relay) DO UPDATE SET position = EXCLUDED.position, "
            "broker_marks = coalesce(%s::jsonb, relay_positions.broker_marks), "
            "updated_at = clock_timestamp()",
            (self.relay, position, *[marks.to_json() if marks else None] * 2),
        )

    def lowest_watermark(self) -> int:
        """Below this position every projector has applied every event it follows."""
        # A rebuild's scratch tracking ("name#rebuild") reads the log itself, not Kafka.
        row = self._execute(
            "SELECT coalesce(min(swept_through), 0) FROM projection_positions "
            "WHERE projector NOT LIKE '%#%'"
        ).fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = connect(self._url, autocommit=True)
        return self._conn

    def _execute(self, query: str, params: tuple[Any, ...] | None = None) -> psycopg.Cursor[Any]:
        """Run ``query``; a connection the server dropped (a restart) is replaced once."""
        try:
            return self._connection().execute(query, params)
        except Exception as error:
            if not is_connection_error(error):
                raise
            if self._conn is not None and not (self._conn.closed or self._conn.broken):
                raise
            self.close()
            return self._connection().execute(query, params)


class RelayLease:
    """The right to publish: a session advisory lock on a connection of its own.

    Several ``agentworks relay`` processes may run against one event store; the one holding the
    lease publishes, the others wait on standby and take over within their standby interval when
    its session ends (process killed, connection lost). Two relays publishing at once for a
    moment, when a lease is lost unnoticed, only duplicates messages, which projectors ignore.
    """

    #: The server notices a relay host that vanished without closing its socket, and frees
    #: the lock, after about 11 s (5 s idle, then 3 probes 2 s apart), not after the operating
    #: system's two-hour default.
    KEEPALIVES = "-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2 -c tcp_keepalives_count=3"

    def __init__(self, database_url: str, *, role: str | None, relay: str = RELAY) -> None:
        """Logs in as ``role`` (``None``: the URL's own user)."""
        self._url = login_url(database_url, role)
        self._options = self.KEEPALIVES
        self.key = zlib.crc32(f"agentworks relay {relay}".encode()) & 0x7FFFFFFF
        self._conn: psycopg.Connection[Any] | None = None
        self.held = False
        self.unreachable = False
        """The last attempt could not reach the database (rather than finding the lease held)."""

    def acquire(self) -> bool:
        try:
            if self._conn is None or self._conn.closed:
                self._conn = connect(self._url, autocommit=True, options=self._options)
            row = self._conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()
            self.held = bool(row and row[0])
            self.unreachable = False
        except Exception as error:
            if not is_database_error(error):
                raise
            self._drop()
            self.unreachable = True
        return self.held

    def still_held(self) -> bool:
        """False once the session that holds the lock is gone (checked with a round trip)."""
        if not self.held or self._conn is None or self._conn.closed:
            self._drop()
            return False
        try:
            self._conn.execute("SELECT 1")
        except Exception as error:
            if not is_database_error(error):
                raise
            self._drop()
        return self.held

    def release(self) -> None:
        if self.held and self._conn is not None and not self._conn.closed:
            try:
                self._conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
            except Exception as error:
                if not is_database_error(error):
                    raise
        self._drop()

    def _drop(self) -> None:
        self.held = False
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception as error:
                if not is_database_error(error):
                    raise
            self._conn = None


def topic_for(envelope: EventEnvelope, prefix: str) -> str:
    return prefix + envelope.topic


def headers_for(envelope: EventEnvelope, traceparent: str = "") -> list[tuple[str, bytes]]:
    # (A header is a hint: text without a UTF-8 form, in a stored event's metadata, is replaced.)
    return [
        ("type", envelope.type.encode()),
        ("position", str(envelope.position).encode()),
        ("originator", str(envelope.originator_id).encode()),
        ("version", str(envelope.originator_version).encode()),
        ("event-version", str(envelope.event_version).encode()),
        ("traceparent", (traceparent or envelope.traceparent).encode(errors="replace")),
        ("workspace", str(envelope.workspace_id or "").encode()),
    ]


def envelope_of_headers(headers: Mapping[str, bytes]) -> EventEnvelope | None:
    """The envelope a message's headers describe, without its payload: enough for a reader
    that does not use it (:data:`~domain.envelope.UNREAD`) to keep its place. ``None`` when the
    headers do not say it all (a message of a relay before they did, or another producer's)."""
    try:
        workspace = headers.get("workspace", b"").decode()
        return header_envelope(
            int(headers["position"]),
            UUID(headers["originator"].decode()),
            int(headers["version"]),
            headers["type"].decode(),
            int(headers["event-version"]),
            UUID(workspace) if workspace else None,
        )
    except (KeyError, ValueError, TypeError, AttributeError):
        return None


@dataclass(eq=False)
class Relay:
    """Tails the log and publishes it; run :meth:`run_forever` in its own process or thread."""

    event_log: EventLog
    make_producer: Callable[[], Producer]
    positions: RelayPositions
    _: KW_ONLY
    topic_prefix: str = ""
    batch_size: int = 2000
    poll_interval: float = 0.2
    listen_url: str | None = field(default=None, repr=False)  # may carry a password
    channel: str = "agentworks_events"
    flush_timeout: float = 30.0
    state_lost: Callable[[BaseException], bool] = lambda error: False
    topic_id: Callable[[Any, str], str | None] = lambda producer, topic: None
    lease: RelayLease | None = None
    standby_interval: float = 2.0
    broker: str = "kafka"
    """How outages name the brokers published to (``agentworks_dependency_up``)."""
    broker_unreachable: Callable[[BaseException], bool] = lambda error: False
    """Whether a failed batch says the brokers are unreachable (reported to outages once, not
    logged with its traceback at every retry) rather than something else going wrong."""
    max_batch_bytes: int = MAX_BATCH_BYTES
    """Most bytes of stored events one batch holds, beside ``batch_size`` events (one larger
    event goes alone): a batch of large events must not make one huge request or heap."""
    max_message_bytes: int = 1_000_000
    """Largest envelope published whole; a larger one goes without its payload (see
    :data:`~domain.envelope.OMITTED`). Below the 1 MiB a Kafka producer sends and a broker takes
    by default, leaving room for the key and headers."""
    producer: Producer | None = field(init=False, default=None, repr=False)
    position: int = field(init=False)
    marks: BrokerMarks = field(init=False, repr=False)
    _broker_forgot: bool = field(init=False, default=False, repr=False)
    _leading: bool = field(init=False, default=False, repr=False)
    backlog: bool = field(init=False, default=False, repr=False)
    """The last batch stopped at ``batch_size`` or ``max_batch_bytes``: more may be published
    at once."""
    _stop: threading.Event = field(init=False, default_factory=threading.Event, repr=False)
    _wake: threading.Event = field(init=False, default_factory=threading.Event, repr=False)

    def __post_init__(self) -> None:
        self.position, self.marks = self.positions.load_with_marks()

    def publish_once(self) -> int:
        """Publish the next batch and record it; returns how many events it held.

        Any delivery failure discards the producer (an idempotent producer whose broker forgot
        its id never recovers) and rewinds to the last recorded position, so the batch is sent
        again, whole, by a fresh producer.
        """
        batch, self.backlog = self.event_log.read_batch(
            self.position, self.batch_size, max_bytes=self.max_batch_bytes
        )
        if not batch:
            return 0
        producer = self._producer()
        try:
            deliveries = []
            traced = tracing_enabled()
            for envelope in batch:
                if not traced:
                    deliveries.append(self._send(producer, envelope, envelope.traceparent))
                    continue
                # The relay's span continues the command's trace; its own traceparent travels
                # in the Kafka headers so the projector's span hangs below it.
                with continue_trace(
                    "relay publish",
                    envelope.traceparent or None,
                    kind=SpanKind.PRODUCER,
                    attributes={"agentworks.position": envelope.position},
                ):
                    deliveries.append(self._send(producer, envelope, current_traceparent()))
            producer.flush(timeout=self.flush_timeout)
            acknowledged = [delivery.get(timeout=self.flush_timeout) for delivery in deliveries]
            OUTAGES.up(self.broker)
        except Exception as error:
            self._discard_producer()
            self.position = self.positions.load()
            if self.state_lost(error):
                self._broker_forgot = True
            raise
        if self._broker_forgot:
            self.marks.forget()
        topics = {str(m.topic) for m in acknowledged if getattr(m, "topic", None)}
        lost = self.marks.note(
            acknowledged, {topic: self.topic_id(producer, topic) for topic in sorted(topics)}
        )
        if self._broker_forgot:
            lost = lost or ["(the broker no longer knew the producer)"]
            self._broker_forgot = False
        if lost:
            rewind = min(self.positions.lowest_watermark(), batch[-1].position)
            BROKER_LOG_LOST.inc()
            log.error(
                "relay.broker_log_lost",
                partitions=lost,
                position=batch[-1].position,
                republish_from=rewind,
            )
            self.position = rewind
        else:
            self.position = batch[-1].position
        self.positions.save(self.position, self.marks)
        log.debug("relay.published", events=len(batch), position=self.position)
        return len(batch)

    def _send(self, producer: Producer, envelope: EventEnvelope, traceparent: str) -> Delivery:
        return producer.send(
            topic_for(envelope, self.topic_prefix),
            value=self._message(envelope),
            key=str(envelope.workspace_id or envelope.originator_id).encode(),
            headers=headers_for(envelope, traceparent),
        )

    def _message(self, envelope: EventEnvelope) -> bytes:
        """The envelope as a message: whole, or without its payload when it cannot be one.

        An envelope over :attr:`max_message_bytes` is refused by the producer (or the broker)
        every time, and one holding text without a UTF-8 form (a lone surrogate, which a stored
        event's JSON can carry as a ``\\ud800`` escape) cannot be serialised at all: either
        would hold every later event back, for every tenant. The projectors read such an event
        from the store (:func:`streams.worker.read_omitted`)."""
        try:
            value = envelope.to_bytes()
        except ValueError as error:  # (pydantic's serialisation error is a ValueError)
            reason = f"no UTF-8 form: {replace_unstorable(str(error))[:300]}"
        else:
            if len(value) <= self.max_message_bytes:
                return value
            reason = f"{len(value)} bytes, over the {self.max_message_bytes} of a message"
        log.warning(
            "relay.payload_omitted",
            position=envelope.position,
            type=envelope.type,
            reason=reason,
            limit=self.max_message_bytes,
        )
        # The metadata goes along (its workspace, its trace); its text made encodable too.
        metadata = {key: replace_unstorable(text) for key, text in envelope.metadata.items()}
        return envelope.model_copy(
            update={"payload": {}, "metadata": {**metadata, OMITTED: reason}}
        ).to_bytes()

    def _producer(self) -> Producer:
        if self.producer is None:
            self.producer = self.make_producer()
        return self.producer

    def _discard_producer(self) -> None:
        if self.producer is not None:
            try:
                self.producer.close(timeout=1.0)
            except Exception:
                log.warning("relay.producer_close_failed", exc_info=True)
            self.producer = None

    def run_forever(self) -> None:
        wakeup = None
        if self.listen_url:
            wakeup = LogWakeup(self.listen_url, self._wake, channel=self.channel)
            wakeup.start()
        log.info("relay.started", position=self.position)
        while not self._stop.is_set():
            try:
                leading = self._holds_lease()
            except Exception as error:
                if not is_outage(error):
                    raise
                log.debug("relay.database_unavailable", error=str(error))
                self._stop.wait(0.25)
                continue
            if not leading:
                # A lease held by another relay is checked every standby interval; a database
                # that is down, more often, to publish again soon after it is back.
                unreachable = self.lease is not None and self.lease.unreachable
                self._stop.wait(
                    min(self.standby_interval, 0.25) if unreachable else self.standby_interval
                )
                continue
            try:
                while self.publish_once() and self.backlog:
                    if self._stop.is_set() or not self._holds_lease():
                        break
            except Exception as error:
                if is_outage(error):
                    # The database is down: said once by its pool (adapters.outages); try again
                    # soon, from the recorded position, so publishing resumes within a second
                    # of it being back.
                    log.debug("relay.database_unavailable", error=str(error))
                    self.positions.close()
                    self._stop.wait(0.25)
                elif self.broker_unreachable(error):
                    # Said once, as a database outage is; the batch is sent again, whole.
                    OUTAGES.down(self.broker, error)
                    log.debug("relay.broker_unavailable", error=str(error))
                    self._stop.wait(1.0)
                else:
                    log.exception("relay.publish_failed", position=self.position)
                    self._stop.wait(1.0)
                continue
            self._wake.wait(self.poll_interval)
            self._wake.clear()
        if wakeup is not None:
            wakeup.stop()
        self._discard_producer()
        if self.lease is not None:
            self.lease.release()
        self.positions.close()
        log.info("relay.stopped", position=self.position)

    def _holds_lease(self) -> bool:
        """Whether this relay may publish now; takes the lease over when it is free, and then
        resumes from what the previous holder recorded."""
        if self.lease is None:
            return True
        if self.lease.still_held():
            return True
        if self._leading:
            log.warning("relay.lease_lost", position=self.position)
            self._leading = False
            self._discard_producer()
        if not self.lease.acquire():
            return False
        self.position, self.marks = self.positions.load_with_marks()
        self._leading = True
        log.info("relay.active", position=self.position)
        return True

    @property
    def leading(self) -> bool:
        """Whether this relay publishes: it holds the lease (or runs without one)."""
        return self.lease is None or self._leading

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
