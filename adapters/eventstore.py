"""The PostgreSQL event store: the eventsourcing library's recorder without its table lock.

The library serialises writers with ``LOCK TABLE ... IN EXCLUSIVE MODE`` held until commit, so
that notification ids are committed in number order and a tailing reader never passes a gap that
a slower transaction fills later. Holding a lock across the commit's WAL flush makes every writer
wait for every other writer's fsync.

This recorder keeps the guarantee with a shorter critical section and a reader-side rule:

* a writer takes a session-level advisory lock, inserts its events (which assigns both its
  transaction id and its notification ids while the lock is held), releases the lock and only
  then commits — so commits, and their fsyncs, overlap;
* because ids and transaction ids are handed out under the same lock, a transaction with a lower
  transaction id always holds lower notification ids; a reader therefore only returns rows whose
  ``transaction_id`` is older than the oldest transaction still running in the reader's
  snapshot. Every transaction that could still commit a lower id is newer than that horizon, so
  nothing returned can be overtaken.

Appends that arrive while another is being written are written next as one group, in one
transaction (:class:`GroupCommit`): the fixed cost of a transaction (round trips, statements,
the commit's WAL flush) is shared by the group, while each append keeps its own notification ids,
command record, version checks and read check, and fails alone when it conflicts.

Transaction ids are server-wide, so the horizon leaves out transactions that ``pg_locks`` shows
belong to another database: a long transaction elsewhere on the cluster does not stall fan-out.
One that ends between a read's snapshot and that look-up can no longer be placed and is kept,
to be safe; the read is then made again at once (``_HORIZON``), so that it is not cut short.
A long-running writing transaction in this database still holds readers (never writers) back
until it ends; keep write transactions here short.
"""

from __future__ import annotations

import json
import re
import threading
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal
from uuid import UUID

import psycopg
import structlog
from eventsourcing.persistence import (
    ApplicationRecorder,
    DataError,
    IntegrityError,
    InterfaceError,
    Notification,
    OperationalError,
    ProgrammingError,
    StoredEvent,
    Subscription,
)
from eventsourcing.postgres import (
    PostgresAggregateRecorder,
    PostgresApplicationRecorder,
    PostgresDatastore,
    PostgresFactory,
    PostgresSubscription,
)
from eventsourcing.utils import Environment, EnvType, retry
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus
from psycopg.rows import tuple_row
from psycopg.sql import SQL, Composed, Identifier

from adapters.command_locks import CommandLocks, literal
from adapters.metrics import COMMIT_GROUP_SIZE, EVENTS_APPENDED
from adapters.postgres import (
    CONNECTION_OPTIONS,
    DEFAULT_POOL_TIMEOUT,
    ResilientPool,
    dependency_name,
)
from domain.errors import Conflict, DuplicateCommand, Unavailable
from domain.idempotency import CommandRecord, StoredCommand

if TYPE_CHECKING:
    from psycopg import Connection, Cursor
    from psycopg.rows import DictRow

log = structlog.get_logger(__name__)

POOL_TIMEOUT_ENV = "AGENTWORKS_POOL_TIMEOUT"
"""Longest wait for a free connection of the store's pool (seconds, may be fractional)."""

CONNINFO_ENV = "AGENTWORKS_STORE_CONNINFO"
"""The database URL's parameters beyond the five the library takes (``sslmode``,
``sslrootcert``, ``options``...), as a ``key=value`` connection string."""

_BEGIN, _COMMIT = SQL("BEGIN"), SQL("COMMIT")

# The horizon of a statement, as a one-row relation: ``below``, the oldest transaction that was
# running when the statement's snapshot was taken and is not known to belong to another database
# (transaction ids are server-wide; a long transaction in another database must not hold our
# readers back), or the snapshot's xmax when there is none; and ``moved``, whether that
# transaction had ended by the time it was looked up. Such a transaction left no lock to tell
# its database by, so it is kept, to be safe; but a statement begun now would not have it in its
# snapshot at all: a reader that sees ``moved`` reads again at once
# (:meth:`EventStoreRecorder.read_under_horizon`).
_HORIZON = """WITH horizon AS MATERIALIZED (
    SELECT coalesce(held, pg_snapshot_xmax(pg_current_snapshot())) AS below,
        coalesce(pg_xact_status(held) <> 'in progress', false) AS moved
    FROM (SELECT min(running) AS held
        FROM pg_snapshot_xip(pg_current_snapshot()) AS running
        WHERE mod(running::text::bigint, 4294967296) NOT IN (
            SELECT lock.transactionid::text::bigint
            FROM pg_locks AS lock JOIN pg_stat_activity AS backend ON backend.pid = lock.pid
            WHERE lock.locktype = 'transactionid'
              AND backend.datname IS DISTINCT FROM current_database())) AS kept)"""

_REREADS = 3
"""How many times a read whose horizon had moved is made again before it is taken as it is
(each time, another transaction of its snapshot must have ended in that same moment)."""


@dataclass
class _Attempt:
    """How far one append got: what the caller needs to tell "not written" from "unknown"."""

    phase: Literal["statements", "committing", "committed"] = "statements"
    transaction_id: str | None = None
    notification_ids: list[int] = field(default_factory=list)


@dataclass(eq=False)
class _Pending:
    """One caller's append while it waits to be written, alone or in a group, and its outcome."""

    count: int
    columns: tuple[list[Any], ...] | None
    command: CommandRecord | None
    reads: tuple[list[UUID], list[int]] | None
    woken: threading.Event = field(default_factory=threading.Event)
    promoted: bool = False
    done: bool = False
    alone: bool = False
    notification_ids: list[int] = field(default_factory=list)
    error: BaseException | None = None

    # Cached: every group taken while this append waits compares them again.
    @cached_property
    def writes(self) -> frozenset[UUID]:
        return frozenset(self.columns[0]) if self.columns is not None else frozenset()

    @cached_property
    def read_ids(self) -> frozenset[UUID]:
        return frozenset(self.reads[0]) if self.reads is not None else frozenset()

    @property
    def key(self) -> tuple[str, str] | None:
        return (self.command.scope, self.command.command_id) if self.command else None


