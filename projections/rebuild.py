"""Rebuilding a read model from the event log without stopping the API.

The projector replays the whole log into fresh copies of its tables under its own tracking name;
the live tables keep serving (and keep being fed) meanwhile. The swap then takes the projector's
lock exclusively — the live runner holds it shared for each batch — applies whatever arrived
since, and renames the fresh tables into place, in one transaction. A rebuild that stops halfway
leaves only its own scratch tables behind; the next one clears them.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
from psycopg import sql

from projections.base import Tables
from projections.runner import ProjectionRunner

if TYPE_CHECKING:
    from psycopg import Connection
    from psycopg.rows import DictRow
    from psycopg_pool import ConnectionPool

    from projections.base import Projector
    from streams.log import EventLog

log = structlog.get_logger(__name__)

SCRATCH_SUFFIX = "__rebuild"

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
    batch_size: int = 2000,
    progress: Progress | None = None,
) -> RebuildResult:
    """Replay the log into fresh tables, then (``swap=True``) put them live atomically."""
    tables = scratch_tables(projector)
    tracking = scratch_tracking(projector)
    prepare_scratch(projector, pool)
    runner = ProjectionRunner(projector, pool, event_log, tracking_name=tracking, tables=tables)
    position, events = 0, 0
    head = event_log.head()
    while True:
        batch = event_log.read(after=position, limit=batch_size)
        if not batch:
            break
        runner.process(batch)
        position = batch[-1].position
        events += len(batch)
        head = max(head, position)
        if progress is not None:
            progress(position, head)
    if not swap:
        return RebuildResult(projector.name, events, position, swapped=False)
    caught_up = _swap(projector, pool, event_log, runner, position, batch_size)
    log.info("rebuild.swapped", projector=projector.name, events=events + caught_up)
    return RebuildResult(projector.name, events + caught_up, position, swapped=True)


def prepare_scratch(projector: Projector, pool: ConnectionPool[Connection[DictRow]]) -> None:
    """Fresh, empty, secured copies of the projector's tables, and no scratch tracking."""
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
            conn.execute(
                "SELECT agentworks_secure_read_model(%s::regclass)", (table + SCRATCH_SUFFIX,)
            )
        conn.execute("DELETE FROM projection_versions WHERE projector = %s", (tracking,))
        conn.execute("DELETE FROM projection_positions WHERE projector = %s", (tracking,))


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
            batch = event_log.read(after=position, limit=batch_size)
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
        for bookkeeping in ("projection_versions", "projection_positions"):
            ident = sql.Identifier(bookkeeping)
            conn.execute(
                sql.SQL("DELETE FROM {} WHERE projector = %s").format(ident), (projector.name,)
            )
            conn.execute(
                sql.SQL("UPDATE {} SET projector = %s WHERE projector = %s").format(ident),
                (projector.name, tracking),
            )
    return caught_up
