"""Reading the read models as one caller in one workspace, row-level security doing the scoping.

A :class:`ReadScope` is one caller's view of one workspace for one request (or one subscription
event). On first use it takes a connection from the API-role pool, opens a transaction and sets
``agentworks.workspace_id`` for it (``set_config(..., true)``), so every ``rm_*`` row of another
workspace is invisible to every statement, whatever the Python around it does. It then checks
that the caller is still a member of the workspace: a token outlives a removal, membership does
not. All of a request's reads share that transaction (READ COMMITTED: each statement sees what
is committed when it starts, which is what a read after a consistency wait needs).

A subscription's scope does not keep its connection (``keep_connection=False``): each read
takes one, sets the workspace, reads and gives it back. A subscription spends its life waiting
(for a broadcast, or for a slow client to take what was sent); a connection held through that
wait would be one the pool cannot lend, and enough subscriptions would drain it. Their reads
also pass a ``gate`` (a semaphore for a share of the pool), so that a burst of them (a storm of
subscribes, a board change fanned out to many subscribers) waits in the event loop rather than
taking every connection and worker thread from the queries.

Blocking work (psycopg, the write side) runs on the API's worker threads (:class:`Offloader`).
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ParamSpec, Self, TypeVar, cast, overload
from uuid import UUID

import psycopg
from psycopg.rows import DictRow

from domain.errors import NotFound, Unavailable
from domain.roles import Role
from projections.kanban_queries import member_role, scope_to_workspace
from projections.progress_queries import scope_reading_version
from read_api.loaders import Loaders

if TYPE_CHECKING:
    from psycopg import Connection
    from psycopg._compat import Template
    from psycopg.abc import Params, Query, QueryNoTemplate
    from psycopg_pool import ConnectionPool

T = TypeVar("T")
P = ParamSpec("P")

_thread = threading.local()


class StatementCounter:
    """Counts SQL statements run on behalf of one request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    def add(self) -> None:
        with self._lock:
            self.count += 1


class CountingCursor(psycopg.Cursor[DictRow]):
    """A cursor that counts its statements against the request running on this thread."""

    @overload
    def execute(
        self,
        query: QueryNoTemplate,
        params: Params | None = None,
        *,
        prepare: bool | None = None,
        binary: bool | None = None,
    ) -> Self: ...

    @overload
    def execute(
        self, query: Template, *, prepare: bool | None = None, binary: bool | None = None
    ) -> Self: ...

    def execute(
        self,
        query: Query,
        params: Params | None = None,
        *,
        prepare: bool | None = None,
        binary: bool | None = None,
    ) -> Self:
        counter: StatementCounter | None = getattr(_thread, "counter", None)
        if counter is not None:
            counter.add()
        # psycopg's own implementation takes either kind of query; only its overloads split them.
        return super().execute(
            cast("QueryNoTemplate", query), params, prepare=prepare, binary=binary
        )


def unavailable(error: BaseException) -> Unavailable:
    """The answer to a read that the database could not serve."""
    if "no database connection free" in str(error):
        return Unavailable("the API is at its database connection limit; retry shortly")
    return Unavailable("the database is unavailable; retry shortly")


