"""Rebuilding read models from the event log without stopping the API.

The projector replays the whole log into fresh copies of its tables under its own tracking name;
the live tables keep serving (and keep being fed) meanwhile. The swap then takes the projector's
lock exclusively — the live runner holds it shared for each batch — applies whatever arrived
since, and renames the fresh tables into place, in one transaction. A rebuild that stops halfway
leaves only its own scratch tables behind; the next one clears them.

A replay is a bulk load, and is run as one:

* the log is read once for all the projectors being rebuilt (:func:`rebuild_many`), decoding
  only the events they follow, and each batch goes to every projector at the same time (one
  thread and connection each), while the next batch is read;
* each projector applies a batch with a few set-based statements (``apply_batch``), its runner
  in exclusive mode (versions kept in memory, commits without waiting for the disk, ``COPY``);
* the fresh tables get their secondary indexes (and the tables a projector only inserts into,
  its ``insert_only``, their keys too) and their row-level security only after the replay:
  building an index once is cheaper than maintaining it row by row, and ``COPY`` refuses tables
  under row-level security. Nothing but the rebuild can reach them before the swap: they belong
  to the projector role and carry no grants until then;
* the replay runs without Python's cyclic garbage collector, which would otherwise keep walking
  everything the projectors remember, for nothing.

An event a projector cannot apply parks its aggregate (see :mod:`projections.runner`) and the
replay goes on; the parked aggregates go live with the tables, and ``agentworks parked retry``
applies them after a fix.

Then, per projector: the versions kept in memory are written to the tracking table, the
indexes built, the tables secured and analysed, and the swap applies whatever arrived since
the replay (the runner back in its normal, shared mode) before renaming the tables in.
"""

from __future__ import annotations

import gc
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING

import psycopg
import structlog
from psycopg import sql

from adapters.eventlog import MAX_BATCH_BYTES
from adapters.postgres import connect
from projections.base import Tables, unread_by
from projections.read_versions import bump_epoch
from projections.revisions import check_revisions, record_revision
from projections.runner import ProjectionRunner

if TYPE_CHECKING:
    from psycopg import Connection
    from psycopg.rows import DictRow
    from psycopg_pool import ConnectionPool

    from adapters.eventlog import EventLog
    from domain.envelope import EventEnvelope
    from projections.base import Projector

log = structlog.get_logger(__name__)

SCRATCH_SUFFIX = "__rebuild"

#: Events per batch in a rebuild: large, since every batch is a few statements per projector.
REBUILD_BATCH_SIZE = 25_000

#: Most bytes of stored events per batch in a rebuild, beside its count (larger than the live
#: paths' bound, for the same reason as the count; a larger event goes alone): a log of large
#: events (agent outputs, log chunks) must not be read 25,000 at a time.
REBUILD_BATCH_BYTES = 4 * MAX_BATCH_BYTES

Progress = Callable[[int, int], None]
"""Called with (position reached, head position) as the rebuild advances."""


@dataclass(frozen=True)
class RebuildResult:
    projector: str
    events: int
    position: int
    swapped: bool


def scratch_tables(projector: Projector) -> Tables:
    return Tables({table: table + SCRATCH_SUFFIX for table in projector.tables})


def scratch_tracking(projector: Projector) -> str:
    return f"{projector.name}#rebuild"


def rebuild(
    projector: Projector,
    pool: ConnectionPool[Connection[DictRow]],
    event_log: EventLog,
    *,
    swap: bool = True,
    batch_size: int = REBUILD_BATCH_SIZE,
    progress: Progress | None = None,
) -> RebuildResult:
    """Replay the log into fresh tables, then (``swap=True``) put them live atomically."""
    (result,) = rebuild_many(
        [projector], pool, event_log, swap=swap, batch_size=batch_size, progress=progress
    )
    return result


def rebuild_many(
    projectors: Sequence[Projector],
    pool: ConnectionPool[Connection[DictRow]],
    event_log: EventLog,
    *,
    swap: bool = True,
    batch_size: int = REBUILD_BATCH_SIZE,
    progress: Progress | None = None,
    parallel: bool = True,
) -> list[RebuildResult]:
    """Rebuild several read models reading the log once (see the module's docstring).

    Each projector's fresh tables are swapped in on their own (one transaction each), so the
    result is the same as rebuilding them one after the other. ``parallel``: apply a batch to
    the projectors at the same time, one thread each (the pool needs a connection per
    projector, plus one to read the log).
    """
    if not projectors:
        return []
    with _one_rebuild_at_a_time(projectors, pool):
        return _rebuild_many(projectors, pool, event_log, swap, batch_size, progress, parallel)


