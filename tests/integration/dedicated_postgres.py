"""A PostgreSQL server of a test's (or benchmark's) own, which it may stop and restart at will.

The machine's shared server on 5432 must never be restarted: other sessions use it. Fault tests
start one of these instead, from the PostgreSQL 15 binaries, on a free loopback port in a
temporary data directory, as the ``postgres`` system user when run as root (``initdb`` and
``postgres`` refuse to run as root). Stopping and starting again keeps the port and the data.

No pytest in here: ``bench/recovery.py`` imports this module too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

BIN = Path("/usr/lib/postgresql/15/bin")
SYSTEM_USER = "postgres"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class DedicatedPostgres:
    """One PostgreSQL server: ``start()``, ``stop()``, ``restart()``; trust auth on 127.0.0.1."""

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        run_in: Callable[[list[str]], list[str]] | None = None,
    ) -> None:
        """``host``: the address it listens on; ``run_in``: what its commands are run through
        (a network namespace of their own: ``network_partition.Partition.command``)."""
        self.workdir = workdir
        self.data = workdir / "data"
        self.logfile = workdir / "postgres.log"
        self.port = port or free_port()
        self.host = host
        self._run_in = run_in
        self._as_root = os.geteuid() == 0

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{dbname}?sslmode=disable"

    def init(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._as_root:
            shutil.chown(self.workdir, SYSTEM_USER, SYSTEM_USER)
        self._run(
            BIN / "initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync",
            "-E", "UTF8", "--locale", "C.UTF-8",
        )  # fmt: skip
        settings = (
            f"port = {self.port}\n"
            f"listen_addresses = '{self.host}'\n"
            f"unix_socket_directories = '{self.workdir}'\n"
            "max_connections = 200\n"
            "shared_buffers = 32MB\n"
        )
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(settings)
        with (self.data / "pg_hba.conf").open("a") as hba:
            hba.write("host all all samenet trust\n")  # a client across a partition's link

    def start(self, timeout: float = 60.0) -> None:
        self._run(
            BIN / "pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-w",
            "-t", str(int(timeout)), "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """``fast``: what a service restart does (sessions ended, open transactions rolled
        back, a clean shutdown); ``immediate``: a crash (recovery from the WAL at start)."""
        self._run(BIN / "pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def accepting(self) -> bool:
        try:
            with psycopg.connect(self.url(), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def wait_accepting(self, timeout: float = 30.0, poll: float = 0.005) -> float:
        """Seconds until the server accepts a connection."""
        started = time.monotonic()
        while not self.accepting():
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"PostgreSQL on port {self.port} is not accepting connections")
            time.sleep(poll)
        return time.monotonic() - started

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def _run(self, *args: str | Path) -> None:
        command = [str(a) for a in args]
        if self._as_root:
            command = ["runuser", "-u", SYSTEM_USER, "--", *command]
        if self._run_in is not None:
            command = self._run_in(command)
        subprocess.run(command, check=True, capture_output=True, timeout=120)


@contextlib.contextmanager
def dedicated_postgres(
    *, host: str = "127.0.0.1", run_in: Callable[[list[str]], list[str]] | None = None
) -> Iterator[DedicatedPostgres]:
    """A started server in a temporary directory, stopped and removed afterwards."""
    workdir = Path(tempfile.mkdtemp(prefix="aw-pg-"))
    server = DedicatedPostgres(workdir, host=host, run_in=run_in)
    try:
        server.init()
        server.start()
        yield server
    finally:
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            server.stop("immediate")
        shutil.rmtree(workdir, ignore_errors=True)
