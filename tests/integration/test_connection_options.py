"""Every PostgreSQL connection of its own, made outside a pool, gives up a silent server as the
pools do: libpq's ``tcp_user_timeout`` and keepalives (``adapters.postgres.CONNECTION_OPTIONS``).

The relay's position and lease connections, a rebuild's lock connection and the lag read of
each ``/metrics`` scrape were made with the kernel's defaults: across a network partition each
waited out some fifteen minutes of retransmissions (two hours of keepalive idle for one waiting
on an answer), the relay stalled, a scrape hung. Each path here is run for real against the
test database; every connection it opens is looked at as libpq made it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

from adapters.eventlog import EventLog
from adapters.metrics import LagCollector
from adapters.postgres import CONNECTION_OPTIONS, PROJECTOR_ROLE, make_pool
from projections.kanban import KanbanProjector
from projections.rebuild import rebuild
from streams.relay import RelayLease, RelayPositions

if TYPE_CHECKING:
    from commands.handlers import AgentWorks


def _relay_positions(database_url: str, _: AgentWorks) -> None:
    positions = RelayPositions(database_url, role=None)
    try:
        positions.load()
    finally:
        positions.close()


def _relay_lease(database_url: str, _: AgentWorks) -> None:
    lease = RelayLease(database_url, role=None, relay="options-test")
    try:
        assert lease.acquire()
    finally:
        lease.release()


def _lag_read(database_url: str, _: AgentWorks) -> None:
    [read_up] = [m for m in LagCollector(database_url).collect() if m.name.endswith("read_up")]
    assert [sample.value for sample in read_up.samples] == [1]


def _rebuild_lock(database_url: str, write_side: AgentWorks) -> None:
    log = EventLog(write_side.recorder, write_side.mapper)  # type: ignore[arg-type]
    pool = make_pool(database_url, role=PROJECTOR_ROLE, max_size=4)
    try:
        rebuild(KanbanProjector(), pool, log)
    finally:
        pool.close()


@pytest.mark.parametrize(
    "path",
    [_relay_positions, _relay_lease, _lag_read, _rebuild_lock],
    ids=["relay-positions", "relay-lease", "metrics-lag-read", "rebuild-lock"],
)
def test_a_connection_of_its_own_gives_up_a_silent_server_as_the_pools_do(
    database_url: str,
    write_side: AgentWorks,
    monkeypatch: pytest.MonkeyPatch,
    path: Callable[[str, AgentWorks], None],
) -> None:
    made: list[dict[str, str]] = []
    connect = psycopg.connect

    def recorded(*args: Any, **kwargs: Any) -> psycopg.Connection[Any]:
        connection = connect(*args, **kwargs)
        made.append(connection.info.get_parameters())
        return connection

    monkeypatch.setattr(psycopg, "connect", recorded)
    path(database_url, write_side)

    wanted = {name: str(value) for name, value in CONNECTION_OPTIONS.items()}
    assert made, "the path opened no connection of its own"
    for parameters in made:
        assert {name: parameters.get(name) for name in wanted} == wanted, parameters
