"""kafka-python's own records of a broker it cannot reach: one per outage, not one per retry.

The relay says a broker outage once (``dependency.down``); kafka-python also logged each failed
connection attempt at ERROR (with a WARNING or two beside it), every second or so for as long
as the broker was away, burying that one line.
"""

from __future__ import annotations

import io
import json
import time

import pytest
from dedicated_postgres import free_port
from kafka.errors import KafkaTimeoutError
from kafka_helpers import OUTAGE_TEST, close_refused_sockets

from adapters.kafka import make_producer
from adapters.kafka_broker import LocalBroker

pytestmark = OUTAGE_TEST


def _library_records(stream: io.StringIO, start: int = 0) -> list[dict[str, object]]:
    lines = stream.getvalue()[start:].splitlines()
    return [r for r in map(json.loads, lines) if str(r.get("logger", "")).startswith("kafka")]


def test_a_broker_that_is_away_is_said_once_per_outage_by_the_library(
    log_lines: io.StringIO,
) -> None:
    bootstrap = f"127.0.0.1:{free_port()}"
    try:
        producer = make_producer(bootstrap, api_version=(2, 5), max_block_ms=4000)
        with pytest.raises(KafkaTimeoutError):
            producer.send("connection-logs", b"while away")  # retries for 4 s
        producer.close(timeout=1)
        away = _library_records(log_lines)
        assert len(away) == 1, [r["event"] for r in away]

        # Reached again and then lost: another outage, said once again.
        with LocalBroker(port=int(bootstrap.rsplit(":", 1)[1])) as broker:
            producer = make_producer(bootstrap, api_version=(2, 5), max_block_ms=2000)
            producer.send("connection-logs", b"while up").get(timeout=10)
            seen = len(log_lines.getvalue())
            broker.stop()
            time.sleep(4)  # retries: about one a second
            producer.close(timeout=1)
        again = _library_records(log_lines, seen)
        assert len(again) == 1, [r["event"] for r in again]
    finally:
        close_refused_sockets()
