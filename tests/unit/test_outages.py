"""The outage tracker says what is down once, and once when it is back, whatever the traffic."""

from __future__ import annotations

import psycopg
import structlog
from eventsourcing.persistence import OperationalError
from psycopg_pool import PoolTimeout

from adapters.outages import Outages, is_outage
from domain.errors import Unavailable, ValidationFailed


def test_a_thousand_failures_log_one_down_and_one_up() -> None:
    outages = Outages()
    with structlog.testing.capture_logs() as logs:
        for _ in range(1000):
            outages.down("postgresql db:5432/x", psycopg.OperationalError("connection refused"))
        assert outages.is_down("postgresql db:5432/x")
        for _ in range(1000):
            outages.up("postgresql db:5432/x")

    assert [entry["event"] for entry in logs] == ["dependency.down", "dependency.up"]
    assert logs[0]["error"] == "OperationalError: connection refused"
    assert logs[1]["down_seconds"] >= 0
    assert not outages.is_down("postgresql db:5432/x")


def test_dependencies_are_tracked_apart() -> None:
    outages = Outages()
    with structlog.testing.capture_logs() as logs:
        outages.down("redis", "gone")
        outages.up("postgresql db:5432/x")  # was never down: nothing to say

    assert [entry["event"] for entry in logs] == ["dependency.down"]
    assert outages.down_now() == ["redis"]


def test_unreachable_databases_are_outages_and_errors_it_answered_are_not() -> None:
    assert is_outage(psycopg.OperationalError("connection refused"))
    assert is_outage(PoolTimeout("no connection within 2 s"))
    assert is_outage(psycopg.errors.AdminShutdown("terminating connection"))
    assert is_outage(Unavailable("down"))
    translated = OperationalError("pool timeout")
    translated.__cause__ = PoolTimeout("no connection within 2 s")
    assert is_outage(translated)

    assert not is_outage(ValidationFailed("bad input"))
    assert not is_outage(psycopg.errors.UniqueViolation("dup"))
    assert not is_outage(psycopg.errors.DiskFull("no space left"))
    full = OperationalError("disk full")
    full.__cause__ = psycopg.errors.DiskFull("no space left")
    assert not is_outage(full)
