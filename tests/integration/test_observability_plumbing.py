"""Observability plumbing against the real PostgreSQL and a Kafka-protocol broker.

* The relay's span continues the trace stored in an event's metadata, and the Kafka record's
  ``traceparent`` header names the relay's span: a worker's projector span hangs below it.
* :class:`~adapters.metrics.LagCollector` reports the log head and how far the relay and every
  projector are behind it, read from the database at scrape time.
* Log lines (ours and the standard library's) carry the active span's ids and the fields bound
  with ``structlog.contextvars``, as JSON.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Sequence

import pg
import structlog
from board_helpers import whole_log
from kafka_helpers import read_topic
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from adapters.eventlog import EventLog
from adapters.kafka import create_topics, make_producer
from adapters.kafka_broker import LocalBroker
from adapters.metrics import LagCollector
from adapters.postgres import PROJECTOR_ROLE, make_pool
from adapters.telemetry import continue_trace, current_traceparent
from commands import models as m
from commands.handlers import Actor, AgentWorks
from domain.envelope import TOPICS
from projections.registry import all_projectors, projector_names
from projections.runner import ProjectionRunner
from streams.embedded import EmbeddedFanout
from streams.relay import Relay, RelayPositions, topic_for


def ids(span: ReadableSpan) -> tuple[str, str]:
    assert span.context is not None
    return format(span.context.trace_id, "032x"), format(span.context.span_id, "016x")


def parent_id(span: ReadableSpan) -> str | None:
    return None if span.parent is None else format(span.parent.span_id, "016x")


def parent_of(traceparent: str) -> tuple[str, str]:
    """Trace id and parent span id of a W3C ``traceparent`` (its flags aside)."""
    version, trace_id, span_id, _flags = traceparent.split("-")
    assert version == "00"
    return trace_id, span_id


# -- the trace through the relay and Kafka -------------------------------------------------------


def test_relay_span_and_kafka_headers_carry_the_commands_trace(
    write_side: AgentWorks,
    database_url: str,
    kafka_broker: LocalBroker,
    exporter: InMemorySpanExporter,
) -> None:
    with continue_trace("caller", None, kind=SpanKind.SERVER) as caller:
        actor = Actor(user_id="olga", workspace_id="*", traceparent=current_traceparent())
        write_side.create_workspace(m.CreateWorkspace(name="Traced"), actor)
    caller_trace, caller_span = ids(caller)  # type: ignore[arg-type]

    prefix = f"obs-{time.monotonic_ns()}-"
    create_topics(kafka_broker.bootstrap, [prefix + topic for topic in TOPICS], 1)
    log = EventLog(write_side.recorder, write_side.mapper)  # type: ignore[arg-type]
    producer = make_producer(kafka_broker.bootstrap)
    positions = RelayPositions(database_url, role=None, relay=f"{prefix}relay")
    relay = Relay(log, lambda: producer, positions, topic_prefix=prefix)
    try:
        # The log is read up to the horizon of transactions still open anywhere on the server
        # (parallel test sessions included): the event may take a moment to become readable.
        deadline = time.monotonic() + 20
        while (sent := relay.publish_once()) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sent == 1
    finally:
        producer.close(timeout=5)
        positions.close()
    (envelope,) = whole_log(log)

    finished = exporter.get_finished_spans()
    (command,) = [s for s in finished if s.name == "command CreateWorkspace"]
    (published,) = [s for s in finished if s.name == "relay publish"]
    assert parent_id(command) == caller_span
    assert parent_id(published) == ids(command)[1]
    assert published.kind is SpanKind.PRODUCER
    assert {ids(command)[0], ids(published)[0]} == {caller_trace}
    assert parent_of(envelope.traceparent) == ids(command)

    (record,) = read_topic(kafka_broker.bootstrap, topic_for(envelope, prefix), 1)
    headers = {key: value.decode() for key, value in record.headers}
    assert parent_of(headers["traceparent"]) == ids(published)


# -- lag -----------------------------------------------------------------------------------------


def lag_samples(
    database_url: str, projectors: Sequence[str] = (), relays: Sequence[str] = ()
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LagCollector(database_url, projectors=projectors, relays=relays))
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_lag_collector_reports_head_relay_and_projector_lag(
    write_side: AgentWorks, database_url: str
) -> None:
    owner = Actor(user_id="lena", workspace_id="*")
    created = write_side.create_workspace(m.CreateWorkspace(name="Lagging"), owner)
    member = Actor(user_id="lena", workspace_id=str(created.id))
    project = write_side.create_project(
        m.CreateProject(workspace_id=created.id, name="P", lanes=[m.LaneInput(name="Todo")]),
        member,
    )
    pool = make_pool(database_url, role=PROJECTOR_ROLE, max_size=2)
    log = EventLog(write_side.recorder, write_side.mapper)  # type: ignore[arg-type]
    fanout = EmbeddedFanout(log, [ProjectionRunner(p, pool, log) for p in all_projectors()])
    try:
        head = pg.log_head(database_url)
        caught_up = projected_up_to(fanout, database_url, head)
        relay = RelayPositions(database_url, role=None, relay="lagging-relay")
        relay.save(head - 1)
        relay.close()
        with_relay = lag_samples(database_url)
        for title in ("a", "b", "c"):
            write_side.create_card(m.CreateCard(project_id=project.id, title=title), member)
        behind = lag_samples(database_url)
    finally:
        pool.close()

    assert caught_up[HEAD] == head
    assert with_relay[HEAD] == head
    assert with_relay[("agentworks_relay_lag_events", (("relay", "lagging-relay"),))] == 1
    for name in projector_names():
        assert with_relay[projector_lag(name)] == 0
        # The embedded fan-out reads the log in order: its watermark keeps up too.
        assert with_relay[("agentworks_projector_unswept_events", (("projector", name),))] == 0
    new_head = pg.log_head(database_url)
    assert new_head >= head + 3
    assert behind[HEAD] == new_head
    relay_lag = behind[("agentworks_relay_lag_events", (("relay", "lagging-relay"),))]
    assert relay_lag == new_head - head + 1
    for name in projector_names():
        assert behind[projector_lag(name)] == new_head - head
        unswept = ("agentworks_projector_unswept_events", (("projector", name),))
        assert behind[unswept] == new_head - head


HEAD = ("agentworks_log_head_position", ())
READ_UP = ("agentworks_lag_read_up", ())


def projector_lag(name: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return ("agentworks_projector_lag_events", (("projector", name),))


def projected_up_to(
    fanout: EmbeddedFanout, database_url: str, head: int, timeout: float = 20.0
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Run the projectors until the collector shows none of them behind ``head``."""
    deadline = time.monotonic() + timeout
    while True:
        fanout.drain()
        samples = lag_samples(database_url)
        lags = [samples.get(projector_lag(name)) for name in projector_names()]
        if lags == [0] * len(lags) or time.monotonic() > deadline:
            assert lags == [0] * len(lags), lags
            return samples
        time.sleep(0.05)