def rebuild_stale(
    projectors: Sequence[Projector],
    pool: ConnectionPool[Connection[DictRow]],
    event_log: EventLog,
    *,
    progress: Progress | None = None,
) -> list[RebuildResult]:
    """Rebuild those of ``projectors`` whose read model older code built (see
    :mod:`projections.revisions`), deciding under the rebuild locks: of two deployments
    migrating at once, the second waits for the first's rebuild, then finds nothing to do."""
    if not projectors:
        return []
    with _one_rebuild_at_a_time(projectors, pool):
        with pool.connection() as conn:
            stale = check_revisions(conn, projectors).stale_names
        chosen = [projector for projector in projectors if projector.name in stale]
        if not chosen:
            return []
        return _rebuild_many(chosen, pool, event_log, True, REBUILD_BATCH_SIZE, progress, True)


@contextmanager
def _one_rebuild_at_a_time(
    projectors: Sequence[Projector], pool: ConnectionPool[Connection[DictRow]]
) -> Iterator[None]:
    """Hold, for the whole rebuild, a lock per read model; a second rebuild of one waits.

    Two rebuilds of one read model share its scratch tables and tracking: the second's start
    drops the tables the first has filled so far, each goes on writing into the other's, and
    the first swaps that mix in with tracking that says every event is applied. The locks are
    session locks on a connection of their own (not the pool's: the replay needs all of those),
    taken in one order, so that ``rebuild all`` and ``rebuild NAME`` cannot deadlock."""
    keys = sorted({_rebuild_lock_key(p.name): p.name for p in projectors}.items())
    conninfo = pool.conninfo if isinstance(pool.conninfo, str) else pool.conninfo()
    with connect(conninfo, autocommit=True) as conn:
        for key, name in keys:
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
            if not (row and row[0]):
                log.warning("rebuild.waiting_for_another", projector=name)
                conn.execute("SELECT pg_advisory_lock(%s)", (key,))
        yield  # (closing the session releases the locks, however the rebuild ends)


def _rebuild_lock_key(name: str) -> int:
    return zlib.crc32(f"rebuild:{name}".encode()) & 0x7FFFFFFF


def _rebuild_many(
    projectors: Sequence[Projector],
    pool: ConnectionPool[Connection[DictRow]],
    event_log: EventLog,
    swap: bool,
    batch_size: int,
    progress: Progress | None,
    parallel: bool,
    *,
    defer_keys: bool = True,
) -> list[RebuildResult]:
    scratches = [_Scratch(p, pool, defer_keys=defer_keys) for p in projectors]
    runners = [
        ProjectionRunner(
            s.projector,
            pool,
            event_log,
            tracking_name=scratch_tracking(s.projector),
            tables=scratch_tables(s.projector),
        )
        for s in scratches
    ]
    for scratch, runner in zip(scratches, runners, strict=True):
        scratch.prepare()
        runner.take_exclusive(copy=True)
    try:
        with _cyclic_gc_paused():
            position, events = _replay(runners, event_log, batch_size, progress, parallel)
    except BaseException:
        for runner in runners:
            runner.release_exclusive(persist=False)
        raise
    for runner in runners:
        runner.release_exclusive()
    clashed = [scratch.projector for scratch in scratches if not scratch.finish()]
    results: dict[str, RebuildResult] = {}
    for scratch, runner in zip(scratches, runners, strict=True):
        name = scratch.projector.name
        if scratch.projector in clashed:
            continue
        if not swap:
            results[name] = RebuildResult(name, events, position, swapped=False)
            continue
        caught_up = _swap(scratch.projector, pool, event_log, runner, position, batch_size)
        log.info("rebuild.swapped", projector=name, events=events + caught_up)
        results[name] = RebuildResult(name, events + caught_up, position, swapped=True)
    if clashed:
        # Replayed again with their keys in place, so that the events that clash park their
        # aggregates, as they do live.
        for result in _rebuild_many(
            clashed, pool, event_log, swap, batch_size, progress, parallel, defer_keys=False
        ):
            results[result.projector] = result
    return [results[projector.name] for projector in projectors]


@contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off for the block (on again after, if it was). A replay makes
    millions of short-lived objects without cycles (refcounting frees them) while holding large
    long-lived ones (what the projectors remember): the collector would keep walking the latter
    for nothing."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def _replay(
    runners: list[ProjectionRunner],
    event_log: EventLog,
    batch_size: int,
    progress: Progress | None,
    parallel: bool,
) -> tuple[int, int]:
    """Feed the whole log to every runner; returns (position reached, events read)."""
    aggregates = frozenset().union(*(r.projector.aggregates for r in runners))
    unread = unread_by(r.projector for r in runners)
    position, events = 0, 0
    head = event_log.head()

    def read(after: int) -> tuple[list[EventEnvelope], int, int]:
        return event_log.read_following(
            after, batch_size, aggregates, max_bytes=REBUILD_BATCH_BYTES, unread=unread
        )[:3]

    batch, through, count = read(position)
    if not parallel or len(runners) == 1:
        while count:
            for runner in runners:
                runner.process(batch, through=through)
            position, events, head = through, events + count, max(head, through)
            if progress is not None:
                progress(position, head)
            batch, through, count = read(position)
        return position, events
    # Each batch goes to every projector at once, one thread each (psycopg lets go of the GIL
    # while PostgreSQL works), and the next batch is read meanwhile. (Letting projectors run
    # batches ahead of each other, with a queue each, measured no faster: the threads' Python
    # shares one core under the GIL, and more runnable threads only contend for it.)
    with ThreadPoolExecutor(len(runners), thread_name_prefix="rebuild") as workers:
        while count:
            applying: list[Future[object]] = [
                workers.submit(runner.process, batch, through=through) for runner in runners
            ]
            try:
                upcoming = read(through)  # while the projectors apply this batch
            finally:
                for done in applying:
                    done.result()
            position, events, head = through, events + count, max(head, through)
            if progress is not None:
                progress(position, head)
            batch, through, count = upcoming
    return position, events


@dataclass
class _Scratch:
    """A projector's fresh tables: created bare, completed after the replay."""

    projector: Projector
    pool: ConnectionPool[Connection[DictRow]]
    _: KW_ONLY
    defer_keys: bool = True
    """Build the keys of the tables the projector only inserts into after the replay too."""
    deferred: list[str] = field(default_factory=list)
    """Definitions of the secondary indexes (and keys) to build once the tables are filled."""

    def prepare(self) -> None:
        prepare_scratch(self.projector, self.pool, secure=False)
        insert_only: frozenset[str] = getattr(self.projector, "insert_only", frozenset())
        with self.pool.connection() as conn, conn.transaction():
            for table in self.projector.tables:
                if table in insert_only and self.defer_keys:
                    # Nothing reads these by key during a replay, and every row is new (the
                    # runner applies each event once): their keys too are built at the end,
                    # where a duplicate would still fail the rebuild.
                    keys = conn.execute(
                        "SELECT conname AS name, pg_get_constraintdef(oid) AS definition"
                        " FROM pg_constraint WHERE conrelid = %s::regclass"
                        " AND contype IN ('p', 'u') ORDER BY oid",
                        (table + SCRATCH_SUFFIX,),
                    ).fetchall()
                    scratch = sql.Identifier(table + SCRATCH_SUFFIX)
                    for key in keys:
                        name = sql.Identifier(key["name"])
                        self.deferred.append(
                            sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} ")
                            .format(scratch, name)
                            .as_string(conn)
                            + key["definition"]
                        )
                        conn.execute(
                            sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(scratch, name)
                        )
                rows = conn.execute(
                    "SELECT i.indexrelid::regclass::text AS name,"
                    " pg_get_indexdef(i.indexrelid) AS definition"
                    " FROM pg_index AS i WHERE i.indrelid = %s::regclass"
                    " AND NOT i.indisunique AND NOT i.indisprimary"
                    " ORDER BY i.indexrelid",
                    (table + SCRATCH_SUFFIX,),
                ).fetchall()
                for row in rows:
                    self.deferred.append(row["definition"])
                    conn.execute(sql.SQL("DROP INDEX ") + sql.SQL(row["name"]))

    def finish(self) -> bool:
        """Build what was deferred, secure and analyse the tables; ``False`` (nothing done) when
        a deferred key found rows that clash: events of one aggregate the projector could not
        have applied, which only a replay with the keys in place can tell (and park)."""
        try:
            with self.pool.connection() as conn, conn.transaction():
                conn.execute("SET LOCAL maintenance_work_mem = '256MB'")
                for definition in self.deferred:
                    conn.execute(sql.SQL(definition))
                for table in self.projector.tables:
                    conn.execute(
                        "SELECT agentworks_secure_read_model(%s::regclass)",
                        (table + SCRATCH_SUFFIX,),
                    )
                for table in self.projector.tables:
                    conn.execute(
                        sql.SQL("ANALYZE {}").format(sql.Identifier(table + SCRATCH_SUFFIX))
                    )
        except psycopg.errors.UniqueViolation as error:
            if not self.defer_keys:
                raise
            log.warning(
                "rebuild.deferred_key_clash",
                projector=self.projector.name,
                error=str(error).splitlines()[0],
                next="replaying with the keys in place, to park the aggregates at fault",
            )
            return False
        self.deferred.clear()
        return True


