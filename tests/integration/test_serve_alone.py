"""``agentworks serve`` alone says what it lacks, and is not ready while nothing feeds it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pg
import psycopg
import pytest
from cli_process import Agentworks, clean_env, free_port
from psycopg import sql
from users import user_id

from adapters.tokens import BOOTSTRAP_WORKSPACE, issue_token

if TYPE_CHECKING:
    pass

pytestmark = pytest.mark.slow

SECRET = "serve-alone-test-secret-" + "s" * 32


def readyz(serve: Agentworks) -> httpx.Response:
    return httpx.get(f"{serve.url}/readyz", timeout=10)


def readyz_once(serve: Agentworks, status: int, timeout: float = 30) -> httpx.Response:
    """``/readyz``'s first answer with ``status`` (or its last one after ``timeout``)."""
    deadline = time.monotonic() + timeout
    answer = readyz(serve)
    while answer.status_code != status and time.monotonic() < deadline:
        time.sleep(0.3)
        answer = readyz(serve)
    return answer


@pytest.mark.many_connections
def test_serve_alone_names_what_it_lacks_and_turns_not_ready_when_lag_stops_moving(
    tmp_path: Path, database_url: str, running: list[Agentworks]
) -> None:
    port = free_port()
    env = clean_env(
        AGENTWORKS_DATABASE_URL=database_url,
        AGENTWORKS_JWT_SECRET=SECRET,
        AGENTWORKS_PROJECTOR_STALL_SECONDS="1",
    )
    serve = Agentworks.start(tmp_path, "serve", "--port", str(port), env=env, port=port)
    running.append(serve)
    serve.wait_until_serving(timeout=60)

    assert "no projectors in this process" in serve.stderr
    assert "agentworks dev" in serve.stderr
    assert readyz(serve).status_code == 200  # an empty log: nothing to be behind on

    bootstrap = issue_token(
        user_id=user_id("ops"), workspace_id=BOOTSTRAP_WORKSPACE, role="OWNER", ttl_seconds=60,
        secret=SECRET,
    )  # fmt: skip
    serve.graphql(
        bootstrap, 'mutation { createWorkspace(input: {name: "Alone"}) { workspace { id } } }', {}
    )

    answer = readyz_once(serve, 503)
    assert answer.status_code == 503, answer.text
    body = answer.json()
    assert body["status"] == "not ready"
    assert all(p["lag"] > 0 and p["stalledSeconds"] >= 1 for p in body["projectors"].values())

    # Something consumes the log (here a rebuild): ready again.
    rebuilt = subprocess.run(
        [sys.executable, "-m", "infra.cli", "rebuild", "all"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert readyz(serve).status_code == 200, readyz(serve).text


def _writer_may_connect(database_url: str, *, allowed: bool) -> None:
    """Let the write side's role connect to this database, or not (the other roles still may):
    a login that fails for one component, as a rotated password deployed to half of them."""
    name = sql.Identifier(str(psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]))
    with pg.admin_connection() as conn:
        if allowed:
            conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO PUBLIC").format(name))
            return
        conn.execute(sql.SQL("REVOKE CONNECT ON DATABASE {} FROM PUBLIC").format(name))
        conn.execute(
            sql.SQL("GRANT CONNECT ON DATABASE {} TO agentworks_api, agentworks_projector").format(
                name
            )
        )
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND usename = 'agentworks_app'",
            (str(psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]),),
        )


def test_serve_is_not_ready_while_its_write_side_cannot_reach_the_database(
    tmp_path: Path, database_url: str, running: list[Agentworks]
) -> None:
    """Reads answered (/readyz read its positions as the API's role) while every mutation
    answered UNAVAILABLE: the instance stayed in the load balancer with writes failing."""
    port = free_port()
    env = clean_env(AGENTWORKS_DATABASE_URL=database_url, AGENTWORKS_JWT_SECRET=SECRET)
    serve = Agentworks.start(tmp_path, "serve", "--port", str(port), env=env, port=port)
    running.append(serve)
    serve.wait_until_serving(timeout=60)
    assert readyz(serve).status_code == 200

    try:
        _writer_may_connect(database_url, allowed=False)
        answer = readyz_once(serve, 503)
        assert answer.status_code == 503, answer.text
        body = answer.json()
        assert body["database"] == "ok"  # reads still work
        assert body["writes"].startswith("unavailable")
    finally:
        _writer_may_connect(database_url, allowed=True)

    answer = readyz_once(serve, 200)
    assert answer.status_code == 200, answer.text
    assert answer.json()["writes"] == "ok"
