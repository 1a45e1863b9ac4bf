"""Test helpers for the real local services: PostgreSQL on 127.0.0.1:5432 and Redis on :6379.

Tests use the machine's servers, starting them when they are down, and give each test its own
database (cloned from a migrated template, which is fast) so tests run in any order and in
parallel sessions without seeing each other's rows. Import as ``import pg`` (pytest puts
``tests/`` on ``sys.path`` for the root conftest).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from psycopg.rows import TupleRow

PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_USER = "postgres"
ADMIN_URL = f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/postgres"
PG_START = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
REDIS_START = 'redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no'
#: A Redis db holding this key belongs to a running test session (see :func:`claim_redis_db`).
REDIS_CLAIM_KEY = "agentworks:test-session-claim"
REDIS_CLAIM_SECONDS = 6 * 3600


#: Prefix of every database the tests create; set ``AGENTWORKS_TEST_DB_PREFIX`` to keep apart
#: from other users of a shared server (or from their own naming rules).
DB_PREFIX = os.environ.get("AGENTWORKS_TEST_DB_PREFIX", "aw_")
#: The test run's pid, inherited by the processes it spawns (pytest-xdist's workers among them),
#: names its databases: ``<DB_PREFIX><pid>_[<worker>_]<kind><random>``. Connections are counted
#: per run by it, and databases of a run that no longer runs are orphans (see
#: :func:`drop_orphans`).
SESSION_PID = int(os.environ.setdefault("AGENTWORKS_TEST_SESSION_PID", str(os.getpid())))
#: Every database of this run, whichever of its workers made it.
RUN_PREFIX = f"{DB_PREFIX}{SESSION_PID}_"
#: The pytest-xdist worker this process is (``gw0``); empty in a run without workers.
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
#: The databases of this process's own session (the whole run's, when it has no workers).
SESSION_PREFIX = f"{RUN_PREFIX}{WORKER}_" if WORKER else RUN_PREFIX
_ORPHAN = re.compile(rf"{re.escape(DB_PREFIX)}(\d+)_")
_WORKER_OF = re.compile(rf"{re.escape(RUN_PREFIX)}(gw\d+)_")


def worker_of(database: str) -> str:
    """The worker of this run that made ``database`` (``""``: the run has no workers)."""
    found = _WORKER_OF.match(database)
    return found.group(1) if found else ""


#: The password each component's role gets from the test sessions' migrations. The machine's
#: PostgreSQL trusts local connections and does not check them, but they are set, as in production.
LOGIN_PASSWORDS = {
    "agentworks_app": "test-writer-password",
    "agentworks_api": "test-api-password",
    "agentworks_projector": "test-projector-password",
    "agentworks_relay": "test-relay-password",
}

_COMPONENT_OF = {
    "agentworks_app": "writer",
    "agentworks_api": "api",
    "agentworks_projector": "projector",
    "agentworks_relay": "relay",
}
#: The same passwords as ``Settings`` fields and as the environment of a process under test.
LOGIN_SETTINGS = {f"db_{_COMPONENT_OF[r]}_password": p for r, p in LOGIN_PASSWORDS.items()}
LOGIN_ENV = {f"AGENTWORKS_{key.upper()}": value for key, value in LOGIN_SETTINGS.items()}


def url_for(dbname: str) -> str:
    return f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{dbname}"


def login_url_for(database_url: str, role: str) -> str:
    """``database_url`` logging in as ``role``, with its password, as a component does."""
    from adapters.postgres import login_url

    return login_url(database_url, role, LOGIN_PASSWORDS[role])


def random_name(kind: str) -> str:
    """A fresh name for this session's database of ``kind`` (``"t_"``; an ``aw_`` is dropped)."""
    return f"{SESSION_PREFIX}{kind.removeprefix('aw_')}{secrets.token_hex(6)}"


# --- PostgreSQL ----------------------------------------------------------------------------------


