"""The filter that cuts kafka-python's records of an away broker to one per outage."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import kafka
import pytest

from adapters.kafka_logs import _AWAY, _CONNECTED, BrokerRetries


def _record(logger: str, message: str, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord(logger, level, __file__, 1, message, None, None)


def test_every_message_it_judges_is_still_one_the_library_logs() -> None:
    """A message kafka-python rewords would pass the filter again, one record per retry."""
    strings = {
        node.value
        for path in Path(kafka.__file__).parent.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }
    missing = sorted(_AWAY - strings)
    assert missing == []


@pytest.mark.parametrize(
    "lost",
    [
        ["%s: socket disconnected", "%s: Error receiving network data closing socket"],
        ["%s: Error sending request data: %s", "Connection failed: %s"],
        ["%s: Connection lost: %s", "No node available for metadata refresh - backoff/retry"],
    ],
)
def test_one_record_per_outage_whatever_the_library_says_of_it(lost: list[str]) -> None:
    retries = BrokerRetries()
    first = [retries.filter(_record("kafka.net.transport", m)) for m in lost * 3]
    assert first == [True] + [False] * (len(lost) * 3 - 1)

    assert not retries.filter(_record("kafka.net.connection", _CONNECTED, logging.INFO))
    assert [retries.filter(_record("kafka.net.transport", m)) for m in lost] == [True, False]


def test_other_records_of_the_library_pass() -> None:
    retries = BrokerRetries()
    retries.filter(_record("kafka.net.transport", "%s: socket disconnected"))
    assert retries.filter(_record("kafka.producer", "Unknown topic %s", logging.WARNING))