class GroupCommit:
    """Leader/follower group commit: the appends that arrive while the writers are busy are
    written next, together, in one transaction each.

    Each transaction pays a fixed cost (round trips, psycopg's work per statement, the server's
    per-statement and commit work, one WAL flush) that is most of a small command's; a group
    divides it by its size. Up to ``max_in_flight`` transactions are written at once, each by
    a caller's own thread (its leader): an append that finds a writer free is written at once
    (no added latency when alone), those arriving while every writer is busy queue, and when a
    write ends the first of them leads the next group, so no extra thread is needed. With one
    writer, appends that must wait for each other (below) would also hold up every independent
    append of the process behind them: a workload of many commands on a few hot aggregates (an
    orchestrator's runs on one card, charging one month) ran at a third of its rate.

    A group never holds two appends to one aggregate, two records of one command, or an append
    next to one that read what it writes, and never one that touches what a transaction in
    flight writes or reads (those wait for a later group): within the process nothing can
    conflict, and what conflicts with a writer elsewhere is found by the group's transaction.
    """

    def __init__(self, *, max_appends: int, max_events: int, max_in_flight: int = 1) -> None:
        self.max_appends = max_appends
        self.max_events = max_events
        self.max_in_flight = max(0, max_in_flight)
        """Most transactions written at once; 0 writes every append at once, alone, by its own
        thread (no group commit)."""
        self.sizes: Counter[int] = Counter()
        """How many transactions wrote how many appends, since this recorder was made."""
        self._lock = threading.Lock()
        self._queue: list[_Pending] = []
        self._leaders = 0
        self._in_flight: list[list[_Pending]] = []

    def written(self) -> Counter[int]:
        """A copy of :attr:`sizes`, safe to take while appends are being written."""
        with self._lock:
            return self.sizes.copy()

    @property
    def waiting(self) -> int:
        """Appends queued for a later group (those being written are not counted)."""
        with self._lock:
            return len(self._queue)

    @property
    def leading(self) -> int:
        """Threads writing (or about to write) a group now."""
        with self._lock:
            return self._leaders

    def submit(self, pending: _Pending, write: Callable[[list[_Pending]], None]) -> None:
        """Wait until ``pending`` was written (by this thread or a leader); its outcome is on it.

        ``write`` takes a group and records each member's outcome on it; it raises nothing.
        """
        if not self.max_in_flight:
            write([pending])
            pending.done = True
            COMMIT_GROUP_SIZE.observe(1)
            with self._lock:
                self.sizes[1] += 1
            return
        with self._lock:
            self._queue.append(pending)
            lead = self._leaders < self.max_in_flight
            if lead:
                self._leaders += 1
        while not pending.done:
            if lead:
                lead = self._lead(pending, write)
                continue
            pending.woken.wait()
            with self._lock:
                pending.woken.clear()
                lead, pending.promoted = pending.promoted, False

    def _lead(self, pending: _Pending, write: Callable[[list[_Pending]], None]) -> bool:
        """Write the next group; hand the lead on. True when this thread leads the next too."""
        with self._lock:
            group = self._take()
            if not group:
                # Everything queued waits for a transaction in flight, whose leader hands the
                # lead on when it ends.
                self._leaders -= 1
                return False
            self._in_flight.append(group)
        try:
            write(group)
        except BaseException as error:  # noqa: BLE001 - each member's caller raises it
            for member in group:
                member.error = member.error or error
        COMMIT_GROUP_SIZE.observe(len(group))
        with self._lock:
            self._in_flight.remove(group)
            self.sizes[len(group)] += 1
            for member in group:
                member.done = True
                if member is not pending:
                    member.woken.set()
            waiting = [member for member in self._queue if not member.promoted]
            if not waiting:
                self._leaders -= 1
                return False
            following = waiting[0]
            if following is pending:
                return True
            following.promoted = True
            following.woken.set()
            return False

    def _take(self) -> list[_Pending]:
        """The next group, in arrival order; what cannot join it stays queued, in order."""
        group: list[_Pending] = []
        rest: list[_Pending] = []
        writes: set[UUID] = set()
        reads: set[UUID] = set()
        commands: set[tuple[str, str]] = set()
        for flying in self._in_flight:
            for member in flying:
                writes |= member.writes
                reads |= member.read_ids
                if member.key is not None:
                    commands.add(member.key)
        events = 0
        for member in self._queue:
            member_writes, member_reads, key = member.writes, member.read_ids, member.key
            if (
                member.promoted  # handed a writer's place: it leads its own group
                or len(group) >= self.max_appends
                or (group and events + member.count > self.max_events)
                or not member_writes.isdisjoint(writes)
                or not member_writes.isdisjoint(reads)
                or not member_reads.isdisjoint(writes)
                or (key is not None and key in commands)
            ):
                rest.append(member)
                continue
            group.append(member)
            writes |= member_writes
            reads |= member_reads
            events += member.count
            if key is not None:
                commands.add(key)
        self._queue = rest
        return group


class StaleVersion(Conflict, IntegrityError):
    """An aggregate version this write appends was taken by a concurrent write.

    Also the library's ``IntegrityError``, so the recorder keeps the contract of the library's
    recorder test cases; our own code catches it as :class:`~domain.errors.Conflict`.
    """


class CommandAlreadyRecorded(DuplicateCommand, IntegrityError):
    """The command log holds this command's id already (its primary key refused the insert)."""


class StoreUnavailable(Unavailable, OperationalError):
    """The store could not be reached or lent no connection; nothing was written."""


NOTHING_WRITTEN = (
    "the database is unavailable or has no free connection; nothing was written, retry shortly"
)


