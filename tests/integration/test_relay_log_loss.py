"""The relay notices a broker that lost acknowledged records, against a real broker and Postgres.

The broker (tansu, memory storage) is restarted between two batches: it comes back empty, the
relay's next acknowledgements start again at offset 0, below the offsets it recorded, and the relay
rewinds to the projectors' lowest sweep watermark and publishes everything above it again.

The topics have tansu's own partition count (4), which it gives them again when clients re-create
them after the restart, and enough workspaces write before it that every partition has offsets:
an acknowledgement on a partition the relay never wrote to proves nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from board_helpers import whole_log
from kafka_helpers import OUTAGE_TEST, close_refused_sockets, read_topic

from adapters.eventlog import EventLog
from adapters.kafka import create_topics, make_producer, producer_state_lost, topic_id
from adapters.kafka_broker import LocalBroker
from commands import models as m
from commands.handlers import Actor, AgentWorks
from domain.envelope import TOPICS
from streams.relay import Relay, RelayPositions

pytestmark = OUTAGE_TEST

PREFIX = "loss-"


@pytest.fixture(autouse=True)
def refused_sockets_closed() -> Iterator[None]:
    """kafka-python keeps the socket of a connect() the restarting broker refused, unclosed,
    until the garbage collector finds it, during some later test (which then fails on the
    ResourceWarning)."""
    yield
    close_refused_sockets()


@pytest.fixture
def broker() -> Iterator[LocalBroker]:
    with LocalBroker() as started:
        yield started


def relay_on(
    broker: LocalBroker, app: AgentWorks, database_url: str, *, partitions: int, **options: Any
) -> Relay:
    """A relay publishing ``app``'s log to this module's topics (created with ``partitions``),
    with a producer that gives up on a dead broker in seconds rather than minutes."""
    create_topics(broker.bootstrap, [PREFIX + topic for topic in TOPICS], partitions)
    return Relay(
        EventLog(app.recorder, app.mapper),  # type: ignore[arg-type]
        lambda: make_producer(broker.bootstrap, delivery_timeout_ms=5000, request_timeout_ms=2000),
        RelayPositions(database_url, role=None),
        topic_prefix=PREFIX,
        flush_timeout=10,
        **options,
    )


def workspaces(app: AgentWorks, count: int, name: str) -> None:
    olga = Actor(user_id="olga", workspace_id="*")
    for i in range(count):
        app.create_workspace(m.CreateWorkspace(name=f"{name} {i}"), olga)


def catch_up(relay: Relay, head: int, *, timeout: float = 60.0) -> None:
    """Publish until the relay has recorded ``head``, riding out a producer the restarted
    broker no longer knows (the relay discards it and starts again from what it recorded)."""
    deadline = time.monotonic() + timeout
    while relay.position < head:
        try:
            relay.publish_once()
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def published_positions(bootstrap: str, topic: str) -> list[int]:
    found = read_topic(bootstrap, topic, timeout=5)
    return sorted(int(dict(record.headers)["position"]) for record in found)


def test_acknowledged_offsets_going_back_rewind_the_relay_to_the_lowest_watermark(
    write_side: AgentWorks, database_url: str, broker: LocalBroker
) -> None:
    relay = relay_on(broker, write_side, database_url, partitions=4)
    log, positions = relay.event_log, relay.positions
    try:
        workspaces(write_side, 40, "before")
        first = whole_log(log)
        catch_up(relay, first[-1].position)
        saved, marks = positions.load_with_marks()
        assert saved == first[-1].position
        assert sorted(marks.offsets) == [f"{PREFIX}workspace-events:{p}" for p in range(4)]
        assert sum(marks.offsets.values()) == len(first) - 4

        # Two projectors have swept up to different places; below the lower one, everything
        # is applied everywhere, so that is where publishing must start again.
        watermark = first[1].position
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO projection_positions (projector, position, swept_through)"
                " VALUES ('kanban', %s, %s), ('activity', %s, %s), ('kanban#rebuild', 0, 0)",
                (saved, watermark, saved, first[2].position),
            )

        broker.restart()
        workspaces(write_side, 1, "after")
        head = whole_log(log, saved)[-1].position
        catch_up(relay, head)

        assert relay.position == head
        republished = published_positions(broker.bootstrap, f"{PREFIX}workspace-events")
        # The batch that revealed the loss went out before the rewind: it is there twice. A
        # rebuild's scratch tracking (it reads the log itself) does not pull the rewind lower.
        assert sorted(set(republished)) == [e.position for e in whole_log(log, watermark)]
        # A relay started now resumes with the new broker's offsets, not the lost ones.
        restarted = Relay(log, lambda: make_producer(broker.bootstrap), positions)
        assert restarted.position == head
        assert restarted.marks == positions.load_with_marks()[1]
    finally:
        relay._discard_producer()
        relay.positions.close()


def test_a_re_created_topic_rewinds_the_relay_even_without_offsets_to_compare(
    write_side: AgentWorks, database_url: str, broker: LocalBroker
) -> None:
    relay = relay_on(
        broker,
        write_side,
        database_url,
        partitions=1,
        state_lost=producer_state_lost,
        topic_id=topic_id,
    )
    log = relay.event_log
    try:
        workspaces(write_side, 3, "before")
        first = whole_log(log)
        catch_up(relay, first[-1].position)
        watermark = first[0].position
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO projection_positions (projector, position, swept_through)"
                " VALUES ('kanban', %s, %s)",
                (first[-1].position, watermark),
            )
        assert relay.marks.topic_ids.keys() == {f"{PREFIX}workspace-events"}
        # As if the relay had never written to the partitions the next events land on (the
        # re-created topics have 4): no offsets to compare, only the topic's id.
        relay.marks.offsets.clear()

        broker.restart()
        workspaces(write_side, 1, "after")
        head = whole_log(log, first[-1].position)[-1].position
        catch_up(relay, head)

        republished = published_positions(broker.bootstrap, f"{PREFIX}workspace-events")
        assert sorted({p for p in republished if p > watermark}) == [
            e.position for e in whole_log(log, watermark)
        ]
    finally:
        relay._discard_producer()
        relay.positions.close()