def postgres_is_up() -> bool:
    try:
        with psycopg.connect(ADMIN_URL, connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False


def ensure_postgres(timeout: float = 60.0) -> None:
    """Make sure PostgreSQL accepts connections, starting the local cluster if it does not."""
    if postgres_is_up():
        return
    subprocess.run(PG_START, shell=True, check=False, timeout=timeout)
    _wait_until(postgres_is_up, timeout=timeout, what=f"PostgreSQL at {PG_HOST}:{PG_PORT}")


@contextlib.contextmanager
def admin_connection() -> Iterator[psycopg.Connection[TupleRow]]:
    with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=10) as conn:
        yield conn


@contextlib.contextmanager
def temporary_database(name: str, *, template: str | None = None) -> Iterator[str]:
    """Database ``name`` (a copy of ``template``) while the block runs, dropped after; its URL."""
    url = create_database(name, template=template)
    try:
        yield url
    finally:
        drop_database(name)


def create_database(name: str, *, template: str | None = None) -> str:
    """Create database ``name`` (as a copy of ``template``) and return its URL."""
    statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template is not None:
        statement = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(template)
        )
    # Copying a template fails while anyone is connected to it ("being accessed by other
    # users"); a test's late-closing pool can cause that briefly, so retry for a while.
    deadline = time.monotonic() + 30
    while True:
        try:
            with admin_connection() as conn:
                conn.execute(statement)
            return url_for(name)
        except psycopg.errors.ObjectInUse:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def drop_database(name: str, *, timeout: float = 60.0) -> None:
    """Drop ``name`` even while connections are open to it (they are terminated).

    Retried when the server refuses the admin connection (``too many clients already`` on a
    busy shared server): a teardown that gives up leaks the database.
    """
    statement = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
    deadline = time.monotonic() + timeout
    while True:
        try:
            with admin_connection() as conn:
                conn.execute(statement)
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
        else:
            return


