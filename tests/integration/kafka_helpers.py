"""Kafka in integration tests: what a test's relay or producer wrote to a topic, and the marks
of tests that take a broker (or what the relay reads from) away."""

from __future__ import annotations

import gc
import socket
import time
from typing import TYPE_CHECKING, Any

import pytest
from board_helpers import to_the_head
from kafka import KafkaConsumer, TopicPartition

from adapters.kafka import create_topics, make_producer
from domain.envelope import TOPICS
from streams.relay import Relay, RelayPositions

if TYPE_CHECKING:
    from adapters.eventlog import EventLog

#: kafka-python (3.0.12, kafka/net/inet.py connect) never closes a socket whose connect() was
#: refused; while a broker is down or restarting each retry leaks one, reported at GC time.
IGNORE_REFUSED_SOCKETS = pytest.mark.filterwarnings(
    "ignore:unclosed <socket.socket:ResourceWarning"
)
#: The marks of a slow test during which a broker, or the database, is away for a while.
OUTAGE_TEST = [pytest.mark.slow, IGNORE_REFUSED_SOCKETS]


def close_refused_sockets() -> None:
    """Close the sockets kafka-python left of a connect() a stopped broker refused (see
    :data:`IGNORE_REFUSED_SOCKETS`): TCP, never connected, not listening. Left to the garbage
    collector they are reported during some later test, which then fails on the warning."""
    gc.collect()
    for found in gc.get_objects():
        if not isinstance(found, socket.socket) or found.fileno() < 0:
            continue
        if found.family != socket.AF_INET or found.type != socket.SOCK_STREAM:
            continue
        try:
            found.getpeername()
        except OSError:
            if not found.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                found.close()


def read_topic(
    bootstrap: str, topic: str, expected: int | None = None, timeout: float = 10.0
) -> list[Any]:
    """``topic``'s records from its beginning, read by manual assignment (no consumer group).

    Reading stops once ``expected`` records have come, or after ``timeout`` seconds; with no
    ``expected`` it always takes the whole ``timeout``, for tests that look for what is missing.
    """
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        partitions = [
            TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        records: list[Any] = []
        deadline = time.monotonic() + timeout
        while (expected is None or len(records) < expected) and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


def relay_to_the_head(event_log: EventLog, database_url: str, bootstrap: str, prefix: str) -> int:
    """Publish ``event_log`` with a relay of its own onto topics named with ``prefix`` (created
    here, one partition each) up to the log's head, which it returns."""
    create_topics(bootstrap, [prefix + t for t in TOPICS], 1)
    relay = Relay(
        event_log,
        lambda: make_producer(bootstrap),
        RelayPositions(database_url, role=None),
        topic_prefix=prefix,
        flush_timeout=10,
    )
    try:
        return to_the_head(relay.publish_once, lambda: relay.position, event_log)
    finally:
        relay._discard_producer()
        relay.positions.close()