def _translated(error: Exception) -> Exception:
    """The error of ours that a library persistence error raised by a write or load means."""
    if isinstance(error, IntegrityError):
        if "command_log_pkey" in str(error):
            return CommandAlreadyRecorded(str(error))
        return StaleVersion(str(error))
    if isinstance(error, OperationalError | InterfaceError):
        return StoreUnavailable(NOTHING_WRITTEN, retry_after_seconds=1.0)
    return error


# The library retries reads ten times, 0.2 s apart, against stale pooled connections. Our pools
# check connections before lending them, so a failure means the server is down: answering it at
# once (UNAVAILABLE) beats holding a request for two seconds or more.
_select_events_once = PostgresAggregateRecorder.select_events.__wrapped__


class _ReadsOnce(PostgresAggregateRecorder):
    """The library's aggregate reads, without its retries, raising :class:`StoreUnavailable`."""

    def select_events(
        self,
        originator_id: UUID | str,
        *,
        gt: int | None = None,
        lte: int | None = None,
        desc: bool = False,
        limit: int | None = None,
    ) -> Sequence[StoredEvent]:
        try:
            events: Sequence[StoredEvent] = _select_events_once(
                self, originator_id, gt=gt, lte=lte, desc=desc, limit=limit
            )
        except (OperationalError, InterfaceError) as error:
            raise _translated(error) from error
        return events


class SnapshotRecorder(_ReadsOnce):
    """The library's aggregate recorder (snapshots), reading without its retries and raising
    our errors (:class:`StoreUnavailable`, :class:`StaleVersion`)."""

    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: object
    ) -> Sequence[int] | None:
        try:
            ids: Sequence[int] | None = super().insert_events(stored_events, **kwargs)
        except (IntegrityError, OperationalError, InterfaceError) as error:
            raise _translated(error) from error
        return ids