class Clones:
    """Copies of a template database, made ahead of the tests that take them and dropped behind
    them, in threads of their own.

    ``DROP DATABASE`` waits for a checkpoint (every page the server has dirtied, flushed and
    synced) and ``CREATE DATABASE`` copies the template's files: in each test's setup and
    teardown they cost ~0.1-3 s a test on a shared server, for nothing the test checks. A copy
    made ahead is what a copy made at the test's start would be (the template does not change),
    and a database handed back is never used again, so dropping it a little later changes
    nothing either; drops running side by side wait for the same checkpoint instead of one each.
    With no copy ready one is made on the spot, as before; with ``backlog`` drops under way
    a test's teardown waits for one of them, so that copies do not pile up on the server's disk.
    """

    def __init__(self, template: str, *, spares: int = 1, backlog: int = 8) -> None:
        self.template = template
        self._spares = spares
        self._ready: list[str] = []
        self._closed = False
        self._changed = threading.Condition()
        self._dropping = threading.BoundedSemaphore(backlog)
        self._droppers = ThreadPoolExecutor(max_workers=backlog, thread_name_prefix="pg-drop")
        self._maker = threading.Thread(target=self._make_spares, name="pg-clones", daemon=True)
        self._maker.start()

    def take(self, name: str) -> str:
        """A copy of the template named ``name``: a ready one renamed, or a new one; its URL."""
        with self._changed:
            spare = self._ready.pop() if self._ready else None
            self._changed.notify_all()
        if spare is not None:
            try:
                with admin_connection() as conn:
                    conn.execute(
                        sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                            sql.Identifier(spare), sql.Identifier(name)
                        )
                    )
                return url_for(name)
            except psycopg.Error:
                self.give_back(spare)
        return create_database(name, template=self.template)

    def give_back(self, name: str) -> None:
        """Drop ``name`` (a database taken from here) soon, connections and all."""
        self._dropping.acquire()
        try:
            self._droppers.submit(self._drop, name)
        except RuntimeError:  # closed: drop it now
            self._dropping.release()
            drop_database(name)

    @contextlib.contextmanager
    def database(self, name: str) -> Iterator[str]:
        """:func:`temporary_database` of the template, made ahead and dropped behind."""
        url = self.take(name)
        try:
            yield url
        finally:
            self.give_back(name)

    def close(self) -> None:
        """Stop making copies, drop the ready ones, and wait until every drop is done."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._maker.join()
        for name in self._ready:
            self.give_back(name)
        self._ready.clear()
        self._droppers.shutdown(wait=True)

    def _drop(self, name: str) -> None:
        try:
            drop_database(name)
        except psycopg.Error:
            pass  # the server restarted (a fault test): the session's end drops what is left
        finally:
            self._dropping.release()

    def _make_spares(self) -> None:
        failures = 0
        while True:
            with self._changed:
                while not self._closed and len(self._ready) >= self._spares:
                    self._changed.wait()
                if self._closed:
                    return
            spare = random_name("spare_")
            try:
                create_database(spare, template=self.template)
            except psycopg.Error:
                failures += 1  # the server restarted or refused: try again a little later
                time.sleep(min(0.2 * failures, 2.0))
                continue
            failures = 0
            with self._changed:
                self._ready.append(spare)


def session_databases(prefix: str = SESSION_PREFIX) -> list[str]:
    """Databases of this test session (or of the whole run: ``RUN_PREFIX``) still on the server."""
    with admin_connection() as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %s)", (prefix,)
        ).fetchall()
    return [str(row[0]) for row in rows]


def drop_session_databases(prefix: str = SESSION_PREFIX) -> list[str]:
    """Drop what this session (or the run) left behind, a teardown that failed; the names."""
    left = session_databases(prefix)
    for name in left:
        drop_database(name)
    return left


def drop_orphans() -> list[str]:
    """Drop databases of test sessions whose process no longer runs on this machine."""
    with admin_connection() as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %s)", (DB_PREFIX,)
        ).fetchall()
    dropped = []
    for (name,) in rows:
        match = _ORPHAN.match(str(name))
        if match and int(match.group(1)) != SESSION_PID and not _pid_alive(int(match.group(1))):
            drop_database(str(name))
            dropped.append(str(name))
    return dropped


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ConnectionGauge:
    """Samples how many connections this run's databases hold; keeps the peak.

    The suite promises to stay within a connection budget on a shared server; this measures it
    from the server's side (``pg_stat_activity``), whatever opened them: pools, subprocesses,
    spawned workers, every pytest-xdist worker of the run (``prefix``). ``owner`` names what held
    the database with the most connections at the peak, asked then (the test running there).
    """

    def __init__(
        self,
        interval: float = 0.05,
        owner: Callable[[str], str] = lambda database: "",
        prefix: str = RUN_PREFIX,
    ) -> None:
        self.interval = interval
        self.owner = owner
        self.prefix = prefix
        self.peak = 0
        self.peak_at = ""
        self.peak_owner = ""
        self.most_by: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pg-connection-gauge", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        # The server may be down when the run starts (a fixture starts it): try again until it
        # is up, and again if it goes away.
        while not self._stop.is_set():
            try:
                with admin_connection() as conn:
                    while not self._stop.wait(self.interval):
                        self._sample(conn)
            except psycopg.Error:
                self._stop.wait(1.0)

    def _sample(self, conn: psycopg.Connection[TupleRow]) -> None:
        rows = conn.execute(
            "SELECT datname, count(*) FROM pg_stat_activity WHERE starts_with(datname, %s)"
            " GROUP BY datname ORDER BY count(*) DESC",
            (self.prefix,),
        ).fetchall()
        total = sum(int(count) for _, count in rows)
        if total > self.peak:
            self.peak, self.peak_at = total, str(rows[0][0])
            self.peak_owner = self.owner(self.peak_at)
        for database, count in rows:
            owner = self.owner(str(database)) or str(database)
            if int(count) > self.most_by.get(owner, 0):
                self.most_by[owner] = int(count)

    def most(self, n: int) -> list[tuple[str, int]]:
        """The ``n`` owners (tests) whose database held the most connections at once."""
        return sorted(self.most_by.items(), key=lambda item: -item[1])[:n]


def many_connections_lock() -> str:
    """The run's lock file of :func:`alone_among_many_connections` (removed when the run ends)."""
    return os.path.join(tempfile.gettempdir(), f"agentworks-tests-{SESSION_PID}.many-connections")


