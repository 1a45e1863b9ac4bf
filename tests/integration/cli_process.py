"""An ``agentworks`` CLI process run as a user runs it, and what it leaves behind.

No pytest fixtures in here (they are in ``conftest.py``): the test modules of ``dev``, ``serve``
and the embedded database's admin commands import these helpers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil  # type: ignore[import-untyped]
import pytest
from dedicated_postgres import free_port

REPO = Path(__file__).resolve().parents[2]
STOP_WITHIN = 15.0

__all__ = [
    "Agentworks",
    "assert_clean_exit",
    "assert_postgres_stopped",
    "clean_env",
    "free_port",
    "postgres_processes",
    "run_python",
    "start_dev",
    "stop_postgres_under",
]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any AGENTWORKS_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTWORKS_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run_python(
    program: str, *, cwd: Path, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``python -c program`` as a process of its own, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-c", program],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


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


def start_dev(
    tmp_path: Path,
    data_dir: Path,
    *args: str,
    running: list[Agentworks],
    env: dict[str, str] | None = None,
) -> Agentworks:
    """``agentworks dev --data-dir data_dir *args``, serving on a free port.

    It is in ``running`` before the wait, so the test's end kills it even when it never answers,
    and it runs in a folder of its own below ``tmp_path``, so that the output files of several
    in one test stay apart.
    """
    port = free_port()
    run_dir = tmp_path / f"dev-{port}"
    run_dir.mkdir()
    dev = Agentworks.start(
        run_dir, "dev", "--port", str(port), "--data-dir", str(data_dir), *args,
        env=clean_env() if env is None else env, port=port,
    )  # fmt: skip
    running.append(dev)
    dev.wait_until_serving()
    return dev


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


def stop_postgres_under(top: Path) -> None:
    """Stop what a failed test left running on a data dir below ``top``."""
    for process in postgres_processes(top):
        with contextlib.suppress(psutil.Error):
            process.terminate()
            process.wait(10)