class EventStoreRecorder(_ReadsOnce, PostgresApplicationRecorder):
    """Application recorder with overlapping commits, group commit and a snapshot-horizon
    reader rule."""

    def reachable(self, timeout: float) -> None:
        """Borrow a connection of the store's pool within ``timeout`` seconds and run an
        empty statement; raises what the pool or the database raise (readiness checks)."""
        with self.datastore.pool.connection(timeout=timeout) as conn:
            conn.execute("SELECT 1")

    group_max_appends = 32
    """Most appends (commands) written in one transaction by :class:`GroupCommit`."""
    group_max_events = 5000
    """Most events in one group transaction (a single larger append is still written)."""
    group_max_in_flight = 2
    """Most group transactions written at once by one recorder (each on its own connection);
    0 turns group commit off (see :meth:`StoredAgentWorks.write_each_command_alone`)."""

    def __init__(
        self, datastore: PostgresDatastore, *, events_table_name: str = "stored_events"
    ) -> None:
        super().__init__(datastore, events_table_name=events_table_name)
        table = Identifier(self.datastore.schema, self.events_table_name)
        key = zlib.crc32(f"{self.datastore.schema}.{self.events_table_name}".encode()) & 0x7FFFFFFF
        self._lock_sql = SQL("SELECT pg_advisory_lock({0})").format(key)
        self._unlock_sql = SQL("SELECT pg_advisory_unlock({0})").format(key)
        self.horizon = SQL("transaction_id < horizon.below")
        """The rule every reader of the log in global order applies: never past a position that
        a transaction still open may fill (see ``_HORIZON``); in a statement of
        :meth:`under_horizon`."""
        self.select_from = SQL(
            "SELECT notification_id, originator_id, originator_version, topic, state FROM {0}"
        ).format(table)
        """The log's columns as its readers take them: position, originator id and version,
        topic, state."""
        self._select_versions = self.under_horizon(
            SQL("SELECT notification_id, originator_id, originator_version, topic, ")
            + self.horizon
            + SQL(
                " AS settled FROM {0} WHERE notification_id > %s AND notification_id <= %s "
                "ORDER BY notification_id LIMIT %s"
            ).format(table)
        )
        self.max_notification_id_statement = self.under_horizon(
            SQL("SELECT MAX(notification_id) FROM {0} WHERE {1}").format(table, self.horizon)
        )
        self._insert_command_sql = SQL(
            "INSERT INTO command_log (scope, command_id, command_type, fingerprint, actor, result) "
            "VALUES (%s, %s, %s, %s, %s, %s::jsonb) RETURNING pg_current_xact_id()::text AS xid"
        )
        self._insert_command_with_position_sql = SQL(
            "INSERT INTO command_log (scope, command_id, command_type, fingerprint, actor, result) "
            "VALUES (%s, %s, %s, %s, %s, jsonb_set(%s::jsonb, '{{position}}', "
            "to_jsonb(currval(pg_get_serial_sequence({0}, 'notification_id'))))) "
            "RETURNING pg_current_xact_id()::text AS xid"
        ).format(f"{self.datastore.schema}.{self.events_table_name}")
        self._insert_binary_sql = SQL(
            "INSERT INTO {0} (originator_id, originator_version, topic, state, workspace_id) "
            "SELECT * FROM unnest(%b::uuid[], %b::int8[], %b::text[], %b::bytea[], %b::uuid[]) "
            "RETURNING notification_id, transaction_id::text AS transaction_id"
        ).format(table)
        self._moved_on_sql = SQL(
            "SELECT r.id FROM unnest(%b::uuid[], %b::int8[]) AS r(id, version) WHERE EXISTS "
            "(SELECT FROM {0} WHERE originator_id = r.id AND originator_version > r.version) "
            "LIMIT 1"
        ).format(table)
        self._notify_sql = SQL("NOTIFY {0}").format(Identifier(self.channel_name))
        # A group's command records, each with the position of its own last event (looked up
        # by the primary key: the group's events went in as one statement).
        self._insert_group_commands_sql = SQL(
            "INSERT INTO command_log (scope, command_id, command_type, fingerprint, actor, result) "
            "SELECT c.scope, c.command_id, c.command_type, c.fingerprint, c.actor, "
            "jsonb_set(c.result::jsonb, '{{position}}', to_jsonb(coalesce(e.notification_id, 0))) "
            "FROM unnest(%s::text[], %s::uuid[], %s::text[], %s::text[], %s::text[], %s::text[], "
            "%s::uuid[], %s::int8[]) AS c(scope, command_id, command_type, fingerprint, actor, "
            "result, last_id, last_version) "
            "LEFT JOIN {0} AS e ON e.originator_id = c.last_id "
            "AND e.originator_version = c.last_version "
            "RETURNING pg_current_xact_id()::text AS xid"
        ).format(table)
        self._group_moved_on_sql = SQL(
            "SELECT DISTINCT r.item FROM unnest(%b::uuid[], %b::int8[], %b::int8[]) "
            "AS r(id, version, item) WHERE EXISTS (SELECT FROM {0} "
            "WHERE originator_id = r.id AND originator_version > r.version)"
        ).format(table)
        self.lock_table_statements = []
        self.group_commit = GroupCommit(
            max_appends=self.group_max_appends,
            max_events=self.group_max_events,
            max_in_flight=self.group_max_in_flight,
        )

    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: object
    ) -> Sequence[int] | None:
        """Append events (and a command's idempotency record) in one transaction.

        Lock, insert, unlock and the command record go out in one pipelined round trip, so the
        advisory lock is never held while the client waits; the COMMIT (and its fsync) runs
        outside the lock, and NOTIFY follows the commit so it adds nothing to the commit path.

        ``unchanged_since`` (aggregate id -> version) names aggregates the write's decision read
        without changing: when one of them has a later version in the store, nothing is written
        and :class:`StaleVersion` is raised, as when a changed aggregate's version was taken.

        A failure before the COMMIT was sent wrote nothing: an unreachable store is raised as
        :class:`StoreUnavailable`, a version taken by a concurrent write as
        :class:`StaleVersion`, a command id recorded already as :class:`CommandAlreadyRecorded`
        (each also the library's error of that kind, so its recorder contract holds). A connection
        lost once the COMMIT was on its way leaves the outcome unknown to us: that is raised as
        :class:`~domain.errors.Unavailable` with ``outcome="unknown"`` and the transaction's id
        (``details["transaction_id"]``), which :meth:`PostgresCommandLog.committed` can settle
        once the server answers again. Nothing here retries: a retry after an unknown outcome
        could write twice, and a checked pool leaves no stale connection to retry around.
        """
        command = kwargs.get("command_record")
        if not isinstance(command, CommandRecord):
            command = None
        unchanged = kwargs.get("unchanged_since")
        reads = _versions(unchanged) if isinstance(unchanged, dict) and unchanged else None
        if not stored_events and command is None:
            return []
        try:
            return self._append(stored_events, command, reads)
        except (IntegrityError, OperationalError, InterfaceError) as error:
            raise _translated(error) from error

    def _append(
        self,
        stored_events: Sequence[StoredEvent],
        command: CommandRecord | None,
        reads: tuple[list[UUID], list[int]] | None,
    ) -> Sequence[int]:
        # Built before the lock is requested (the pipeline may already hold it on the server),
        # and by each caller's own thread rather than by the group's leader.
        pending = _Pending(
            count=len(stored_events),
            columns=_binary_columns(stored_events) if stored_events else None,
            command=command,
            reads=reads,
        )
        self.group_commit.submit(pending, self._write_group)
        if pending.alone:
            return self._append_alone(pending)
        if pending.error is not None:
            raise pending.error
        if len(pending.notification_ids) != pending.count:
            msg = f"expected {pending.count} notification ids, got {len(pending.notification_ids)}"
            raise ProgrammingError(msg)
        return pending.notification_ids

    def _write_group(self, group: list[_Pending]) -> None:
        """Write a group and record each member's outcome on it.

        A group of one is written as a lone append always was. A larger group is one
        transaction; if it is refused before its COMMIT (a version or command id taken by a
        writer elsewhere, an aggregate read that moved on, any statement failing), nothing of
        it was written and each member is written again on its own by its own thread, so that
        only the appends that conflict fail, each with its own error. A connection lost while
        the COMMIT was on its way leaves every member's outcome unknown, under the group's one
        transaction id.
        """
        if len(group) == 1:
            (only,) = group
            try:
                only.notification_ids = self._append_alone(only)
            except BaseException as error:  # noqa: BLE001 - raised by its caller's thread
                only.error = error
            return
        attempt = _Attempt()
        refused = False
        try:
            with self.datastore.get_connection() as conn:
                try:
                    self._insert_group_in_transaction(conn, group, attempt)
                except BaseException as error:
                    if _outcome_unknown(conn, attempt, error):
                        for member in group:
                            member.error = _unknown_outcome(attempt)
                        return
                    _release(conn)
                    # A statement the server refused on a connection still sound (a deadlock
                    # with a writer elsewhere that one member waited on, a cancelled wait) is
                    # psycopg's OperationalError too, but it is the group's doing, not an outage.
                    refused = _refused_statement(conn, error)
                    raise
        except (OperationalError, InterfaceError):
            if not refused:
                for member in group:
                    member.error = StoreUnavailable(NOTHING_WRITTEN, retry_after_seconds=1.0)
                return
            log.debug("eventstore.group_refused", appends=len(group), exc_info=True)
            for member in group:
                member.alone = True
            return
        except Exception:  # each member finds its own outcome alone
            log.debug("eventstore.group_refused", appends=len(group), exc_info=True)
            for member in group:
                member.alone = True
            return
        ids = attempt.notification_ids
        offset = 0
        for member in group:
            member.notification_ids = ids[offset : offset + member.count]
            offset += member.count
        if ids:
            EVENTS_APPENDED.inc(len(ids))

    def _append_alone(self, pending: _Pending) -> list[int]:
        """One append in a transaction of its own."""
        attempt = _Attempt()
        columns, command, reads = pending.columns, pending.command, pending.reads
        with self.datastore.get_connection() as conn:
            try:
                self._insert_in_transaction(conn, columns, command, reads, attempt)
            except BaseException as error:
                if _outcome_unknown(conn, attempt, error):
                    raise _unknown_outcome(attempt) from error
                _release(conn)
                raise
            if pending.count:
                EVENTS_APPENDED.inc(pending.count)
        return attempt.notification_ids

    def _insert_group_in_transaction(
        self, conn: Connection[DictRow], group: list[_Pending], attempt: _Attempt
    ) -> None:
        """A group's appends as one transaction, in the two round trips of a lone append: the
        events of all in one insert, the command records in one, the read checks in one."""
        commands = _group_commands([m for m in group if m.command is not None])
        reads = _group_reads(group)
        self._transact(
            conn,
            attempt,
            columns=_joined([m.columns for m in group if m.columns is not None]),
            record=None if commands is None else (self._insert_group_commands_sql, commands),
            moved_on=None if reads is None else (self._group_moved_on_sql, reads),
            stale=lambda rows: (
                f"appends {', '.join(str(r['item']) for r in rows)} of the group read "
                "aggregates that moved on"
            ),
        )

    def _insert_in_transaction(
        self,
        conn: Connection[DictRow],
        columns: tuple[list[Any], ...] | None,
        command: CommandRecord | None,
        reads: tuple[list[UUID], list[int]] | None,
        attempt: _Attempt,
    ) -> None:
        """One append as one transaction."""
        record = None
        if command is not None:
            record = (self._command_sql(with_position=columns is not None), _record_row(command))
        self._transact(
            conn,
            attempt,
            columns=columns,
            record=record,
            moved_on=None if reads is None else (self._moved_on_sql, reads),
            stale=lambda rows: f"aggregate {rows[0]['id']} has moved on since this write read it",
        )

    def _transact(
        self,
        conn: Connection[DictRow],
        attempt: _Attempt,
        *,
        columns: tuple[list[Any], ...] | None,
        record: tuple[Composed | SQL, Any] | None,
        moved_on: tuple[Composed | SQL, Any] | None,
        stale: Callable[[list[DictRow]], str],
    ) -> None:
        """Two round trips on one pipeline: BEGIN, lock, insert, unlock, command record(s) and the
        read check, then (after their results were read) COMMIT and NOTIFY.

        The transaction is begun and ended by statements rather than psycopg's ``transaction()``,
        whose nested pipelines add a synchronisation, each a round trip, at every boundary.
        NOTIFY runs after the COMMIT, in its own implicit transaction, so it adds nothing to the
        commit path; it fails alone, and then the write stands (tailers poll). ``stale`` words
        the refusal from the read check's rows.
        """
        with (
            conn.cursor() as inserts,
            conn.cursor() as other,
            conn.cursor() as recorded,
            conn.cursor() as checked,
            conn.cursor() as commit,
        ):
            try:
                with conn.pipeline() as pipeline:
                    other.execute(_BEGIN)
                    other.execute(self._lock_sql, prepare=True)
                    if columns is not None:
                        inserts.execute(self._insert_binary_sql, columns, prepare=True)
                    other.execute(self._unlock_sql, prepare=True)
                    if record is not None:
                        recorded.execute(*record, prepare=True)
                    if moved_on is not None:
                        # Last, so that it sees every write committed while this one waited.
                        checked.execute(*moved_on, prepare=True)
                    pipeline.sync()
                    if columns is not None:
                        rows = inserts.fetchall()
                        attempt.notification_ids = [r["notification_id"] for r in rows]
                        attempt.transaction_id = str(rows[0]["transaction_id"])
                    if record is not None:
                        row = recorded.fetchone()
                        attempt.transaction_id = str(row["xid"]) if row else None
                    if moved_on is not None and (rows := checked.fetchall()):
                        raise StaleVersion(stale(rows))  # the caller rolls the transaction back
                    attempt.phase = "committing"
                    commit.execute(_COMMIT)
                    if columns is not None:
                        other.execute(self._notify_sql)
                    # Leaving the pipeline sends both and waits for their answers.
            except psycopg.Error:
                if attempt.phase != "committing" or not _succeeded(commit):
                    raise
                # Committed; the NOTIFY after it failed. Tailers poll: a lost wake-up only
                # delays them.
                log.debug("eventstore.notify_failed", exc_info=True)
        attempt.phase = "committed"

    def _command_sql(self, *, with_position: bool) -> Composed | SQL:
        # The session's sequence value after the insert is the command's last position.
        return self._insert_command_with_position_sql if with_position else self._insert_command_sql

    @staticmethod
    def under_horizon(page: Composed) -> Composed:
        """``page``, a query of the log that may use :attr:`horizon`, as a statement whose rows
        begin with the horizon's ``moved`` flag (see ``_HORIZON``): an empty page is one row of
        nulls after the flag, so that the flag is read either way. The page is LATERAL to the
        horizon's one row, so it runs as a nested loop and its rows keep the page's order."""
        return (
            SQL(_HORIZON)
            + SQL(" SELECT horizon.moved, page.* FROM horizon LEFT JOIN LATERAL (")
            + page
            + SQL(") AS page ON true")
        )

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def read_under_horizon(
        self, statement: Composed, params: Sequence[object]
    ) -> list[tuple[Any, ...]]:
        """The rows of a statement of :meth:`under_horizon`, without the flag; made again at
        once while its horizon had moved, so that a read is not cut short by a transaction that
        ended as it began (it would have been delayed only, but every caller that reports what
        it read, a head or a sweep's target, would have reported less than was committed)."""
        for _ in range(_REREADS + 1):
            with (
                self.datastore.get_connection() as conn,
                conn.cursor(row_factory=tuple_row, binary=True) as cur,
            ):
                cur.execute(statement, params, prepare=True)
                rows = cur.fetchall()
            if not rows[0][0]:
                break
        if rows[0][1] is None:
            return []
        return [row[1:] for row in rows]

    def max_notification_id(self) -> int | None:
        rows = self.read_under_horizon(self.max_notification_id_statement, ())
        return None if not rows else int(rows[0][0])

    def subscribe(
        self, gt: int | None = None, topics: Sequence[str] = ()
    ) -> Subscription[ApplicationRecorder]:
        return PollingSubscription(recorder=self, gt=gt, topics=topics)

    def select_versions(
        self, *, after: int, through: int, limit: int
    ) -> list[tuple[int, UUID, int, str, bool]]:
        """Position, originator id, version and topic of the events in ``(after, through]``,
        without their state: what a projector's sweep compares with its tracking; and whether
        each is below this statement's horizon (settled).

        Every event in the range is returned, settled or not, so that the caller sees where the
        horizon cut it: ``through`` comes from an earlier statement, whose horizon may have been
        higher than this one's (when re-reads ran out, see ``_REREADS``), and a range read as if
        nothing were past the horizon would be taken for read whole."""
        return [
            (int(position), originator_id, int(version), topic, bool(settled))
            for position, originator_id, version, topic, settled in self.read_under_horizon(
                self._select_versions, (after, through, limit)
            )
        ]

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def select_following(
        self, originator_id: UUID, *, gt: int
    ) -> tuple[int, int, str, UUID | None] | None:
        """Position, version, topic and workspace of an aggregate's first event after version
        ``gt``, without its state (which may be any size): None when it has none."""
        statement = SQL(
            "SELECT notification_id, originator_version, topic, workspace_id FROM {0}"
            " WHERE originator_id = %s AND originator_version > %s"
            " ORDER BY originator_version LIMIT 1"
        ).format(Identifier(self.datastore.schema, self.events_table_name))
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(statement, (originator_id, gt), prepare=True)
            row = curs.fetchone()
        if row is None:
            return None
        return (
            int(row["notification_id"]),
            int(row["originator_version"]),
            row["topic"],
            row["workspace_id"],
        )

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def select_positioned_events(
        self, originator_id: UUID, *, gt: int, lt: int | None = None
    ) -> list[Notification]:
        """One aggregate's events between two versions, with their global positions.

        Projectors use it to heal a gap in what they were delivered; the events of one aggregate
        are committed in version order, so no horizon is needed here.
        """
        statement = self.select_from + SQL(" WHERE originator_id = %s AND originator_version > %s")
        params: list[Any] = [originator_id, gt]
        if lt is not None:
            statement += SQL(" AND originator_version < %s")
            params.append(lt)
        statement += SQL(" ORDER BY originator_version")
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(statement, params, prepare=True)
            return [_notification(row) for row in curs.fetchall()]

    def written_by(self, transaction_id: str, versions: Sequence[tuple[UUID, int]]) -> bool:
        """Whether the transaction ``transaction_id`` wrote each (aggregate id, version): a
        committed transaction id answers for this write only when its events carry it (after a
        failover the new primary hands out again the ids of transactions it never received)."""
        if not versions:
            return True
        statement = SQL(
            "SELECT count(*) AS n FROM {0} AS e JOIN unnest(%s::uuid[], %s::int8[]) AS r(id, v)"
            " ON e.originator_id = r.id AND e.originator_version = r.v"
            " WHERE e.transaction_id = %s::xid8"
        ).format(Identifier(self.datastore.schema, self.events_table_name))
        ids = [i for i, _ in versions]
        numbers = [v for _, v in versions]
        try:
            with self.datastore.get_connection() as conn, conn.cursor() as curs:
                curs.execute(statement, (ids, numbers, transaction_id))
                row = curs.fetchone()
        except (OperationalError, InterfaceError) as error:
            raise _translated(error) from error
        return row is not None and int(row["n"]) == len(versions)

    def select_positioned_ranges(
        self, ranges: Sequence[tuple[UUID, int, int]]
    ) -> list[Notification]:
        """Several aggregates' events, each between two versions (both bounds exclusive), in
        log order and in one round trip: a sweep that finds many aggregates behind (a lost
        partition) must not pay a query per aggregate."""
        if not ranges:
            return []
        statement = self.select_from + SQL(
            " AS e JOIN unnest(%s::uuid[], %s::bigint[], %s::bigint[]) AS r(id, gt, lt)"
            " ON e.originator_id = r.id AND e.originator_version > r.gt"
            " AND e.originator_version < r.lt ORDER BY e.notification_id"
        )
        ids, gts, lts = (list(column) for column in zip(*ranges, strict=True))
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(statement, (ids, gts, lts))
            return [_notification(row) for row in curs.fetchall()]

    def select_notifications(
        self,
        start: int | None,
        limit: int,
        stop: int | None = None,
        topics: Sequence[str] = (),
        *,
        inclusive_of_start: bool = True,
    ) -> Sequence[Notification]:
        conditions: list[Composed | SQL] = [self.horizon]
        params: list[Any] = []
        if start is not None:
            conditions.append(
                SQL("notification_id >= %s") if inclusive_of_start else SQL("notification_id > %s")
            )
            params.append(start)
        if stop is not None:
            conditions.append(SQL("notification_id <= %s"))
            params.append(stop)
        if topics:
            conditions.append(SQL("topic = ANY(%s)"))
            params.append(list(topics))
        statement = self.under_horizon(
            self.select_from
            + SQL(" WHERE ")
            + SQL(" AND ").join(conditions)
            + SQL(" ORDER BY notification_id LIMIT %s")
        )
        params.append(limit)
        return [
            Notification(
                id=position,
                originator_id=originator_id,
                originator_version=version,
                topic=topic,
                state=bytes(state),
            )
            for position, originator_id, version, topic, state in self.read_under_horizon(
                statement, params
            )
        ]


