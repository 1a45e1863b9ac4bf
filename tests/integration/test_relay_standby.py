"""Two relays on one event store: one publishes, the other waits on standby and takes over,
from the recorded position, when the first one's session ends. Real Postgres and a real broker;
each relay's producer is a kafka-python producer that also notes the positions it was handed,
so the test can tell which relay published what."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest
from fanout_helpers import (
    KafkaFanout,
    Service,
    cli,
    positions_in_store,
    published_positions,
    relay_position,
)

from adapters.eventlog import EventLog
from adapters.kafka import create_topics, make_producer
from adapters.kafka_broker import LocalBroker
from commands import models as m
from commands.handlers import Actor, AgentWorks
from domain.envelope import TOPICS
from streams.relay import Relay, RelayLease, RelayPositions

if TYPE_CHECKING:
    from pathlib import Path

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


# == the real case: the lease holder's process killed ============================================


@pytest.fixture
def relay_processes(
    database_url: str, kafka_broker: LocalBroker, tmp_path: Path
) -> Iterator[Callable[[str], Service]]:
    """``agentworks relay`` subprocesses on this test's database and topics of their own."""
    env = KafkaFanout(database_url, kafka_broker.bootstrap, tmp_path, topic_prefix=KILL_PREFIX).env
    started: list[Service] = []

    def start(name: str) -> Service:
        started.append(Service(name, cli("relay"), env=env, cwd=tmp_path).start())
        return started[-1]

    yield start
    for service in started:
        service.stop()


KILL_PREFIX = "standby-kill-"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_standby_takes_over_when_the_holders_process_is_killed(
    write_side: AgentWorks,
    database_url: str,
    kafka_broker: LocalBroker,
    relay_processes: Callable[[str], Service],
    record_property: Callable[[str, object], None],
) -> None:
    """SIGKILL of the relay that holds the lease, on this host: its kernel closes the lease's
    socket, so the server ends the session (and frees the advisory lock) at once, and the
    standby takes over at its next look (``standby_interval``, 2 s). The TCP keepalive bound
    (about 11 s) is for a holder whose host vanished without closing the socket; that needs
    packets dropped, which this test cannot do here."""
    first = relay_processes("relay-first")
    wait_until(lambda: "relay.active" in first.log_tail(), "the first relay leads", 60)
    second = relay_processes("relay-second")
    wait_until(lambda: "relay.started" in second.log_tail(), "the second relay starts", 60)
    before = workspaces(write_side, 20)
    wait_until(lambda: relay_position(database_url) >= max(before), "the first publishes", 60)
    time.sleep(1)
    assert "relay.active" not in second.log_tail(), "the standby published while on standby"

    first.kill()
    killed = time.monotonic()
    after = workspaces(write_side, 20)
    wait_until(lambda: relay_position(database_url) >= max(after), "the standby takes over", 60)
    took_over = time.monotonic() - killed
    record_property("relay_takeover_seconds", round(took_over, 3))
    print(f"relay take-over after SIGKILL of the lease holder: {took_over:.2f} s")

    assert "relay.active" in second.log_tail()
    # Nothing lost: every event of the log is on its topic (duplicates allowed).
    stored = positions_in_store(database_url, after=0)
    assert set(before) | set(after) <= stored
    missing = stored - published_positions(kafka_broker.bootstrap, topic_prefix=KILL_PREFIX)
    assert not missing, f"never published: {sorted(missing)[:10]}"
