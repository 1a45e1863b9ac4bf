"""Every command works on a data dir's embedded PostgreSQL, with or without ``dev`` running.

Run as a user runs them: separate processes, no ``AGENTWORKS_DATABASE_URL``. A command run while
``dev`` runs uses dev's server and leaves it running; a command run alone starts the server and
stops it when it ends. Every signal that ends ``dev`` stops its server; a server left behind by a
``kill -9`` is adopted by the next process with one line, and stopped when that one ends.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import test_cli
from cli_process import (
    Agentworks,
    assert_clean_exit,
    assert_postgres_stopped,
    postgres_processes,
    start_dev,
)

pytestmark = pytest.mark.slow


def agentworks(
    tmp_path: Path, *args: str, timeout: float = 120, **env: str
) -> subprocess.CompletedProcess[str]:
    return test_cli.agentworks(
        *args,
        cwd=tmp_path,
        env={"AGENTWORKS_LOG_LEVEL": "WARNING", "COLUMNS": "200", **env},
        timeout=timeout,
    )


def log_head(status_stdout: str) -> int:
    match = re.search(r"event log head: ([\d,]+)", status_stdout)
    assert match, status_stdout
    return int(match.group(1).replace(",", ""))


def test_admin_commands_start_the_embedded_database_for_themselves_and_stop_it_after(
    tmp_path: Path, data_dir: Path
) -> None:
    by_option = agentworks(tmp_path, "status", "--data-dir", str(data_dir))
    assert by_option.returncode == 0, by_option.stderr
    assert log_head(by_option.stdout) == 0
    assert_postgres_stopped(data_dir)

    migrated = agentworks(tmp_path, "migrate", AGENTWORKS_DATA_DIR=str(data_dir))
    assert migrated.returncode == 0, migrated.stderr
    assert "up to date" in migrated.stdout
    for command in (("rebuild", "all"), ("sweep", "kanban"), ("status",)):
        result = agentworks(tmp_path, *command, AGENTWORKS_DATA_DIR=str(data_dir))
        assert result.returncode == 0, (command, result.stderr)
        assert_postgres_stopped(data_dir)


def test_admin_commands_use_the_running_dev_database_and_leave_it_running(
    tmp_path: Path, data_dir: Path, running: list[Agentworks]
) -> None:
    dev = start_dev(tmp_path, data_dir, "--demo", running=running)
    printed = re.search(r"Database: (postgresql://\S+)", dev.stderr)
    assert printed, dev.stderr
    assert str(data_dir.resolve()) in printed.group(1)
    server = postgres_processes(data_dir)
    assert server

    status = agentworks(tmp_path, "status", "--data-dir", str(data_dir))
    assert status.returncode == 0, status.stderr
    assert log_head(status.stdout) > 0  # the demo's events, in dev's database
    for command in (("migrate",), ("rebuild", "kanban"), ("sweep", "all")):
        result = agentworks(tmp_path, *command, "--data-dir", str(data_dir))
        assert result.returncode == 0, (command, result.stderr)
    token = agentworks(tmp_path, "token", "--bootstrap", "--data-dir", str(data_dir))
    assert token.returncode == 0, token.stderr

    assert {p.pid for p in postgres_processes(data_dir)} >= {p.pid for p in server}
    dev.graphql(token.stdout.strip(), "{ __typename }", {})

    # Closing the terminal (SIGHUP) stops dev and everything it started.
    code, _ = dev.stop(signal.SIGHUP)
    assert_clean_exit(code, dev.stderr)
    assert_postgres_stopped(data_dir)


def test_sigterm_and_sighup_stop_dev_and_its_database(
    tmp_path: Path, data_dir: Path, running: list[Agentworks]
) -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        dev = start_dev(tmp_path, data_dir, running=running)
        assert postgres_processes(data_dir)

        code, _ = dev.stop(sig)

        assert_clean_exit(code, dev.stderr)
        assert_postgres_stopped(data_dir)


def test_a_server_left_by_a_killed_dev_is_adopted_with_one_line_and_stopped_after(
    tmp_path: Path, data_dir: Path, running: list[Agentworks]
) -> None:
    crashed = start_dev(tmp_path, data_dir, running=running)
    crashed.process.send_signal(signal.SIGKILL)  # dev alone: its PostgreSQL runs on
    crashed.process.wait(10)
    left = postgres_processes(data_dir)
    assert left, "a killed dev leaves its PostgreSQL running"

    dev = start_dev(tmp_path, data_dir, running=running)
    adopted = [line for line in dev.stderr.splitlines() if "left running" in line]
    assert len(adopted) == 1, dev.stderr
    assert any(f"pid {p.pid}" in adopted[0] for p in left), (adopted, left)

    code, _ = dev.stop(signal.SIGINT)
    assert_clean_exit(code, dev.stderr)
    assert_postgres_stopped(data_dir)


def test_a_busy_port_is_one_line_and_exit_2_before_anything_starts(
    tmp_path: Path, data_dir: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for command in ("dev", "serve"):
            result = agentworks(
                tmp_path, command, "--port", str(port), "--data-dir", str(data_dir),
                AGENTWORKS_LOG_LEVEL="INFO",
            )  # fmt: skip

            assert result.returncode == 2, result
            lines = result.stderr.strip().splitlines()
            assert lines == [
                f"agentworks: error: port {port} on 127.0.0.1 is already in use "
                "(another agentworks?); choose another with --port"
            ], result.stderr
            assert result.stdout == ""
    assert not (data_dir / "postgres").exists()