class PollingSubscription(PostgresSubscription):
    """The library's LISTEN/NOTIFY subscription, also polling.

    Under the reader horizon an event may become readable without a notification of its own (an
    older transaction elsewhere ended), so waiting only for NOTIFY could stall until the next
    write.
    """

    poll_interval = 0.25

    def _loop_on_pull(self) -> None:
        try:
            self._pull()
            while not self._has_been_stopped:
                self._has_been_notified.wait(self.poll_interval)
                self._pull()
        except BaseException as e:  # noqa: BLE001 - handed to the reading thread, as the library does
            if self._thread_error is None:
                self._thread_error = e
            self.stop()


def _notification(row: DictRow) -> Notification:
    """A row of ``select_from`` as the library's notification (its position is its id)."""
    return Notification(
        id=row["notification_id"],
        originator_id=row["originator_id"],
        originator_version=row["originator_version"],
        topic=row["topic"],
        state=bytes(row["state"]),
    )


def _binary_columns(
    stored_events: Sequence[StoredEvent],
) -> tuple[list[UUID], list[int], list[str], list[bytes], list[UUID | None]]:
    """The events as typed arrays: sent in binary, they cost a fraction of composite text."""
    workspaces: dict[bytes, UUID] = {}
    return (
        [
            e.originator_id if isinstance(e.originator_id, UUID) else UUID(str(e.originator_id))
            for e in stored_events
        ],
        [e.originator_version for e in stored_events],
        [e.topic for e in stored_events],
        [e.state for e in stored_events],
        [_workspace_of(e.state, workspaces) for e in stored_events],
    )


