"""Kafka test fixtures: a throwaway, memory-only tansu broker (see ``adapters/kafka_broker.py``).

* ``kafka_broker`` (session): a running :class:`LocalBroker`; ``kafka_broker.bootstrap`` is
  ``"127.0.0.1:<port>"``. Shared by every test that asks for it, so tests must use their own
  topic and consumer-group names (:func:`unique_name`) and must not restart it; a test that
  restarts a broker starts its own ``LocalBroker``.

Use it from a test module (``tests/`` is on ``sys.path`` through the root conftest, like ``pg``)::

    pytest_plugins = ["kafka_fixtures"]

(or put that line in ``tests/conftest.py`` once for every test). Do not also import names from
this module in a test module: pytest must import it first as a plugin, otherwise it warns that
it cannot rewrite its asserts, which ``filterwarnings = error`` turns into a collection error;
and ``from kafka_fixtures import kafka_broker`` would trip ruff F811 in every test using it.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import pytest

from adapters.kafka_broker import LocalBroker

if TYPE_CHECKING:
    from collections.abc import Iterator


def unique_name(prefix: str) -> str:
    """``prefix`` plus a random suffix: a topic or group name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[LocalBroker]:
    """A memory-only Kafka-protocol broker on a free loopback port, stopped at session end."""
    with LocalBroker() as broker:
        yield broker
