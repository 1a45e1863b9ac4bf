"""The relay and the orchestrator, run as separate processes as production runs them, serve
their own metrics: what only they record (their outages, the broker losing records) is not on
the API's ``/metrics``, which shows its own process's."""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pg
import psycopg
import pytest
from cli_process import Agentworks, clean_env, free_port
from psycopg import sql

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from adapters.kafka_broker import LocalBroker

TOKEN = "metrics-token-" + "m" * 30


def _allow_connections(database_url: str, *, allowed: bool) -> None:
    name = psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]
    with pg.admin_connection() as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(
                sql.Identifier(str(name)), sql.Literal(allowed)
            )
        )
        if not allowed:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )


def _dependency_up(text: str, database_url: str) -> float | None:
    name = psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]
    found = re.search(
        rf'^agentworks_dependency_up\{{dependency="postgresql [^"]*/{name}( as [^"]*)?"\}} (\S+)$',
        text,
        re.M,
    )
    return None if found is None else float(found.group(2))


def _eventually(probe: Callable[[], object], *, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if probe():
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "not within the timeout"
        time.sleep(0.2)


@contextlib.contextmanager
def _running(tmp_path: Path, *args: str, env: dict[str, str]) -> Iterator[Agentworks]:
    port = free_port()
    process = Agentworks.start(
        tmp_path, *args, env=clean_env(**env, AGENTWORKS_METRICS_PORT=str(port)), port=port
    )
    try:
        yield process
    finally:
        process.kill()


@pytest.mark.parametrize("command", ["relay", "orchestrator"])
def test_a_process_serves_its_own_metrics_and_shows_its_database_going_and_coming_back(
    command: str, database_url: str, kafka_broker: LocalBroker, tmp_path: Path
) -> None:
    env = {
        "AGENTWORKS_DATABASE_URL": database_url,
        "AGENTWORKS_KAFKA_BOOTSTRAP": kafka_broker.bootstrap,
        "AGENTWORKS_TOPIC_PREFIX": f"metrics-{time.monotonic_ns()}-",
        "AGENTWORKS_METRICS_TOKEN": TOKEN,
        "AGENTWORKS_POOL_SIZE": "1",
        "AGENTWORKS_LOG_LEVEL": "WARNING",
    }
    with _running(tmp_path, command, env=env) as process:
        metrics = f"{process.url}/metrics"
        authorized = {"Authorization": f"Bearer {TOKEN}"}

        def scrape() -> str:
            assert process.process.poll() is None, process.stderr
            response = httpx.get(metrics, headers=authorized, timeout=5)
            assert response.status_code == 200, response.text
            return response.text

        _eventually(scrape)
        refused = httpx.get(metrics, timeout=5)
        assert refused.status_code == 401
        assert "agentworks_" not in refused.text
        if command == "relay":
            assert "agentworks_relay_broker_log_lost_total 0.0" in scrape()

        try:
            _allow_connections(database_url, allowed=False)
            _eventually(lambda: _dependency_up(scrape(), database_url) == 0.0)
        finally:
            _allow_connections(database_url, allowed=True)
        _eventually(lambda: _dependency_up(scrape(), database_url) == 1.0)
        assert process.process.poll() is None, process.stderr
        # Scrapes are not logged as access lines (they would not be JSON).
        assert "GET /metrics" not in process.stderr