# How the library's JSON transcoder begins each of our events: the timestamp, then the metadata
# with the workspace first (domain.meta). Anchored at the start, a match can only be the
# top-level "meta".
_LEADING_WORKSPACE = re.compile(
    rb'\{"timestamp":\{"_type_":"datetime_iso","_data_":"[^"\\]*"\},'
    rb'"meta":\{"workspace_id":"([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"'
)


def _workspace_of(state: bytes, known: dict[bytes, UUID]) -> UUID | None:
    """:func:`stored_workspace`, without parsing the whole state when it begins as ours do.

    A bulk append's client CPU went mostly to ``json.loads`` of every event for this one
    column. The short cut is taken only where it cannot disagree with the full parse of a JSON
    document: the leading ``meta`` is the only key of that name and its ``workspace_id`` the
    only one anywhere (``json.loads`` would take the last of repeated keys). Anything else, a
    creation event carrying its ``workspace_id`` as payload among them, is parsed in full.
    """
    found = _LEADING_WORKSPACE.match(state)
    if found is None or state.count(b'"meta":') != 1 or state.count(b'"workspace_id":') != 1:
        return stored_workspace(state)
    text = found.group(1)
    workspace = known.get(text)
    if workspace is None:
        workspace = known[text] = UUID(text.decode())
    return workspace


