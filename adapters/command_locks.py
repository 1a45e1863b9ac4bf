"""One execution of a ``commandId`` at a time, across every write side on one database.

A client that sends a command again (same ``commandId``) while its first run is still going, on
this API process or on another, must get the first run's result (API.md). The write side looks
the id up before running it, but a first run that has not committed is invisible to the look-up:
the retry then decides on a state the first run's commit is not part of, and a refusal it meets
there (a member removed meanwhile, an aggregate moved on, its retries spent on other writers)
contradicts the success its twin answers a moment later. So the executions of one id take turns:
each holds a PostgreSQL advisory lock keyed by its (scope, command id) from before its look-up
until its record is committed (or it was refused and wrote nothing), and the next one's look-up
then finds what the first recorded.

The lock costs no connection of its own while nobody else holds the id: every execution of this
process takes it with ``pg_try_advisory_lock`` on one session they share, in one round trip
with the id's look-up (a statement of its own after the lock, so its snapshot includes what the
previous holder committed). Letting go after the commit is a thread's of its own: the answer does
not wait for it, and the unlocks of executions ending together share a statement (the id's turn
in this process ends once its unlock is done). Only when another process
holds the id does an execution wait, on a connection of this module's small pool, with
``pg_advisory_lock`` under ``lock_timeout``. The lock is held apart from the write transaction,
so any number of holders' appends may still be written in one group commit.
Within the process the executions of one id queue on a threading lock first: a session's
advisory locks stack, so two threads on the shared session would both "get" it.

Commands sent without an id never come here (the id the server assigns is new), and different
ids never wait for each other (unless their 32-bit keys collide: then they merely take turns).
An execution holds one such lock at most and, holding it, waits for no other, so no cycle forms;
the wait for another process's run is bounded by ``wait_seconds`` and then answered UNAVAILABLE
(send it again: nothing was written by this request).

If the shared session breaks (the database restarted), the server lets go of every lock it held;
executions still running then finish without turns, as before this module (a retry meeting a
refusal still looks its id up once more).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import psycopg
from psycopg import InterfaceError
from psycopg.rows import tuple_row
from psycopg_pool import PoolTimeout

from adapters.postgres import ResilientPool
from domain.errors import Unavailable

if TYPE_CHECKING:
    from psycopg import Connection, Cursor
    from psycopg.rows import TupleRow
    from psycopg_pool import ConnectionPool

log = logging.getLogger(__name__)

#: The first key of every two-key advisory lock taken here: a space of its own (two-key locks
#: never meet the one-key locks of the event store, migrations, the relay or invoicing).
NAMESPACE = 0x41574364  # "AWCd"

# Statements are plain text built here (ints, and text through ``literal``): composing them with
# psycopg.sql cost more client CPU than the round trip they ride in.
_TRY = f"SELECT pg_try_advisory_lock({NAMESPACE}, {{key}}); {{look_up}}"
_LOCK = f"SELECT pg_advisory_lock({NAMESPACE}, {{key}}); {{look_up}}"
_UNLOCK = f"pg_advisory_unlock({NAMESPACE}, {{key}})"

#: The server probes a lock session idle this long, then every 10 s, and drops it after 3
#: unanswered probes: a replica whose host died (no FIN, no RST) lets go of the ids it held in
#: about a minute, not after the operating system's default of two hours and more, which would
#: answer every retry of those ids UNAVAILABLE meanwhile. (Ignored on a Unix socket, where a dead
#: peer is seen at once.)
_KEEPALIVE = (
    "SET tcp_keepalives_idle = 30; SET tcp_keepalives_interval = 10; SET tcp_keepalives_count = 3"
)

WAITERS = 4
"""Connections of the pool for waiting on another process's run of an id (beside the shared
session): more such waits at once wait for one of them, at most the pool's timeout."""


