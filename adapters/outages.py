"""Which dependencies are down, noticed and logged once per change rather than once per request.

During a database restart every request, pool worker and tailer meets the same failure; logging
each would bury the one line an operator needs. Components report what they see
(:meth:`Outages.down` on a failure to reach a dependency, :meth:`Outages.up` on a success); the
tracker logs ``dependency.down`` on the first failure and ``dependency.up`` (with how long it was
down) on the first success after it, and keeps ``agentworks_dependency_up`` current.

A dependency is named by what is down, e.g. ``postgresql 127.0.0.1:5432``: every pool and
listener of one server shares one state, so a process says once that the server is gone.
"""

from __future__ import annotations

import threading
import time

import psycopg
import structlog
from eventsourcing.persistence import InterfaceError, OperationalError, PersistenceError
from prometheus_client import Gauge
from redis.exceptions import TimeoutError as RedisTimeoutError

from domain.errors import Unavailable

log = structlog.get_logger(__name__)

DEPENDENCY_UP = Gauge(
    "agentworks_dependency_up",
    "1 while this process reaches the dependency, 0 from its first failure until it is back.",
    ["dependency"],
)


REDIS = "redis"
"""How outages name the Redis of rate limits and subscriptions."""


class Outages:
    """Up/down state per dependency, process-wide (every pool of a process shares it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._down_since: dict[str, float] = {}

    def down(self, dependency: str, error: BaseException | str) -> None:
        """Report a failure to reach ``dependency``; logged only if it was up until now."""
        with self._lock:
            if dependency in self._down_since:
                return
            self._down_since[dependency] = time.monotonic()
            # Under the lock that decided it: set after it, an ``up`` racing in between could
            # set 1 first and leave the gauge saying down while the state says up.
            DEPENDENCY_UP.labels(dependency).set(0)
        log.warning("dependency.down", dependency=dependency, error=_one_line(error))

    def up(self, dependency: str) -> None:
        """Report a success with ``dependency``; logged only if it was down until now."""
        if dependency not in self._down_since:  # the hot path: no lock while all is well
            return
        with self._lock:
            since = self._down_since.pop(dependency, None)
            if since is None:
                return
            DEPENDENCY_UP.labels(dependency).set(1)
        log.warning(
            "dependency.up", dependency=dependency, down_seconds=round(time.monotonic() - since, 3)
        )

    def is_down(self, dependency: str) -> bool:
        return dependency in self._down_since

    def down_now(self) -> list[str]:
        with self._lock:
            return sorted(self._down_since)


class RetryGate:
    """Whether a call should try a dependency now, for callers that can go on without it.

    While the dependency answers, or fails at once (a refused connection), every call tries.
    Once a call timed out, calls go without it for ``first`` seconds, then one call tries
    again (the others still go without), the wait doubling up to ``longest`` while it keeps
    timing out. A dependency that does not answer at all (hung, or its network partitioned)
    costs each call that tries a socket timeout: without this every request waited that long,
    not one now and then. A failure that cost no wait leaves every call trying, so the first
    call after the dependency is back finds it.
    """

    def __init__(self, *, first: float = 0.5, longest: float = 15.0) -> None:
        self._first = first
        self._longest = longest
        self._wait = first
        self._next_try = 0.0
        self._failing = False
        self._lock = threading.Lock()

    def may_try(self) -> bool:
        if not self._failing:  # the hot path: no lock while all is well
            return True
        now = time.monotonic()
        with self._lock:
            if now < self._next_try:
                return False
            # This call tries; the others go without until it has failed or succeeded.
            self._next_try = now + self._wait
            return True

    def failed(self, error: BaseException) -> None:
        if not isinstance(error, TimeoutError | RedisTimeoutError):
            return
        with self._lock:
            self._next_try = time.monotonic() + self._wait
            self._wait = min(self._wait * 2, self._longest)
            self._failing = True

    def succeeded(self) -> None:
        if not self._failing:
            return
        with self._lock:
            self._failing = False
            self._wait = self._first
            self._next_try = 0.0


def is_outage(error: BaseException) -> bool:
    """Whether ``error`` says a database could not be reached (rather than a bug, or a server
    that answered with an error): our UNAVAILABLE, a pool with no connection to lend, a lost
    or refused connection, a server shutting down or starting up. Loops that retry quietly on
    an outage must not retry quietly on anything else (a full disk would go unnoticed)."""
    if isinstance(error, Unavailable):
        return True
    cause: BaseException = error
    if isinstance(error, InterfaceError | OperationalError) and error.__cause__ is not None:
        cause = error.__cause__  # the library's translation of psycopg's error
    if isinstance(cause, psycopg.OperationalError | psycopg.InterfaceError):
        state = cause.sqlstate
        # No SQLSTATE: failed on our side of the socket (refused, closed, pool time-out);
        # class 08: connection exception; 57P01-03: admin/crash shutdown, cannot connect now.
        return state is None or state.startswith(("08", "57P"))
    return isinstance(cause, InterfaceError | OperationalError)


# Code outside adapters/ meets the driver's and the store library's errors on connections it
# holds itself (projectors, the relay's position and lease, readiness checks). It asks these
# questions instead of naming psycopg's or eventsourcing's classes, so what counts as which
# stays decided here.

#: Failures of the database, the connection to it or the deployment (a missing table or grant),
#: not of the data a statement carried.
_INFRASTRUCTURE: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    psycopg.errors.InsufficientPrivilege,
    psycopg.errors.UndefinedTable,
    psycopg.errors.UndefinedColumn,
    psycopg.errors.UndefinedFunction,
    MemoryError,
)
_RACES: tuple[type[BaseException], ...] = (
    psycopg.errors.UniqueViolation,
    psycopg.errors.DeadlockDetected,
)


def is_database_error(error: BaseException) -> bool:
    """Whether ``error`` is the database's (or the connection's) answer, of any kind."""
    return isinstance(error, psycopg.Error | PersistenceError)


def is_connection_error(error: BaseException) -> bool:
    """Whether the connection failed or was dropped (a restart, a timeout), not a statement."""
    return isinstance(error, psycopg.OperationalError)


def is_infrastructure_failure(error: BaseException) -> bool:
    """Whether ``error`` says the database, the connection or the deployment failed (a missing
    table or grant, no memory) rather than the data being written: retrying other data cannot
    help, so it is never a reason to set one item aside.

    A limit of PostgreSQL's exceeded (SQLSTATE class 54: an index entry or a tsvector too large,
    an expression too deep) is the data's doing, although psycopg raises it as an
    ``OperationalError``: retried, the same data meets the same limit, for ever."""
    if isinstance(error, psycopg.errors.ProgramLimitExceeded | psycopg.errors.StatementTooComplex):
        return False
    return isinstance(error, _INFRASTRUCTURE)


def is_write_race(error: BaseException) -> bool:
    """Whether ``error`` is a race with a concurrent writer (a unique key taken meanwhile, a
    deadlock): the same write, tried again, may succeed."""
    return isinstance(error, _RACES)


def _one_line(error: BaseException | str) -> str:
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return " ".join(text.split())[:300]


OUTAGES = Outages()
"""The process's tracker (like the Prometheus registry, one per process)."""
