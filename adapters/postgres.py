"""PostgreSQL connection pools that ride out a database restart.

Every pool of every process (the event store's, the API's, the projectors') is a
:class:`ResilientPool`:

* a connection that sat idle in the pool for more than :data:`CHECK_IDLE_AFTER` is checked
  (``ConnectionPool.check_connection``, one empty round trip) before it is lent; a broken one (the
  server restarted under it) is dropped at once and the next one taken, so the first request
  after a restart does not fail on a stale connection. A connection given back moments ago is
  lent unchecked (HikariCP's "alive bypass window"): a restart takes longer than that window, so
  such a connection cannot have outlived its server unnoticed, and a busy pool does not pay an
  extra round trip per request (a failure while it is used answers ``UNAVAILABLE`` all the same);
* while the server is down the pool keeps trying to reconnect at most every half second (psycopg's
  own backoff doubles without bound, so after a minute's outage the pool would only notice the
  server was back up to a minute later);
* a request waits at most ``timeout`` for a connection (a busy pool, setting
  ``AGENTWORKS_POOL_TIMEOUT``), and only :data:`OUTAGE_WAIT` while the server is known to be down,
  then fails with :class:`~psycopg_pool.PoolTimeout`, which callers answer as ``UNAVAILABLE``;
* what is down, and when it is back, is reported to :data:`adapters.outages.OUTAGES` (one log line
  each way, not one per request).

psycopg_pool's own ``check=`` option is not used: after a failed check it sleeps with its
reconnection backoff (1 s, 2 s, 4 s …) before taking the next connection, so a pool full of
connections broken by a restart would take many seconds to drain.

Each component (write side, API, projectors, relay) logs in as a role of its own rather than
connecting as a powerful user and ``SET ROLE``-ing: a session can always ``RESET ROLE`` back to
the user it logged in as, so only the login itself is a boundary (:func:`login_url`).
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import psycopg
from eventsourcing.postgres import ConnectionPool as LibraryPool
from psycopg import Connection
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import DictRow, dict_row
from psycopg_pool import PoolTimeout
from psycopg_pool.base import AttemptWithBackoff
from psycopg_pool.pool import ConnectionPool

from adapters.outages import OUTAGES

PROJECTOR_ROLE = "agentworks_projector"
API_ROLE = "agentworks_api"
RELAY_ROLE = "agentworks_relay"


def login_url(database_url: str, role: str | None, password: str | None = None) -> str:
    """``database_url`` logging in as ``role`` with ``password`` instead of its own user.

    Host, port, database and options are kept; ``user`` and ``password`` (in the authority and
    in the query string alike) are replaced, percent-encoded. A ``key=value`` connection string
    stays one, quoted as libpq wants. ``role=None`` keeps the URL as is.
    """
    if role is None:
        return database_url
    if "://" not in database_url:
        params = {k: v for k, v in conninfo_to_dict(database_url).items() if k != "password"}
        params["user"] = role
        if password is not None:
            params["password"] = password
        return make_conninfo("", **params)
    parts = urlsplit(database_url)
    hosts = parts.netloc.rpartition("@")[2]
    userinfo = quote(role, safe="")
    if password is not None:
        userinfo += ":" + quote(password, safe="")
    query = "&".join(
        item
        for item in parts.query.split("&")
        if item and unquote(item.partition("=")[0]) not in ("user", "password")
    )
    return urlunsplit((parts.scheme, f"{userinfo}@{hosts}", parts.path, query, parts.fragment))


DEFAULT_POOL_TIMEOUT = 2.0
OUTAGE_WAIT = 0.25
"""How long a request waits for a connection while its server is known to be down."""
CHECK_IDLE_AFTER = 0.25
"""Seconds a connection may sit idle in the pool and still be lent without a check."""
CONNECT_TIMEOUT = 3
"""Seconds a connection attempt may take (libpq's ``connect_timeout``): a server that does not
answer at all (a dropped network rather than a refused port) fails like a refused one."""

CONNECTION_OPTIONS: dict[str, int] = {
    "connect_timeout": CONNECT_TIMEOUT,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,
}
"""libpq options of every connection: a server that stops answering on a connection already
open (a network partition, a failed-over primary's vanished host: packets dropped, no reset)
fails it within about ten seconds. With the kernel's defaults a statement sent into the silence
waited some fifteen minutes of retransmissions, one waiting for its answer two hours of idle
before the first keepalive probe: the request hung, holding its pool connection and worker
thread, and after a failover the pool stayed stuck on the old server's connections.
``tcp_user_timeout`` (ms) bounds how long sent data may go unacknowledged, the keepalives how
long a connection waiting for an answer may hear nothing from the server's host (a query that
runs long on a live server is not cut: its host answers the probes)."""


def connection_options(conninfo: str) -> dict[str, Any]:
    """:data:`CONNECTION_OPTIONS` that ``conninfo`` does not set itself (an operator's own
    ``?keepalives_idle=`` in the URL wins)."""
    given = conninfo_to_dict(conninfo)
    return {name: value for name, value in CONNECTION_OPTIONS.items() if name not in given}


def connect(conninfo: str, **kwargs: Any) -> Connection[Any]:
    """A connection of its own, outside any pool (a lock held for a session, a LISTEN, a read
    now and then), with :func:`connection_options` as the pools have them; ``kwargs`` are
    psycopg's own (``autocommit``, a server ``options`` string)."""
    return psycopg.connect(conninfo, **{**connection_options(conninfo), **kwargs})


class _Reconnect(AttemptWithBackoff):
    """psycopg's reconnection backoff, starting at 0.1 s and never above 0.5 s."""

    INITIAL_DELAY = 0.1
    MAX_DELAY = 0.5

    def update_delay(self, now: float) -> None:
        super().update_delay(now)
        self.delay = min(self.delay, self.MAX_DELAY)


class ResilientPool(LibraryPool[Any]):
    """A connection pool that checks before lending and reconnects promptly (module docstring)."""

    def __init__(self, *args: Any, dependency: str, **kwargs: Any) -> None:
        self.dependency = dependency
        self._returned_at: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        self._doubt_since = 0.0
        """Connections given back before this moment are checked whatever their idle time: the
        server failed a connection or an attempt since (it may have restarted under them)."""
        super().__init__(*args, **kwargs)

    def putconn(self, conn: Connection[Any]) -> None:
        now = time.monotonic()
        if conn.broken:
            # It failed in use: its siblings given back until now may be just as dead.
            self._doubt_since = now
        self._returned_at[conn] = now
        super().putconn(conn)

    def _needs_check(self, conn: Connection[Any]) -> bool:
        returned = self._returned_at.get(conn)
        return (
            returned is None
            or returned <= self._doubt_since
            or time.monotonic() - returned > CHECK_IDLE_AFTER
        )

    def getconn(self, timeout: float | None = None) -> Connection[Any]:
        budget = self.timeout if timeout is None else timeout
        if OUTAGES.is_down(self.dependency):
            budget = min(budget, OUTAGE_WAIT)
        deadline = time.monotonic() + budget
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if OUTAGES.is_down(self.dependency):
                    raise PoolTimeout(f"the database ({self.dependency}) is unavailable")
                raise PoolTimeout(
                    f"no database connection free within {budget:.2f} s "
                    f"(pool {self.name!r}, {self.max_size} connections)"
                )
            try:
                # In slices, so a wait that began before the server was seen to go ends as
                # soon as it is (a reconnection attempt failed meanwhile).
                conn: Connection[Any] = super().getconn(min(remaining, OUTAGE_WAIT))
            except PoolTimeout:
                if OUTAGES.is_down(self.dependency):
                    raise PoolTimeout(f"the database ({self.dependency}) is unavailable") from None
                continue
            if not self._needs_check(conn):
                # Lent unchecked: it says nothing about the server, so it marks nothing up.
                return conn
            try:
                ConnectionPool.check_connection(conn)
            except psycopg.Error:
                # Broken (the server restarted under it): returning it discards it and has the
                # pool open a replacement; take the next one straight away. Every other
                # connection given back until now is in doubt too.
                self._doubt_since = time.monotonic()
                self.putconn(conn)
                continue
            OUTAGES.up(self.dependency)
            return conn

    def _connect(self, timeout: float | None = None) -> Connection[Any]:
        try:
            conn: Connection[Any] = super()._connect(timeout=timeout)
        except psycopg.OperationalError as error:
            self._doubt_since = time.monotonic()
            OUTAGES.down(self.dependency, error)
            raise
        OUTAGES.up(self.dependency)
        return conn

    def _add_connection(self, attempt: AttemptWithBackoff | None, growing: bool = False) -> None:
        super()._add_connection(attempt or _Reconnect(timeout=self.reconnect_timeout), growing)


_CONNECT_FAILED = "error connecting in %r: %s"
"""psycopg_pool's warning for each failed connection attempt (``pool.py``, ``_add_connection``)."""


class ReportedConnectFailures(logging.Filter):
    """Drops psycopg_pool's warning for each failed connection attempt of a pool.

    Every pool here is a :class:`ResilientPool`, which reports each failure to
    :data:`~adapters.outages.OUTAGES`: that logs ``dependency.down`` (with the error) once per
    outage. Retrying every 0.5 s, each pool of each process also had psycopg log one warning
    per attempt for as long as the server was away (several lines a second per process), which
    buried the one line an operator needs. The pool's other warnings (a connection found broken,
    reconnection given up) stay.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != _CONNECT_FAILED


def dependency_name(conninfo: str | dict[str, Any]) -> str:
    """How outages name a database as one login reaches it: ``postgresql host:port/dbname as
    role`` (a database, not only its server: one dropped is down for its users while others are
    not; and per login, since a server refuses one role while it lets others in, and a process
    logs in as several: named alike, one role's refusal and another's success said the database
    was down and up again at every attempt)."""
    parts = conninfo_to_dict(conninfo) if isinstance(conninfo, str) else conninfo
    host = parts.get("host") or "localhost"
    name = f"postgresql {host}:{parts.get('port') or 5432}/{parts.get('dbname') or ''}"
    return f"{name} as {parts['user']}" if parts.get("user") else name


def make_pool(
    database_url: str,
    *,
    role: str | None = None,
    password: str | None = None,
    min_size: int = 1,
    max_size: int = 4,
    name: str = "agentworks",
    timeout: float = DEFAULT_POOL_TIMEOUT,
) -> ConnectionPool[Connection[DictRow]]:
    """A pool whose sessions log in as ``role`` (default: the URL's own user).

    Privileges and row-level security then apply to everything the component does, not only to
    the queries someone remembered to scope. ``timeout``: the longest a caller waits for a free
    connection before the pool answers that it has none.
    """
    login = login_url(database_url, role, password)
    pool: ConnectionPool[Connection[DictRow]] = ResilientPool(
        login,
        min_size=min_size,
        max_size=max_size,
        kwargs={"row_factory": dict_row, **connection_options(login)},
        connection_class=Connection[DictRow],
        name=name,
        open=False,
        timeout=timeout,
        dependency=dependency_name(login),
    )
    pool.open(wait=True, timeout=30)
    return pool
