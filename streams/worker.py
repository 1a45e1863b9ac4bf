"""Projector workers: Kafka → read models, one faust app (one consumer group) per projector.

Each worker consumes the topics carrying its projector's aggregates, takes messages in batches,
orders each batch by global position and hands it to the same :class:`ProjectionRunner` the
embedded path uses. Offsets are committed after a batch is processed, so a worker killed
mid-batch sees that batch again and the runner skips what was already applied. An event the
projector cannot apply does not hold the batch (nor the partition) back: the runner parks its
aggregate and applies the rest (see :mod:`projections.runner`); only a failure that is not the
events' fault (the database away) leaves the batch to be retried.

A timer sweeps the log behind the projector (:mod:`projections.sweep`) for events that were
published an interval ago and never delivered: a dropped message, or a broker that lost its log.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

import structlog

from adapters.eventlog import MAX_BATCH_BYTES, byte_bounded
from adapters.kafka import faust_settings
from adapters.metrics import OMITTED_EVENTS_MISSING
from adapters.outages import is_outage
from domain.envelope import OMITTED, TOPIC_BY_AGGREGATE, UNDECODABLE, EventEnvelope
from projections.base import unread_by
from projections.sweep import ProjectionSweep
from streams.relay import envelope_of_headers

if TYPE_CHECKING:
    from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence

    from faust.streams import Stream
    from faust.types import TP, AppT, StreamT

    from adapters.eventlog import EventLog
    from projections.base import Projector
    from projections.runner import BatchOutcome, ProjectionRunner
    from streams.faust_app import ProjectorApp

log = structlog.get_logger(__name__)

BATCH_SIZE = 500
BATCH_WITHIN_SECONDS = 0.05
RETRY_SECONDS = 1.0
OUTAGE_RETRY_SECONDS = 0.25
"""While the database is down a batch is retried this often, so it is applied (and the
projector's lag is back to 0) within a second of the database being back."""


def projector_topics(projector: Projector, prefix: str = "") -> list[str]:
    return sorted({prefix + TOPIC_BY_AGGREGATE[name] for name in projector.aggregates})


def consumer_group(projector_name: str, prefix: str = "") -> str:
    """One group per projector and deployment (the topic prefix tells deployments apart)."""
    return f"{prefix}agentworks-projector-{projector_name}"


def decode_batch(
    values: Sequence[bytes],
    *,
    headers: Sequence[Mapping[str, bytes]] = (),
    unread: Collection[str] = frozenset(),
) -> list[EventEnvelope]:
    """Envelopes of one delivered batch in global order (per-aggregate order follows).

    A message whose ``headers`` (one mapping a message, when given) name a type in ``unread``
    (whose payload the projector ignores, a run's log chunks for the board) is not decoded:
    its headers say all it needs (:func:`~streams.relay.envelope_of_headers`).

    A message that is not an envelope (another producer's, or garbled) is logged and left out:
    raised, it crashed the worker's agent, which then consumed nothing more, for any tenant.
    Any event it may have carried is still in the store, where the sweep finds it."""
    envelopes = []
    for index, value in enumerate(values):
        told = headers[index] if unread and headers else None
        if told is not None and _header_text(told, "type") in unread:
            described = envelope_of_headers(told)
            if described is not None:
                envelopes.append(described)
                continue
        try:
            envelopes.append(EventEnvelope.from_bytes(value))
        except (ValueError, TypeError) as error:  # (pydantic's ValidationError is a ValueError)
            log.error(  # noqa: TRY400 - the message and the error are what matter, not a traceback
                "worker.undecodable_message",
                error=str(error)[:500],
                message=repr(value)[:200],
            )
    envelopes.sort(key=lambda e: e.position)
    return envelopes


def _header_text(headers: Mapping[str, bytes], name: str) -> str:
    value = headers.get(name)
    return value.decode(errors="replace") if isinstance(value, bytes) else ""


#: A delivered message holding an envelope published without its payload (its text; a payload
#: mentioning it only makes that message a part alone).
_OMITTED_MARK = OMITTED.encode()


def delivered_parts(values: Sequence[bytes]) -> Iterator[Sequence[bytes]]:
    """A delivered batch in parts of at most :data:`~adapters.eventlog.MAX_BATCH_BYTES` of
    messages, each part applied in a transaction of its own (as a smaller batch would be).
    A message published without its payload counts as the whole bound: read from the store,
    its event may be any size, so it goes alone."""

    def size(value: bytes) -> int:
        return MAX_BATCH_BYTES if _OMITTED_MARK in value else len(value)

    return byte_bounded(values, size, MAX_BATCH_BYTES)


def read_omitted(
    envelopes: list[EventEnvelope], event_log: EventLog, *, projector: str
) -> list[EventEnvelope]:
    """``envelopes`` with those the relay published without their payload (too large for a
    message, see :data:`~domain.envelope.OMITTED`) read whole from the store.

    One the store does not hold (its topics outlived a database restored to an earlier point)
    is marked :data:`~domain.envelope.UNDECODABLE`, saying so: as it came, with an empty
    payload, the projector took it for an event it could apply (or failed on it as such, with
    an error that named a missing field); marked, its aggregate is parked with the reason."""
    omitted = [env for env in envelopes if OMITTED in env.metadata]
    if not omitted:
        return envelopes
    stored = {
        (env.originator_id, env.originator_version): env
        for env in event_log.within(
            [(e.originator_id, e.originator_version - 1, e.originator_version + 1) for e in omitted]
        )
    }
    whole = []
    for env in envelopes:
        if OMITTED in env.metadata:
            found = stored.get((env.originator_id, env.originator_version))
            env = _not_stored(env, projector) if found is None else found
        whole.append(env)
    return whole


def _not_stored(envelope: EventEnvelope, projector: str) -> EventEnvelope:
    """An envelope published without its payload, of an event the store does not hold."""
    OMITTED_EVENTS_MISSING.labels(projector=projector).inc()
    log.error(
        "worker.omitted_event_missing",
        projector=projector,
        position=envelope.position,
        originator_id=str(envelope.originator_id),
        originator_version=envelope.originator_version,
        type=envelope.type,
        omitted=envelope.metadata[OMITTED],
    )
    reason = (
        f"published without its payload ({envelope.metadata[OMITTED]}) and not in the store:"
        f" no version {envelope.originator_version} of aggregate {envelope.originator_id}"
        " (its topics outlived the database?)"
    )
    return envelope.model_copy(update={"metadata": {**envelope.metadata, UNDECODABLE: reason}})


MOST_DEFERRED_TICKS = 6
"""Ticks in a row a busy worker may put its sweep off (a minute, at the default interval)."""

CHECK_INTERVAL = 5.0
"""Seconds between a worker's checks of its position when its sweeps are off (see
:meth:`SweepSchedule.check`)."""


class SweepSchedule:
    """Sweeps up to what the relay had published at the previous tick: by then a delivery
    had a whole interval to arrive, so what is still missing was lost, not late.

    Unless the worker is catching up: while deliveries keep coming and have not yet reached
    that position, what is missing is most likely still on its way through Kafka, and a sweep
    would only race the deliveries for the same events. It waits for a quiet interval (nothing
    more is coming) or for the deliveries to pass the position, but not for more than
    :data:`MOST_DEFERRED_TICKS` ticks in a row: a backlog that never shrinks would otherwise
    leave a lost event missing for as long as it lasts.
    """

    def __init__(self, runner: ProjectionRunner) -> None:
        self.sweep = ProjectionSweep(runner)
        self.runner = runner
        self.published_before = 0
        self.delivered = False
        """Set by the worker whenever it applies a delivered batch."""
        self.deferred = 0

    def published(self) -> int:
        with self.runner.pool.connection() as conn:
            row = conn.execute("SELECT coalesce(min(position), 0) AS p FROM relay_positions")
            found = row.fetchone()
        return int(found["p"]) if found else 0

    def tick(self) -> int:
        """One sweep, if it is time for one; returns how many events it applied."""
        through, self.published_before = self.published_before, self.published()
        busy, self.delivered = self.delivered, False
        if through <= 0:
            return 0
        if busy and self.deferred < MOST_DEFERRED_TICKS and self.runner.position() < through:
            self.deferred += 1
            log.debug("worker.sweep_deferred", projector=self.runner.name, through=through)
            return 0
        self.deferred = 0
        return self.sweep.sweep(through).healed

    def check(self) -> int:
        """What a worker does instead when its sweeps are off: the log checked up to what the
        relay has published, nothing applied from the store; returns the watermark, and the
        position with it, which go up to the first event not applied yet (a delivery on its way,
        or lost: then it waits for ``agentworks sweep``, or the aggregate's next event).

        A worker is delivered its own topics only: without this its position was the last event
        of those, behind every event of others after it (the billing worker behind every card
        move after the last charge), and lag, ``agentworks status`` and ``/readyz`` showed a
        stall with everything applied."""
        return self.sweep.sweep(self.published(), heal=False).swept_through


def forget_read_offsets_of(consumer: object, partitions: Iterable[TP]) -> None:
    """Let faust deliver every offset of ``partitions`` again, from wherever the consumer reads.

    faust drops a message whose offset is below the last one it read from that partition (and
    keeps that mark when a rebalance gives the partition back to the same member). After the
    broker lost its log the partition restarts at offset 0, so everything republished there
    would be dropped until it passed the old mark. The runner ignores real duplicates itself.
    Raises :class:`~streams.faust_app.FaustInternalsChanged` if faust keeps no such marks.
    """
    from streams.faust_app import read_offsets_of

    read_offsets = read_offsets_of(consumer)
    for partition in partitions:
        read_offsets.pop(partition, None)


class PartitionHolding:
    """Whether a worker, alone in its consumer group, consumes every partition of its topics.

    Until it does, an event published now may wait for a rebalance (against tansu a group join
    alone takes half the session timeout) before it reaches the read model, so a read-your-writes
    wait times out. Updated on the worker's event loop by faust's rebalance signal; read from any
    thread (``agentworks dev`` answers ``/readyz`` from it).
    """

    def __init__(self, app: AppT, topics: list[str]) -> None:
        self._app = app
        self._topics = topics
        self._missing: tuple[str, ...] | None = None

    def assigned(self, partitions: Iterable[TP]) -> None:
        held = {(tp.topic, tp.partition) for tp in partitions}
        missing: list[str] = []
        for topic in self._topics:
            count = self._app.consumer.topic_partitions(topic)
            if not count:
                missing.append(f"{topic} (partitions unknown)")
                continue
            missing.extend(f"{topic}:{p}" for p in range(count) if (topic, p) not in held)
        self._missing = tuple(missing)

    @property
    def status(self) -> str:
        """``"ok"``, or why this worker would not deliver an event published now."""
        missing = self._missing
        if missing is None:
            return "joining its consumer group"
        if self._app.rebalancing:
            return "rebalancing"
        if missing:
            return "does not hold " + ", ".join(missing)
        return "ok"


def build_worker_app(
    runner: ProjectionRunner,
    bootstrap: str,
    *,
    topic_prefix: str = "",
    session_timeout: float = 6.0,
    sweep_interval: float = 10.0,
    fetch_wait_ms: int = 100,
) -> ProjectorApp:
    """The faust app (and consumer group) of one projector."""
    from streams.faust_app import ProjectorApp

    app = ProjectorApp(
        consumer_group(runner.projector.name, topic_prefix),
        fetch_max_wait_ms=fetch_wait_ms,
        **faust_settings(bootstrap, session_timeout=session_timeout),
    )
    topics = app.topic(
        *projector_topics(runner.projector, topic_prefix),
        key_serializer="raw",
        value_serializer="raw",
    )

    schedule = SweepSchedule(runner)
    holding = PartitionHolding(app, projector_topics(runner.projector, topic_prefix))
    app.holding = holding

    def process(envelopes: list[EventEnvelope]) -> BatchOutcome:
        return runner.process(read_omitted(envelopes, runner.log, projector=runner.name))

    unread = unread_by([runner.projector])

    @app.agent(topics, name=f"project-{runner.projector.name}")
    async def project(stream: StreamT[bytes]) -> None:
        # (faust's StreamT stub does not name take_events; its Stream has it.)
        batches = cast("Stream[bytes]", stream).take_events(BATCH_SIZE, BATCH_WITHIN_SECONDS)
        async for events in batches:
            values = [event.value for event in events]
            headers = [event.headers for event in events]
            start = 0
            for part in delivered_parts(values):
                told = headers[start : start + len(part)]
                start += len(part)
                await apply_part(decode_batch(part, headers=told, unread=unread))

    async def apply_part(envelopes: list[EventEnvelope]) -> None:
        """Apply one part of a delivered batch, retrying until it is applied."""
        while True:
            try:
                outcome = await asyncio.to_thread(process, envelopes)
            except Exception as error:
                # The batch stays unacknowledged until it is applied: never skip events.
                if is_outage(error):
                    # Said once by the pool that saw the database go (adapters.outages).
                    log.debug("worker.database_unavailable", projector=runner.name)
                    await asyncio.sleep(OUTAGE_RETRY_SECONDS)
                    continue
                log.exception("worker.batch_failed", projector=runner.name)
                await asyncio.sleep(RETRY_SECONDS)
                continue
            schedule.delivered = True
            log.debug(
                "worker.batch",
                projector=runner.name,
                applied=outcome.applied,
                duplicates=outcome.duplicates,
                healed=outcome.healed,
                position=outcome.position,
            )
            break

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]  # faust's stub rejects it
    async def forget_read_offsets(
        app: AppT, *assigned: set[TP], signal: object = None, **_: object
    ) -> None:
        for partitions in assigned:
            # Which worker holds which partitions, after every rebalance: what an operator
            # scaling a projector out (or back in) needs to see.
            log.info(
                "worker.partitions_assigned",
                projector=runner.name,
                partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in partitions),
            )
            forget_read_offsets_of(app.consumer, partitions)
            holding.assigned(partitions)

    sweeps = sweep_interval > 0
    tick = schedule.tick if sweeps else schedule.check

    @app.timer(  # type: ignore[untyped-decorator]
        interval=sweep_interval if sweeps else CHECK_INTERVAL,
        name=f"sweep-{runner.projector.name}",
    )
    async def sweep() -> None:
        try:
            await asyncio.to_thread(tick)
        except Exception as error:
            if is_outage(error):
                log.debug("worker.sweep_skipped", projector=runner.name, error=str(error))
                return
            log.exception("worker.sweep_failed", projector=runner.name)

    return app


def run_worker(
    runner: ProjectionRunner,
    bootstrap: str,
    *,
    topic_prefix: str = "",
    loglevel: str = "info",
    sweep_interval: float = 10.0,
    fetch_wait_ms: int = 100,
) -> None:
    """Run one projector's worker until SIGTERM/SIGINT (faust leaves the group cleanly)."""
    import faust

    app = build_worker_app(
        runner,
        bootstrap,
        topic_prefix=topic_prefix,
        sweep_interval=sweep_interval,
        fetch_wait_ms=fetch_wait_ms,
    )
    group = consumer_group(runner.name, topic_prefix)
    log.info("worker.starting", projector=runner.name, group=group)
    # Our logging stays in place (JSON lines when configured): faust's own setup would replace
    # the root handler and print our structured events as Python dicts. Nothing else may write
    # to the console either: no banner, and no terminal spinner's escape codes between the lines.
    worker = faust.Worker(app, loglevel=loglevel.lower(), override_logging=False, quiet=True)
    worker.spinner = None
    worker.execute_from_commandline()
