"""A Kafka outage, as the relay's operator sees it: said once when the broker goes and once when
it is back (``dependency.down``/``dependency.up``, ``agentworks_dependency_up``), as a database
outage is, not a traceback at every failed batch; publishing resumes on its own."""

from __future__ import annotations

import io
import json
import threading
import time
from typing import TYPE_CHECKING

import pytest
from kafka_helpers import OUTAGE_TEST, close_refused_sockets
from prometheus_client import REGISTRY

from adapters.eventlog import EventLog
from adapters.kafka import broker_dependency, broker_unreachable, create_topics, make_producer
from adapters.kafka_broker import LocalBroker
from commands import models as m
from commands.handlers import Actor
from domain.envelope import TOPICS
from streams.relay import Relay, RelayPositions

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from commands.handlers import AgentWorks

pytestmark = OUTAGE_TEST

PREFIX = "broker-outage-"


@pytest.fixture
def broker() -> Iterator[LocalBroker]:
    with LocalBroker() as started:
        yield started
    # The relay's producer retried the stopped broker: kafka-python leaves those sockets open.
    close_refused_sockets()


def _eventually(condition: Callable[[], bool], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within the timeout"
        time.sleep(0.1)


def _records(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_broker_outage_is_reported_once_each_way_and_publishing_resumes(
    write_side: AgentWorks, database_url: str, broker: LocalBroker, log_lines: io.StringIO
) -> None:
    create_topics(broker.bootstrap, [PREFIX + topic for topic in TOPICS], 1)
    dependency = broker_dependency(broker.bootstrap)
    relay = Relay(
        EventLog(write_side.recorder, write_side.mapper),  # type: ignore[arg-type]
        lambda: make_producer(broker.bootstrap, delivery_timeout_ms=2000, request_timeout_ms=1000),
        RelayPositions(database_url, role=None),
        topic_prefix=PREFIX,
        flush_timeout=3,
        poll_interval=0.05,
        broker=dependency,
        broker_unreachable=broker_unreachable,
    )
    olga = Actor(user_id="olga", workspace_id="*")

    def up() -> float | None:
        return REGISTRY.get_sample_value("agentworks_dependency_up", {"dependency": dependency})

    def head() -> int:
        return max(e.position for e in relay.event_log.read_batch(0, 10_000)[0])

    running = threading.Thread(target=relay.run_forever, name="relay")
    running.start()
    try:
        write_side.create_workspace(m.CreateWorkspace(name="before"), olga)
        _eventually(lambda: relay.position == head())

        broker.stop()
        write_side.create_workspace(m.CreateWorkspace(name="during"), olga)
        _eventually(lambda: up() == 0.0)
        time.sleep(6)  # more failed batches (each fails within ~3 s): still one line

        broker.start()
        _eventually(lambda: up() == 1.0)
        _eventually(lambda: relay.position == head())
    finally:
        relay.stop()
        running.join(30)

    ours = [r for r in _records(log_lines) if r.get("dependency") == dependency]
    assert [r["event"] for r in ours] == ["dependency.down", "dependency.up"]
    assert "KafkaTimeoutError" in str(ours[0]["error"]) or "Kafka" in str(ours[0]["error"])
    assert [r for r in _records(log_lines) if r["event"] == "relay.publish_failed"] == []