def _outcome_unknown(conn: Connection[DictRow], attempt: _Attempt, error: BaseException) -> bool:
    """Whether a write failed once its COMMIT was on its way, by losing the connection.

    Then the server may have committed: it can shut down (57P01) or drop us after the commit is
    durable and before its answer arrives, and psycopg need not have marked the connection
    broken yet. The settle step (pg_xact_status) learns the truth.
    """
    return attempt.phase == "committing" and (
        conn.closed
        or conn.broken
        or isinstance(error, psycopg.OperationalError | psycopg.InterfaceError)
    )


def _refused_statement(conn: Connection[DictRow], error: BaseException) -> bool:
    """Whether the server refused a statement (it answered with an error of its own) and the
    connection is still sound: then nothing was written and the database is there."""
    return (
        isinstance(error, psycopg.Error)
        and error.sqlstate is not None
        and not error.sqlstate.startswith(("08", "57P"))  # connection lost, server shut down
        and not conn.closed
        and not conn.broken
    )


def _unknown_outcome(attempt: _Attempt) -> Unavailable:
    return Unavailable(
        "the connection to the database was lost while the write was being committed; whether "
        "it was is not known yet",
        outcome="unknown",
        transaction_id=attempt.transaction_id,
    )


def _release(conn: Connection[DictRow]) -> None:
    """Roll back a failed write and give its advisory lock back.

    A failed statement aborts the transaction before the unlock runs; the lock is
    session-level, so the pooled connection would keep it.
    """
    if not conn.closed and not conn.broken:
        if conn.info.transaction_status != TransactionStatus.IDLE:
            conn.execute("ROLLBACK")
        conn.execute("SELECT pg_advisory_unlock_all()")


def _joined(parts: list[tuple[list[Any], ...]]) -> tuple[list[Any], ...] | None:
    """Several appends' typed columns as one insert's."""
    if not parts:
        return None
    return tuple([value for part in parts for value in part[i]] for i in range(len(parts[0])))


def _group_commands(members: list[_Pending]) -> tuple[list[Any], ...] | None:
    """The group's command records as the arrays its one insert takes, each naming its own last
    event (whose position it records)."""
    if not members:
        return None
    rows = []
    for member in members:
        command = member.command
        assert command is not None
        last = (member.columns[0][-1], member.columns[1][-1]) if member.columns else (None, None)
        rows.append((*_record_row(command), *last))
    return tuple(list(column) for column in zip(*rows, strict=True))


def _record_row(command: CommandRecord) -> tuple[str, ...]:
    """A command record's columns; its position (0 here) is set by the statement."""
    return (
        command.scope,
        command.command_id,
        command.command_type,
        command.fingerprint,
        command.actor,
        json.dumps({**command.result, "position": 0}),
    )


def _group_reads(group: list[_Pending]) -> tuple[list[UUID], list[int], list[int]] | None:
    """Every member's read check as one statement's arrays, each row naming its member."""
    ids: list[UUID] = []
    versions: list[int] = []
    items: list[int] = []
    for item, member in enumerate(group):
        if member.reads is not None:
            ids.extend(member.reads[0])
            versions.extend(member.reads[1])
            items.extend([item] * len(member.reads[0]))
    return (ids, versions, items) if ids else None