class Offloader:
    """Runs blocking calls on a bounded pool of worker threads."""

    def __init__(self, threads: int) -> None:
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="api-io")

    async def run(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


@dataclass(kw_only=True, eq=False)
class ReadScope:
    """One caller's transaction-scoped view of one workspace's read models."""

    pool: ConnectionPool[Connection[DictRow]] = field(repr=False)
    offloader: Offloader = field(repr=False)
    workspace_id: UUID
    user_id: str
    counter: StatementCounter = field(repr=False)
    statement_timeout_ms: int
    keep_connection: bool = True
    gate: asyncio.Semaphore | None = field(default=None, repr=False)
    versioned: bool = False
    version: str | None = field(init=False, default=None)
    """With ``versioned``: the read models' version when the scope's first transaction
    began, read in its first statement, so every row it reads afterwards is at least as new
    (``read_api.response_cache``)."""
    _conn: Connection[DictRow] | None = field(init=False, default=None, repr=False)
    _member: bool | None = field(init=False, default=None, repr=False)
    _role: Role | None = field(init=False, default=None, repr=False)
    _closed: bool = field(init=False, default=False, repr=False)
    _async_lock: asyncio.Lock = field(init=False, default_factory=asyncio.Lock, repr=False)
    _sync_lock: threading.Lock = field(init=False, default_factory=threading.Lock, repr=False)
    _loaders: Loaders | None = field(init=False, default=None, repr=False)

    @property
    def loaders(self) -> Loaders:
        """This scope's DataLoaders: one batch query per kind of object per tick."""
        if self._loaders is None:
            self._loaders = Loaders(self)
        return self._loaders

    async def run(self, fn: Callable[[Connection[DictRow]], T]) -> T:
        """Run ``fn`` with this scope's connection on a worker thread.

        Raises :class:`NotFound` when the caller is not a member of the workspace, so that a
        workspace one may not see looks exactly like one that does not exist.
        """
        async with self._async_lock:
            if self.gate is None:
                return await self.offloader.run(self._run, fn)
            async with self.gate:
                return await self.offloader.run(self._run, fn)

    async def is_member(self) -> bool:
        try:
            await self.run(lambda conn: None)
        except NotFound:
            return False
        return True

    async def member_role(self) -> Role:
        """The caller's membership role in this workspace, as read with the membership check
        (no statement of its own); :class:`NotFound` when the caller is not a member."""
        await self.run(lambda conn: None)
        assert self._role is not None  # (run raised NotFound otherwise)
        return self._role

    async def close(self) -> None:
        """End the transaction and give the connection back; safe to call twice.

        Also safe while a read is still running on a worker thread (the task that awaited it was
        cancelled, a client having gone): that read sees the scope closed when it ends and gives
        the connection back itself, so a cancelled read never leaves one idle in a transaction.
        """
        self._closed = True
        if self._conn is not None:
            await asyncio.shield(self.offloader.run(self._release))

    def _run(self, fn: Callable[[Connection[DictRow]], T]) -> T:
        with self._sync_lock:
            if self._closed:
                raise RuntimeError("read scope used after its request ended")
            _thread.counter = self.counter
            try:
                conn = self._connection()
                if not self._member:
                    raise NotFound(f"workspace {self.workspace_id} does not exist")
                try:
                    return fn(conn)
                except psycopg.Error:
                    # The transaction is aborted; the next call starts a fresh one.
                    self._release_locked()
                    raise
            except psycopg.OperationalError as error:
                # No connection free, the server gone, or a statement timed out: an outage or
                # overload, not a bug; the client is told to come back (UNAVAILABLE, 503).
                raise unavailable(error) from error
            finally:
                _thread.counter = None
                if self._closed or not self.keep_connection:
                    self._release_locked()

    def _connection(self) -> Connection[DictRow]:
        if self._conn is not None:
            return self._conn
        conn = self.pool.getconn()
        try:
            conn.cursor_factory = CountingCursor
            if self.versioned and self.version is None:
                self.version = scope_reading_version(
                    conn, self.workspace_id, statement_timeout_ms=self.statement_timeout_ms
                )
            else:
                scope_to_workspace(
                    conn, self.workspace_id, statement_timeout_ms=self.statement_timeout_ms
                )
            if self._member is None:
                role = member_role(conn, self.workspace_id, self.user_id)
                self._role = None if role is None else Role(role)
                self._member = role is not None
        except BaseException:
            self._give_back(conn)
            raise
        self._conn = conn
        return conn

    def _release(self) -> None:
        with self._sync_lock:
            self._release_locked()

    def _release_locked(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._give_back(conn)

    def _give_back(self, conn: Connection[DictRow]) -> None:
        try:
            if not conn.closed:
                conn.rollback()
        except psycopg.Error:
            pass  # a broken connection: the pool discards it
        self.pool.putconn(conn)
