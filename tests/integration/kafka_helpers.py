"""Reading what a test's relay or producer wrote to a topic of the Kafka-protocol broker."""

from __future__ import annotations

import time
from typing import Any

from kafka import KafkaConsumer, TopicPartition


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