def _succeeded(cursor: Cursor[DictRow]) -> bool:
    """Whether the statement ``cursor`` ran last completed (its result came back without error)."""
    result = cursor.pgresult
    return result is not None and result.status == pq.ExecStatus.COMMAND_OK


def _versions(unchanged: dict[Any, Any]) -> tuple[list[UUID], list[int]]:
    """``unchanged_since`` as the two typed arrays the check takes."""
    ids = [i if isinstance(i, UUID) else UUID(str(i)) for i in unchanged]
    return ids, [int(v) for v in unchanged.values()]


def stored_workspace(state: bytes) -> UUID | None:
    """The workspace named in a stored event's metadata; None when its state names none.

    The events table keeps it in a column of its own, which row-level security compares with
    the workspace of the API's transaction. A state that is not our JSON (encrypted, compressed,
    or foreign) names no workspace, so the API never sees it: the safe side.
    """
    try:
        meta = json.loads(state).get("meta")
        return UUID(meta["workspace_id"]) if isinstance(meta, dict) else None
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


class Factory(PostgresFactory):
    """The library's postgres factory, with our recorder.

    It logs in as ``POSTGRES_USER``, the component's own role (see ``infra.bootstrap``): the
    write side's may INSERT and SELECT events, never UPDATE or DELETE them.
    """

    def __init__(self, env: Environment | EnvType | None) -> None:
        super().__init__(env)
        datastore = self.datastore
        library_pool = datastore.pool
        kwargs = dict(library_pool.kwargs) if isinstance(library_pool.kwargs, dict) else {}
        extra = self.env.get(CONNINFO_ENV)
        if extra:
            # The library connects with host, port, dbname, user and password alone; without
            # these a URL's sslmode=verify-full fell back to libpq's default (prefer).
            kwargs.update(conninfo_to_dict(extra))
        for option, value in CONNECTION_OPTIONS.items():
            kwargs.setdefault(option, value)
        # The library's pool with our lending rules (see adapters.postgres), same sizes.
        timeout = self.env.get(POOL_TIMEOUT_ENV)
        datastore.pool = ResilientPool(
            connection_class=library_pool.connection_class,
            kwargs=kwargs,
            min_size=library_pool.min_size,
            max_size=library_pool.max_size,
            open=False,
            configure=datastore.after_connect_func(),
            timeout=float(timeout) if timeout else DEFAULT_POOL_TIMEOUT,
            max_waiting=library_pool.max_waiting,
            max_lifetime=library_pool.max_lifetime,
            name="eventstore",
            dependency=dependency_name(kwargs),
        )

    aggregate_recorder_class = SnapshotRecorder
    application_recorder_class = EventStoreRecorder


_FIND_COMMAND = (
    "SELECT command_type, fingerprint, result FROM command_log WHERE scope = {} AND command_id = {}"
)


_FIND_BY_PARAMETERS = _FIND_COMMAND.format("%s", "%s")


def _stored_command(command_type: str, fingerprint: str, result: dict[str, Any]) -> StoredCommand:
    return StoredCommand(command_type=command_type, fingerprint=fingerprint, result=result)


class PostgresCommandLog:
    """Look-ups of accepted commands, for idempotent retries, and the turns the executions of
    one command id take (:mod:`adapters.command_locks`, on connections of their own, opened at
    the first command sent with an id)."""

    def __init__(self, datastore: PostgresDatastore) -> None:
        self._datastore = datastore
        self._locks: CommandLocks | None = None
        self._locks_made = threading.Lock()

    @contextmanager
    def one_at_a_time(self, scope: str, command_id: str) -> Iterator[StoredCommand | None]:
        locks = self._locks
        if locks is None:
            with self._locks_made:
                if self._locks is None:
                    pool = self._datastore.pool
                    assert isinstance(pool, ResilientPool)  # Factory's
                    self._locks = CommandLocks.beside(pool)
                locks = self._locks
        look_up = _FIND_COMMAND.format(literal(scope), literal(command_id))
        with locks.one_at_a_time(scope, command_id, look_up) as row:
            yield None if row is None else _stored_command(*row)

    @property
    def waiting(self) -> int:
        """Executions of this process waiting for an earlier run of their command id to end."""
        locks = self._locks
        return 0 if locks is None else locks.waiting

    def close(self) -> None:
        with self._locks_made:
            locks, self._locks = self._locks, None
        if locks is not None:
            locks.close()

    def find(self, scope: str, command_id: str) -> StoredCommand | None:
        try:
            with self._datastore.get_connection() as conn, conn.cursor() as curs:
                curs.execute(_FIND_BY_PARAMETERS, (scope, command_id), prepare=True)
                row = curs.fetchone()
        except (OperationalError, InterfaceError) as error:
            raise _unavailable(error) from error
        if row is None:
            return None
        return _stored_command(row["command_type"], row["fingerprint"], row["result"])

    def committed(self, transaction_id: str) -> bool | None:
        """Whether the transaction committed (True), did not (False), or is still running
        (None: a connection lost while committing does not stop the server finishing it).

        PostgreSQL remembers the fate of recent transactions for exactly this question
        (``pg_xact_status``); after a crash recovery it answers from the recovered log.
        """
        try:
            with self._datastore.get_connection() as conn, conn.cursor() as curs:
                curs.execute("SELECT pg_xact_status(%s::xid8) AS status", (transaction_id,))
                row = curs.fetchone()
        except (OperationalError, InterfaceError) as error:
            raise _unavailable(error) from error
        except DataError as error:
            if isinstance(error.__cause__, psycopg.errors.InvalidParameterValue):
                # "transaction ID ... is in the future": this server never had it (a standby
                # promoted before the write reached it), so it did not commit here.
                return False
            raise
        status = row["status"] if row else None
        if status == "in progress":
            return None
        # NULL: too old to be remembered, which a transaction of a moment ago cannot be.
        return status == "committed"


def _unavailable(error: Exception) -> Unavailable:
    return Unavailable(f"the event store cannot answer now ({type(error).__name__}); retry shortly")
