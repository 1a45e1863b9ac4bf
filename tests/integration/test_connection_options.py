"""Every PostgreSQL connection of its own, made outside a pool, gives up a silent server as the
pools do: libpq's ``tcp_user_timeout`` and keepalives (``adapters.postgres.CONNECTION_OPTIONS``).

The relay's position and lease connections, a rebuild's lock connection and the lag read of
each ``/metrics`` scrape were made with the kernel's defaults: across a network partition each
waited out some fifteen minutes of retransmissions (two hours of keepalive idle for one waiting
on an answer), the relay stalled, a scrape hung; so did the operator's commands (``migrate``,
``status``, ``parked list``, ``audit export``, ``replay``, ``invoice``'s lock). Each path here is
run for real against the test database; every connection it opens is looked at as libpq made
it."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from board_helpers import add_cards

from adapters.eventlog import EventLog
from adapters.metrics import LagCollector
from adapters.postgres import CONNECTION_OPTIONS, PROJECTOR_ROLE, make_pool
from infra import cli, cli_common
from projections.kanban import KanbanProjector
from projections.rebuild import rebuild
from streams.relay import RelayLease, RelayPositions

if TYPE_CHECKING:
    from pathlib import Path

    from board_helpers import Board

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
    opened: list[dict[str, str]],
    path: Callable[[str, AgentWorks], None],
) -> None:
    path(database_url, write_side)

    assert_made_as_the_pools_make_them(opened)


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, str]]:
    """The libpq parameters of every connection opened from now on outside a pool."""
    made: list[dict[str, str]] = []
    connect = psycopg.connect

    def recorded(*args: Any, **kwargs: Any) -> psycopg.Connection[Any]:
        connection = connect(*args, **kwargs)
        made.append(connection.info.get_parameters())
        return connection

    monkeypatch.setattr(psycopg, "connect", recorded)
    return made


def assert_made_as_the_pools_make_them(made: list[dict[str, str]], **own: int) -> None:
    """Each of ``made`` carries :data:`CONNECTION_OPTIONS`, but the ones its path sets itself
    (``own``)."""
    wanted = {name: str(value) for name, value in {**CONNECTION_OPTIONS, **own}.items()}
    assert made, "the path opened no connection of its own"
    for parameters in made:
        assert {name: parameters.get(name) for name in wanted} == wanted, parameters


# The operator's commands, run in this process; a long audit export over a network that drops
# the server silently hung for good (migrate keeps its own, longer, connect_timeout).
_COMMANDS: list[tuple[list[str], int, dict[str, int]]] = [
    (["migrate", "--no-rebuild"], 0, {"connect_timeout": 10}),
    (["status"], 0, {}),
    (["parked", "list"], 0, {}),
    (["audit", "export", "--workspace", "{workspace}"], 0, {}),
    (["replay", "card", "{card}"], 0, {}),
    (["replay", "board", "{project}", "--as-of", "{now}"], 0, {}),
    # Nothing to bill in that month: Stripe (a key is needed) is never asked.
    (["invoice", "--month", "2020-01"], 0, {}),
]


@pytest.mark.parametrize(
    ("command", "exit_code", "own"), _COMMANDS, ids=[" ".join(c[0][:2]) for c in _COMMANDS]
)
def test_the_operators_commands_give_up_a_silent_server_as_the_pools_do(
    database_url: str,
    write_side: AgentWorks,
    board: Board,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    opened: list[dict[str, str]],
    command: list[str],
    exit_code: int,
    own: dict[str, int],
) -> None:
    [card] = add_cards(write_side, board, 1)
    # The test run's logging stays as it is: configured by a command, its loggers (cached on
    # first use) would keep the command's for every later test of this process.
    monkeypatch.setattr(cli_common, "configure_logging", lambda **_: None)
    for name, value in {
        "DATABASE_URL": database_url,
        "DATA_DIR": str(tmp_path),
        "STRIPE_API_KEY": "sk_test_unreachable",
        "STRIPE_API_BASE": "http://127.0.0.1:9",
    }.items():
        monkeypatch.setenv(f"AGENTWORKS_{name}", value)
    ids = {
        "workspace": str(board.workspace_id),
        "project": str(board.project_id),
        "card": str(card),
        "now": datetime.now(UTC).isoformat(),
    }

    assert cli.run([part.format(**ids) for part in command]) == exit_code

    assert_made_as_the_pools_make_them(opened, **own)
