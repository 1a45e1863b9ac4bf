"""What a process logs while its database is away: one line when it goes, one when it is back.

The database is a test's own, made unreachable by refusing connections to it (never the shared
server restarted).
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from typing import TYPE_CHECKING

import pg
import psycopg
from orchestrator_helpers import (
    card_on_board,
    fast_simulated,
    orchestrator_thread,
    running_with_lines,
    wait_for,
)
from psycopg import sql

from adapters.postgres import ResilientPool, dependency_name, login_url, make_pool
from commands import models as m

if TYPE_CHECKING:
    from collections.abc import Callable

    from commands.handlers import AgentWorks


def _set_allow_connections(name: str, *, allowed: bool) -> None:
    with pg.admin_connection() as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(
                sql.Identifier(name), sql.Literal(allowed)
            )
        )
        if not allowed:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )


def _records(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def _wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_a_pool_reconnecting_through_an_outage_logs_it_once_not_per_attempt(
    log_lines: io.StringIO,
) -> None:
    name = pg.random_name("outagelog")
    with pg.temporary_database(name) as url:
        pool = make_pool(url, min_size=2, max_size=2, name="outage-logs")
        try:
            _set_allow_connections(name, allowed=False)
            # Lending finds the connections broken; the pool reconnects every 0.5 s at most.
            with contextlib.suppress(psycopg.OperationalError), pool.connection(0.5) as conn:
                conn.execute("SELECT 1")
            # Two connections at the start, then some reconnection attempts refused.
            _wait_for(lambda: _attempts(pool) >= 8)
            _set_allow_connections(name, allowed=True)
            _wait_for(lambda: "dependency.up" in log_lines.getvalue())
        finally:
            pool.close()

    records = _records(log_lines)
    warnings = [r for r in records if r["level"] in ("warning", "error")]
    about_connecting = [r for r in warnings if "error connecting" in str(r["event"])]
    assert about_connecting == []
    assert [r["event"] for r in warnings if str(r["event"]).startswith("dependency.")] == [
        "dependency.down",
        "dependency.up",
    ]
    down = next(r for r in warnings if r["event"] == "dependency.down")
    assert "not currently accepting connections" in str(down["error"])


def test_a_role_the_database_refuses_is_down_alone_not_the_database_of_every_role(
    log_lines: io.StringIO,
) -> None:
    """A process logs in as several roles. Outages named the database alone, so while the
    server refused one role and let another in, each refused attempt said the database was
    down and the other role's next connection said it was up again, for as long as it lasted.
    The refused role is down on its own, once; the other's connections say nothing."""
    name = pg.random_name("rolelog")
    refused = pg.random_name("refused")
    with pg.temporary_database(name) as url, pg.admin_connection() as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(refused)))
        admin.execute(
            sql.SQL("REVOKE CONNECT ON DATABASE {} FROM PUBLIC").format(sql.Identifier(name))
        )
        good = make_pool(url, min_size=1, max_size=1, name="let-in")
        bad = ResilientPool(
            login_url(url, refused), min_size=1, max_size=1, name="refused", open=False,
            dependency=dependency_name(login_url(url, refused)),
        )  # fmt: skip
        try:
            bad.open(wait=False)
            for _ in range(8):  # each lending after 0.3 s idle checks, and succeeds
                time.sleep(0.3)
                with good.connection() as conn:
                    conn.execute("SELECT 1")
            _wait_for(lambda: "dependency.down" in log_lines.getvalue())
        finally:
            bad.close()
            good.close()
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(refused)))

    said = [
        (r["event"], r["dependency"])
        for r in _records(log_lines)
        if str(r["event"]).startswith("dependency.")
    ]
    assert said == [("dependency.down", dependency_name(login_url(url, refused)))]
    assert said[0][1].endswith(f" as {refused}")


def _attempts(pool: object) -> int:
    """Connection attempts the pool made (psycopg_pool's own statistics)."""
    stats: dict[str, int] = pool.get_stats()  # type: ignore[attr-defined]
    return stats.get("connections_num", 0)


def test_an_orchestrator_reading_the_log_through_an_outage_says_it_once(
    write_side: AgentWorks, database_url: str, log_lines: io.StringIO
) -> None:
    """The orchestrator reads the log again every second while its database is away, and
    beats every run's heartbeat: each failed read was logged as ``orchestrator.tail_failed``
    and each failed beat as ``orchestrator.heartbeat_failed``, at ERROR with its traceback, for
    as long as the outage lasted, beside the ``dependency.down`` that already said it."""
    name = str(psycopg.conninfo.conninfo_to_dict(database_url)["dbname"])
    card = card_on_board(write_side)
    slow = fast_simulated(tokens_per_second=5, output_tokens=1000)

    def logged(*events: str) -> bool:
        return any(event in log_lines.getvalue() for event in events)

    with orchestrator_thread(database_url, {"simulated": slow}, heartbeat_interval=0.2):
        run = write_side.start_agent_run(
            m.StartAgentRun(card_id=card.card_id, agent="coder"), card.board.owner
        ).id
        wait_for(write_side, run, running_with_lines)
        try:
            _set_allow_connections(name, allowed=False)
            # Both loops have met the outage (however each says so).
            _wait_for(
                lambda: (
                    logged("orchestrator.database_unavailable", "orchestrator.tail_failed")
                    and logged(
                        "orchestrator.heartbeat_unavailable", "orchestrator.heartbeat_failed"
                    )
                )
            )
        finally:
            _set_allow_connections(name, allowed=True)
        _wait_for(lambda: "dependency.up" in log_lines.getvalue())

    events = [r["event"] for r in _records(log_lines)]
    assert "orchestrator.tail_failed" not in events
    assert "orchestrator.heartbeat_failed" not in events
    assert events.count("dependency.down") == 1
