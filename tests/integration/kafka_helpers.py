"""Kafka in integration tests: what a test's relay or producer wrote to a topic, and the marks
of tests that take a broker (or what the relay reads from) away."""

from __future__ import annotations

import gc
import socket
import time
from typing import Any

import pytest
from kafka import KafkaConsumer, TopicPartition

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