@contextlib.contextmanager
def alone_among_many_connections() -> Iterator[None]:
    """Held while a test of many connections runs: no other such test of this run (on another
    worker) runs meanwhile, so the run's peak stays one such test's plus ordinary ones. A lock
    on a file named for the run: other runs on the machine keep their own budget."""
    with open(many_connections_lock(), "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)


def database_exists(name: str) -> bool:
    with admin_connection() as conn:
        row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        return row is not None


def log_head(database_url: str) -> int:
    """The highest position a test database's event log holds (0 when empty), horizon or not:
    a reader's own answer stops below a transaction of this database still open."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT coalesce(max(notification_id), 0) FROM agentworks_events")
        found = row.fetchone()
    assert found is not None
    return int(found[0])


# --- Redis ---------------------------------------------------------------------------------------


def redis_command(*args: str | int, db: int | None = None, timeout: float = 5.0) -> object:
    """Send one command over RESP and return the reply (enough for the fixtures' needs)."""
    with socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=timeout) as sock:
        stream = sock.makefile("rwb")
        if db is not None:
            stream.write(_resp("SELECT", db))
        stream.write(_resp(*args))
        stream.flush()
        if db is not None:
            _read_reply(stream)
        return _read_reply(stream)


def redis_is_up() -> bool:
    try:
        return redis_command("PING", timeout=2) == "PONG"
    except OSError:
        return False


def ensure_redis(timeout: float = 30.0) -> None:
    """Make sure Redis answers PING, starting a local server if it does not."""
    if redis_is_up():
        return
    if shutil.which("redis-server") is None:
        raise RuntimeError("Redis is down and redis-server is not installed")
    subprocess.run(REDIS_START, shell=True, check=False, timeout=timeout)
    _wait_until(redis_is_up, timeout=timeout, what=f"Redis at {REDIS_HOST}:{REDIS_PORT}")


def claim_redis_db(session_id: str) -> int:
    """Reserve a Redis db index 1..15 for this test session and return it.

    Concurrent test sessions (several engineers, CI) share one Redis; each claims a db with
    ``SET key NX EX`` so no two use the same one. A crashed session's claim expires.
    """
    indexes = list(range(1, 16))
    secrets.SystemRandom().shuffle(indexes)
    for index in indexes:
        reply = redis_command(
            "SET", REDIS_CLAIM_KEY, session_id, "NX", "EX", REDIS_CLAIM_SECONDS, db=index
        )
        if reply == "OK":
            return index
    raise RuntimeError("all Redis dbs 1..15 are claimed by other test sessions")


def release_redis_db(index: int, session_id: str) -> None:
    """Empty the claimed db (what the session left behind) if the claim is still ours."""
    if redis_command("GET", REDIS_CLAIM_KEY, db=index) == session_id:
        redis_command("FLUSHDB", db=index)


def _resp(*args: str | int) -> bytes:
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _read_reply(stream: io.BufferedIOBase) -> object:
    line = stream.readline()
    if not line:
        raise ConnectionError("Redis closed the connection")
    kind, body = line[:1], line[1:-2].decode()
    if kind == b"+":
        return body
    if kind == b"-":
        raise RuntimeError(f"Redis error: {body}")
    if kind == b":":
        return int(body)
    if kind == b"$":
        size = int(body)
        if size < 0:
            return None
        data = stream.read(size + 2)
        return data[:-2].decode()
    if kind == b"*":
        count = int(body)
        return None if count < 0 else [_read_reply(stream) for _ in range(count)]
    raise ConnectionError(f"unexpected Redis reply {line!r}")


def _wait_until(check: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not come up within {timeout:.0f}s")