def test_a_projector_that_never_ran_is_reported_as_far_behind_as_the_log(
    write_side: AgentWorks, database_url: str
) -> None:
    """A projector whose worker was never deployed (or never got its first batch) has no row
    of positions: /readyz counted it at position 0, while the lag metrics left it out, so an
    alert on its lag could never fire however far the log ran ahead of it. The same held for a
    relay that never ran, where the deployment has one (Kafka)."""
    owner = Actor(user_id="nina", workspace_id="*")
    write_side.create_workspace(m.CreateWorkspace(name="Nobody projects this"), owner)
    head = pg.log_head(database_url)

    samples = lag_samples(database_url, projectors=projector_names(), relays=["relay"])

    assert samples[HEAD] == head
    # So with a relay that never ran: it too is as far behind as the log.
    assert samples[("agentworks_relay_lag_events", (("relay", "relay"),))] == head
    for name in projector_names():
        assert samples[projector_lag(name)] == head
        assert samples[("agentworks_projector_unswept_events", (("projector", name),))] == head
        assert samples[("agentworks_projector_parked_aggregates", (("projector", name),))] == 0


def test_lag_collector_says_it_could_not_read_when_the_database_is_unreachable(
    database_url: str,
) -> None:
    """Without the database there are no lag figures to give; their series vanished with no
    sign of why, so a lag alert resolved during the outage instead of firing. The collector
    says whether it read them (``agentworks_lag_read_up``), which an alert can watch."""
    assert lag_samples("postgresql://postgres@127.0.0.1:1/nowhere") == {READ_UP: 0.0}
    assert lag_samples(database_url)[READ_UP] == 1.0


# -- logs ----------------------------------------------------------------------------------------


def test_log_lines_carry_the_active_spans_ids_and_bound_request_ids(
    log_lines: io.StringIO, exporter: InMemorySpanExporter
) -> None:
    with (
        structlog.contextvars.bound_contextvars(request_id="req-7", correlation_id="req-7"),
        continue_trace("handling", None) as span,
    ):
        structlog.get_logger("agentworks.test").info("ours", answer=42)
        logging.getLogger("some.library").warning("theirs %s", "too")
    structlog.get_logger("agentworks.test").info("afterwards")

    trace_id, span_id = ids(span)  # type: ignore[arg-type]
    ours, theirs, afterwards = [json.loads(line) for line in log_lines.getvalue().splitlines()]
    for line in (ours, theirs):
        assert line["trace_id"] == trace_id
        assert line["span_id"] == span_id
        assert line["request_id"] == "req-7"
        assert line["correlation_id"] == "req-7"
    assert ours["event"] == "ours"
    assert ours["answer"] == 42
    assert theirs["event"] == "theirs too"
    assert theirs["logger"] == "some.library"
    assert "trace_id" not in afterwards
    assert "request_id" not in afterwards
