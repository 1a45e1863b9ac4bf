"""The outage tracker says what is down once, and once when it is back, whatever the traffic."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import psycopg
import structlog
from eventsourcing.persistence import OperationalError
from psycopg_pool import PoolTimeout

from adapters.outages import DEPENDENCY_UP, Outages, is_outage
from domain.errors import Unavailable, ValidationFailed

if TYPE_CHECKING:
    from types import FrameType


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


def test_the_gauge_agrees_with_the_state_when_down_and_up_race() -> None:
    """The gauge was set after the lock that decided down or up was released: an ``up`` that
    ran whole between a ``down``'s decision and its gauge left the gauge saying down while the
    tracker said up (and no later success would say otherwise). The ``down`` is held just
    before it touches the gauge (a trace hook on its thread) while the ``up`` runs."""
    outages = Outages()
    dependency = "test race 127.0.0.1:1"
    at_gauge, go = threading.Event(), threading.Event()

    def hold_at_gauge(frame: FrameType, event: str, arg: object) -> None:
        if event == "call" and frame.f_code.co_name == "labels":
            at_gauge.set()
            go.wait(10)

    threading.settrace(hold_at_gauge)
    try:
        down = threading.Thread(target=outages.down, args=(dependency, "refused"))
        down.start()
    finally:
        threading.settrace(None)  # type: ignore[arg-type]
    with structlog.testing.capture_logs():
        assert at_gauge.wait(10)
        up = threading.Thread(target=outages.up, args=(dependency,))
        up.start()
        up.join(0.5)  # whole on the old code; waits for the lock with the fix
        go.set()
        down.join(10)
        up.join(10)

    assert not outages.is_down(dependency)
    assert DEPENDENCY_UP.labels(dependency)._value.get() == 1
