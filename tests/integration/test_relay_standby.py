"""Two relays on one event store: one publishes, the other waits on standby and takes over,
from the recorded position, when the first one's session ends. Real Postgres and a real broker;
each relay's producer is a kafka-python producer that also notes the positions it was handed,
so the test can tell which relay published what."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from adapters.kafka import create_topics, make_producer
from adapters.kafka_broker import LocalBroker
from commands import models as m
from commands.handlers import Actor, AgentWorks
from streams.envelope import TOPICS
from streams.log import EventLog
from streams.relay import Relay, RelayLease, RelayPositions

PREFIX = "standby-"


@dataclass
class RecordingProducer:
    """A real producer, and the positions each relay handed it."""

    bootstrap: str
    positions: list[int] = field(default_factory=list)
    producer: Any = None

    def __call__(self) -> RecordingProducer:
        self.producer = make_producer(self.bootstrap)
        return self

    def send(self, topic: str, value: Any = None, key: Any = None, headers: Any = None) -> Any:
        self.positions.append(int(dict(headers)["position"]))
        return self.producer.send(topic, value=value, key=key, headers=headers)

    def flush(self, timeout: float | None = None) -> None:
        self.producer.flush(timeout=timeout)

    def close(self, timeout: float | None = None) -> None:
        self.producer.close(timeout=timeout)


@dataclass
class RunningRelay:
    relay: Relay
    producer: RecordingProducer
    thread: threading.Thread


@pytest.fixture
def start_relay(
    write_side: AgentWorks, database_url: str, kafka_broker: LocalBroker
) -> Iterator[Callable[[], RunningRelay]]:
    create_topics(kafka_broker.bootstrap, [PREFIX + topic for topic in TOPICS], 1)
    started: list[RunningRelay] = []

    def start() -> RunningRelay:
        producer = RecordingProducer(kafka_broker.bootstrap)
        relay = Relay(
            EventLog(write_side.recorder, write_side.mapper),  # type: ignore[arg-type]
            producer,
            RelayPositions(database_url, role=None),
            topic_prefix=PREFIX,
            lease=RelayLease(database_url, role=None),
            poll_interval=0.05,
            standby_interval=0.2,
        )
        thread = threading.Thread(target=relay.run_forever, daemon=True)
        thread.start()
        started.append(RunningRelay(relay, producer, thread))
        return started[-1]

    yield start
    for running in started:
        running.relay.stop()
        running.thread.join(10)


def workspaces(app: AgentWorks, count: int) -> list[int]:
    olga = Actor(user_id="olga", workspace_id="*")
    return [
        app.create_workspace(m.CreateWorkspace(name=f"w{i}"), olga).position for i in range(count)
    ]


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)


def test_one_relay_publishes_and_the_standby_takes_over_where_it_stopped(
    write_side: AgentWorks,
    start_relay: Callable[[], RunningRelay],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = start_relay()
    wait_until(lambda: first.relay.lease is not None and first.relay.lease.held, "first leads")
    second = start_relay()
    before = workspaces(write_side, 5)
    wait_until(lambda: max(before) in first.producer.positions, "first publishes")
    time.sleep(0.5)
    assert second.producer.positions == [], "the standby published"

    # The first relay stops publishing but its session lives on (a hung process): the lease
    # stays with it, and the standby keeps waiting.
    lease = first.relay.lease
    assert lease is not None
    assert lease._conn is not None
    monkeypatch.setattr(lease, "release", lambda: None)
    first.relay.stop()
    first.thread.join(10)
    after = workspaces(write_side, 5)
    time.sleep(0.5)
    assert second.producer.positions == [], "the standby published while the lease was held"

    # Its session ends (the process is killed): the lock goes with it, the standby takes over.
    lease._conn.close()
    wait_until(lambda: max(after) in second.producer.positions, "the standby takes over")
    assert set(before) <= set(first.producer.positions)
    assert not set(after) & set(first.producer.positions)
    # It resumed from what the first one recorded, not from the start of the log.
    assert sorted(second.producer.positions) == sorted(after)