def lock_key(scope: str, command_id: str) -> int:
    """The advisory lock's second key (a signed 32-bit integer) for a command id in its scope."""
    digest = hashlib.blake2b(f"{scope}\x00{command_id}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


@dataclass
class _Turn:
    """This process's executions of one id: the one running holds ``lock``."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    users: int = 0


@dataclass(frozen=True)
class _Release:
    """An unlock handed to the releasing thread, and the turn it ends."""

    conn: Connection[TupleRow]
    key: int
    turn: _Turn


class CommandLocks:
    """Turns of the executions of one command id (module docstring), on ``pool``'s sessions."""

    def __init__(self, pool: ConnectionPool[Connection[TupleRow]], *, wait_seconds: float) -> None:
        self._pool = pool
        self.wait_seconds = wait_seconds
        self._shared: Connection[TupleRow] | None = None
        self._shared_lock = threading.Lock()
        self._turns: dict[int, _Turn] = {}
        self._turns_lock = threading.Lock()
        self._waiting = 0
        self._releases: queue.SimpleQueue[_Release | None] = queue.SimpleQueue()
        self._releasing = threading.Lock()
        self._releaser: threading.Thread | None = None
        self._closed = False

    @classmethod
    def beside(cls, store_pool: ResilientPool, *, wait_seconds: float = 30.0) -> CommandLocks:
        """Locks on a pool of their own that logs in as ``store_pool`` does (the same role and
        parameters; its connections never hold a transaction open)."""
        wait_ms = max(1, round(wait_seconds * 1000))

        def configure(conn: Connection[TupleRow]) -> None:
            conn.autocommit = True
            # ``literal`` quotes for standard-conforming strings: hold the session to them.
            conn.execute(
                f"SET lock_timeout = {wait_ms}; SET standard_conforming_strings = on; {_KEEPALIVE}"
            )

        store_kwargs = store_pool.kwargs if isinstance(store_pool.kwargs, dict) else {}
        pool = ResilientPool(
            connection_class=store_pool.connection_class,
            kwargs={**store_kwargs, "row_factory": tuple_row},
            min_size=1,
            max_size=1 + WAITERS,
            open=False,
            configure=configure,
            timeout=store_pool.timeout,
            name="command_locks",
            dependency=store_pool.dependency,
        )
        pool.open(wait=False)
        return cls(pool, wait_seconds=wait_seconds)

    @property
    def waiting(self) -> int:
        """Executions of this process waiting for an earlier run of their id to end."""
        with self._turns_lock:
            return self._waiting

    @contextmanager
    def one_at_a_time(self, scope: str, command_id: str, look_up: str) -> Iterator[TupleRow | None]:
        """Held while one execution of ``command_id`` runs: another, here or in any process on
        the same database, waits until it ends. Yields the first row of ``look_up`` (one statement
        without parameters, its text quoted with :func:`literal`), run in the lock's round trip
        once the lock is held: its snapshot then includes everything the previous holder
        committed."""
        key = lock_key(scope, command_id)
        turn = self._take_turn(key, command_id)
        ends_later = False
        try:
            shared, row = self._try_shared(key, look_up)
            if shared is None:
                with self._waited(key, command_id, look_up) as row:
                    yield row
                return
            try:
                yield row
            finally:
                ends_later = self._release_later(_Release(shared, key, turn))
        finally:
            if not ends_later:
                self._end_turn(key, turn)

    def close(self) -> None:
        """Let go of every lock still held (after the releases handed on) and of the pool."""
        with self._releasing:
            self._closed = True
            releaser = self._releaser
            if releaser is not None:
                self._releases.put(None)
        if releaser is not None:
            releaser.join()
        with self._shared_lock:
            shared, self._shared = self._shared, None
        if shared is not None:
            self._pool.putconn(shared)
        self._pool.close()

    # -- this process ---------------------------------------------------------------------------

    def _take_turn(self, key: int, command_id: str) -> _Turn:
        """This process's turn at ``key``, once the execution holding it ended."""
        with self._turns_lock:
            turn = self._turns.setdefault(key, _Turn())
            turn.users += 1
        if turn.lock.acquire(blocking=False):
            return turn
        self._count_waiting(1)
        try:
            if turn.lock.acquire(timeout=self.wait_seconds):
                return turn
        finally:
            self._count_waiting(-1)
        self._forget(key, turn)
        raise self._still_running(command_id)

    def _end_turn(self, key: int, turn: _Turn) -> None:
        turn.lock.release()
        self._forget(key, turn)

    def _forget(self, key: int, turn: _Turn) -> None:
        with self._turns_lock:
            turn.users -= 1
            if not turn.users:
                del self._turns[key]

    def _count_waiting(self, change: int) -> None:
        with self._turns_lock:
            self._waiting += change

    # -- the shared session ---------------------------------------------------------------------

    def _try_shared(
        self, key: int, look_up: str
    ) -> tuple[Connection[TupleRow] | None, TupleRow | None]:
        """The shared session holding the lock now, and the look-up's row; (None, None) when
        another session holds the lock."""
        statements = _TRY.format(key=key, look_up=look_up).encode()
        for attempt in (1, 2):
            conn = self._shared_session()
            try:
                cursor = conn.execute(statements)
                locked = _only(cursor)
                cursor.nextset()
                row = cursor.fetchone()
            except psycopg.Error as error:
                # The lock may be taken whatever failed: a closed session holds nothing.
                self._drop(conn)
                if not isinstance(error, psycopg.OperationalError | InterfaceError):
                    raise
                if attempt == 2:
                    raise _unavailable() from error
                continue  # broken (the server restarted under it): once more on a new one
            return (conn, row) if locked else (None, None)
        raise AssertionError("unreachable")  # pragma: no cover

    def _shared_session(self) -> Connection[TupleRow]:
        with self._shared_lock:
            shared = self._shared
            if shared is not None and not shared.closed and not shared.broken:
                return shared
            if shared is not None:
                self._pool.putconn(shared)  # the pool discards a broken connection
            self._shared = self._getconn()
            return self._shared

    def _drop(self, conn: Connection[TupleRow]) -> None:
        """Close a session whose state is in doubt: the server lets go of its locks with it."""
        with self._shared_lock:
            current = self._shared is conn
            if current:
                self._shared = None
        if current:  # else it was replaced, and given back, already
            conn.close()
            self._pool.putconn(conn)

    # -- waiting for another process ------------------------------------------------------------

    @contextmanager
    def _waited(self, key: int, command_id: str, look_up: str) -> Iterator[TupleRow | None]:
        """The lock, waited for on a connection of its own and held on it; the look-up's row."""
        conn = self._getconn()
        try:
            self._count_waiting(1)
            try:
                cursor = conn.execute(_LOCK.format(key=key, look_up=look_up).encode())
                cursor.nextset()
                row = cursor.fetchone()
            except psycopg.errors.LockNotAvailable:
                raise self._still_running(command_id) from None
            except BaseException as error:
                conn.close()  # whatever became of its request, a closed session holds nothing
                if isinstance(error, psycopg.Error):
                    raise _unavailable() from error
                raise
            finally:
                self._count_waiting(-1)
            log.debug("command.waited_for_first_run: %s", command_id)
            try:
                yield row
            finally:
                self._unlock(conn, [key])
        finally:
            self._pool.putconn(conn)

    # -- letting go -----------------------------------------------------------------------------

    def _release_later(self, release: _Release) -> bool:
        """Hand an unlock on the shared session to the releasing thread, which ends the turn
        after it: the execution's answer does not wait for that round trip, and the unlocks of
        executions ending together go in one statement. False (once closed): unlocked here."""
        with self._releasing:
            if not self._closed and self._start_releaser():
                self._releases.put(release)
                return True
        self._unlock(release.conn, [release.key])
        return False

    def _start_releaser(self) -> bool:
        """Whether the releasing thread runs (started now if need be)."""
        if self._releaser is None:
            releaser = threading.Thread(
                target=self._release_loop, name="command-locks-release", daemon=True
            )
            try:
                releaser.start()
            except RuntimeError:  # no thread to be had: the caller unlocks itself
                return False
            self._releaser = releaser
        return True

    def _release_loop(self) -> None:
        while True:
            batch = [self._releases.get()]
            with contextlib.suppress(queue.Empty):
                while True:
                    batch.append(self._releases.get_nowait())
            releases = [release for release in batch if release is not None]
            sessions = {id(release.conn): release.conn for release in releases}
            try:
                for conn in sessions.values():
                    self._unlock(conn, [r.key for r in releases if r.conn is conn])
            except Exception:  # never leave a turn held: drop the session instead
                log.exception("command_locks.release_failed")
                for conn in sessions.values():
                    self._drop(conn)
            finally:
                for release in releases:
                    self._end_turn(release.key, release.turn)
            if len(releases) < len(batch):
                return  # closed

    def _unlock(self, conn: Connection[TupleRow], keys: list[int]) -> None:
        """Let go of the locks; a session that cannot say it did is closed, so that no lock of
        an id outlives its execution on a session kept open."""
        statement = ("SELECT " + ", ".join(_UNLOCK.format(key=key) for key in keys)).encode()
        try:
            row = conn.execute(statement).fetchone()
        except psycopg.Error:
            if conn is self._shared:
                self._drop(conn)
            else:
                conn.close()
            return
        if row is None or not all(row):
            log.warning("command_locks.not_held: keys %s on a session that lost them", keys)

    def _getconn(self) -> Connection[TupleRow]:
        try:
            conn: Connection[TupleRow] = self._pool.getconn()
        except PoolTimeout:
            raise _unavailable() from None
        return conn

    def _still_running(self, command_id: str) -> Unavailable:
        return Unavailable(
            f"an earlier request with commandId {command_id} is still running (it did not end "
            f"within {self.wait_seconds:g} s); send it again shortly to get its result",
            retry_after_seconds=1.0,
        )


def literal(text: str) -> str:
    """``text`` as an SQL string literal, for sessions with standard-conforming strings (this
    module's are held to them)."""
    return "'" + text.replace("'", "''") + "'"


def _only(cursor: Cursor[TupleRow]) -> bool:
    row = cursor.fetchone()
    return row is not None and bool(row[0])


def _unavailable() -> Unavailable:
    return Unavailable(
        "the database is unavailable or has no free connection; nothing was written, retry shortly",
        retry_after_seconds=1.0,
    )