def prepare_scratch(
    projector: Projector, pool: ConnectionPool[Connection[DictRow]], *, secure: bool = True
) -> None:
    """Fresh, empty copies of the projector's tables (secured unless ``secure=False``: then
    the caller secures them before they go live), and no scratch tracking."""
    tracking = scratch_tracking(projector)
    with pool.connection() as conn, conn.transaction():
        for table in projector.tables:
            scratch = sql.Identifier(table + SCRATCH_SUFFIX)
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(scratch))
            conn.execute(
                sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING ALL)").format(
                    scratch, sql.Identifier(table)
                )
            )
            if secure:
                conn.execute(
                    "SELECT agentworks_secure_read_model(%s::regclass)", (table + SCRATCH_SUFFIX,)
                )
        conn.execute("DELETE FROM projection_versions WHERE projector = %s", (tracking,))
        conn.execute("DELETE FROM projection_positions WHERE projector = %s", (tracking,))
        conn.execute("DELETE FROM projection_parked WHERE projector = %s", (tracking,))


def _swap(
    projector: Projector,
    pool: ConnectionPool[Connection[DictRow]],
    event_log: EventLog,
    runner: ProjectionRunner,
    position: int,
    batch_size: int,
) -> int:
    live_lock = zlib.crc32(f"projector:{projector.name}".encode()) & 0x7FFFFFFF
    caught_up = 0
    with pool.connection() as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (live_lock,))
        while True:
            batch = event_log.read(after=position, limit=batch_size, max_bytes=REBUILD_BATCH_BYTES)
            if not batch:
                break
            runner.process(batch)
            position = batch[-1].position
            caught_up += len(batch)
        for table in projector.tables:
            live = sql.Identifier(table)
            retired = sql.Identifier(table + "__retired")
            conn.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(live, retired))
            conn.execute(
                sql.SQL("ALTER TABLE {} RENAME TO {}").format(
                    sql.Identifier(table + SCRATCH_SUFFIX), live
                )
            )
            conn.execute(sql.SQL("DROP TABLE {}").format(retired))
        tracking = scratch_tracking(projector)
        # The rebuild read the log in order: everything up to here is applied, nothing to sweep.
        conn.execute(
            "INSERT INTO projection_positions (projector, position, swept_through)"
            " VALUES (%s, %s, %s) ON CONFLICT (projector) DO UPDATE"
            " SET swept_through = EXCLUDED.swept_through",
            (tracking, position, position),
        )
        record_revision(conn, projector)
        # Every workspace's rows were just replaced: no cached answer read them.
        bump_epoch(conn)
        # The rebuild's parked aggregates replace the live ones: it tried every event again.
        for bookkeeping in ("projection_versions", "projection_positions", "projection_parked"):
            ident = sql.Identifier(bookkeeping)
            conn.execute(
                sql.SQL("DELETE FROM {} WHERE projector = %s").format(ident), (projector.name,)
            )
            conn.execute(
                sql.SQL("UPDATE {} SET projector = %s WHERE projector = %s").format(ident),
                (projector.name, tracking),
            )
    return caught_up
