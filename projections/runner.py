"""Applying envelopes to a projector's read model with exactly-once effect.

A batch is one transaction: the read-model rows and the projector's tracking (per-aggregate
version, highest position) commit together or not at all. Per aggregate, versions are contiguous:
an envelope at or below the tracked version is a duplicate and is skipped; one further ahead
reveals lost or reordered deliveries, and the missing events are read from the store and applied
first. So any mix of duplicates, restarts and lost messages converges on the same rows a rebuild
from scratch produces.

The envelopes a batch leaves to apply go to the projector together (``apply_batch``, see
:mod:`projections.batch`) when it can take them so, else one by one; either way in log order.

A rebuild makes its runner *exclusive* (:meth:`ProjectionRunner.take_exclusive`): it alone writes
its private tables and tracking, reading the log in order, so per-aggregate versions are kept in
memory and written once at the end, batches commit without waiting for the disk (a crash only
loses a rebuild that is redone anyway; the swap commits durably, and with it everything before),
and plain inserts into the fresh tables may use ``COPY``.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from uuid import UUID

import psycopg
import structlog
from opentelemetry.trace import SpanKind

from adapters.telemetry import continue_trace
from projections.base import Change, Projector, Tables
from projections.batch import BatchContext, BatchProjector

if TYPE_CHECKING:
    from psycopg import Connection, Cursor
    from psycopg.rows import DictRow
    from psycopg_pool import ConnectionPool

    from streams.envelope import EventEnvelope
    from streams.log import EventLog

log = structlog.get_logger(__name__)

MAX_ATTEMPTS = 5


@dataclass
class BatchOutcome:
    applied: int = 0
    duplicates: int = 0
    healed: int = 0
    position: int = 0
    changes: list[Change] = field(default_factory=list)


@dataclass
class _Exclusive:
    versions: dict[int, int]
    """Aggregate (its UUID as an int, which hashes in C) → the version applied."""
    copy: bool
    memo: dict[str, Any] = field(default_factory=dict)


class ProjectionRunner:
    """Feeds one projector; a rebuild gives it its own ``tracking_name`` and ``tables``."""

    def __init__(
        self,
        projector: Projector,
        pool: ConnectionPool[Connection[DictRow]],
        log_reader: EventLog,
        *,
        tracking_name: str | None = None,
        tables: Tables | None = None,
        on_commit: Callable[[list[Change]], None] | None = None,
        batched: bool = True,
    ) -> None:
        self.projector = projector
        self.pool = pool
        self.log = log_reader
        self.tracking_name = tracking_name or projector.name
        self.tables = tables or Tables()
        self.on_commit = on_commit
        self.batched = batched and isinstance(projector, BatchProjector)
        self._lock_key = zlib.crc32(f"projector:{self.tracking_name}".encode()) & 0x7FFFFFFF
        self._exclusive: _Exclusive | None = None

    @property
    def name(self) -> str:
        return self.tracking_name

    def position(self) -> int:
        with self.pool.connection() as conn:
            row = conn.execute(
                "SELECT position FROM projection_positions WHERE projector = %s",
                (self.tracking_name,),
            ).fetchone()
        return int(row["position"]) if row else 0

    # -- exclusive mode (rebuilds) -----------------------------------------------------------------

    def take_exclusive(self, *, copy: bool) -> None:
        """From now on this runner alone writes its tables and tracking (see the module's
        docstring); ``copy``: its tables are fresh and not yet under row-level security."""
        with self.pool.connection() as conn:
            rows = conn.execute(
                "SELECT originator_id, version FROM projection_versions WHERE projector = %s",
                (self.tracking_name,),
            ).fetchall()
        self._exclusive = _Exclusive(
            {r["originator_id"].int: int(r["version"]) for r in rows}, copy
        )

    def release_exclusive(self, *, persist: bool = True) -> None:
        """Back to shared mode, writing the versions kept in memory to the tracking table
        (``persist=False``: dropping them, for a rebuild that is given up)."""
        exclusive, self._exclusive = self._exclusive, None
        if exclusive is None or not exclusive.versions or not persist:
            return
        with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            cur.execute(
                "CREATE TEMP TABLE projection_versions_load (originator_id uuid, version bigint)"
                " ON COMMIT DROP"
            )
            with cur.copy("COPY projection_versions_load FROM STDIN") as copy:
                for key, version in exclusive.versions.items():
                    copy.write_row((UUID(int=key), version))
            cur.execute(
                "INSERT INTO projection_versions (projector, originator_id, version)"
                " SELECT %s, originator_id, version FROM projection_versions_load"
                " ON CONFLICT (projector, originator_id) DO UPDATE"
                " SET version = GREATEST(projection_versions.version, EXCLUDED.version)",
                (self.tracking_name,),
            )

    # -- batches -----------------------------------------------------------------------------------

    def process(
        self,
        envelopes: Sequence[EventEnvelope],
        *,
        through: int | None = None,
        read_after: int | None = None,
    ) -> BatchOutcome:
        """Apply a batch (in delivery order) in one transaction; safe to call with repeats.

        ``through``: the log position the batch covers, when that is past its last envelope
        (a reader that left out events this projector does not follow). ``read_after``: the
        caller read the log itself, in order, from this position on, so if everything up to it
        was applied (the sweep watermark of :mod:`projections.sweep` is there), everything up to
        the batch's position now is, and the watermark moves with it.
        """
        if not envelopes and not through:
            return BatchOutcome()
        started = time.time_ns()
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                outcome = self._process_once(envelopes, through, read_after)
            except (psycopg.errors.UniqueViolation, psycopg.errors.DeadlockDetected) as error:
                # Another worker applied an overlapping delivery first; what it applied is now a
                # duplicate for us, so a retry converges. (An exclusive runner has no such rival,
                # and what its projector remembers across batches may no longer hold: no retry.)
                log.warning(
                    "projection.batch_retry",
                    projector=self.tracking_name,
                    attempt=attempt,
                    error=str(error),
                )
                if attempt == MAX_ATTEMPTS or self._exclusive is not None:
                    raise
                continue
            if self._exclusive is None:
                self._trace(envelopes, started)
            if self.on_commit is not None and outcome.changes:
                self.on_commit(outcome.changes)
            return outcome
        raise AssertionError("unreachable")  # pragma: no cover

    def _trace(self, envelopes: Sequence[EventEnvelope], started_ns: int) -> None:
        """One span per applied event, in the trace of the command that caused it.

        Events are applied a batch at a time, so each span covers its batch, from start to commit.
        """
        name = f"project {self.projector.name}"
        ended = time.time_ns()
        for env in envelopes:
            if not env.traceparent:
                continue
            with continue_trace(
                name,
                env.traceparent,
                kind=SpanKind.CONSUMER,
                attributes={"agentworks.position": env.position, "agentworks.type": env.type},
                start_time=started_ns,
                end_time=ended,
            ):
                pass

    def _process_once(
        self, envelopes: Sequence[EventEnvelope], through: int | None, read_after: int | None
    ) -> BatchOutcome:
        if self._exclusive is not None:
            return self._process_exclusively(envelopes, through, self._exclusive)
        outcome = BatchOutcome()
        followed = [env for env in envelopes if self.projector.follows(env)]
        ids = sorted({env.originator_id for env in followed})
        with (
            self.pool.connection() as conn,
            conn.pipeline(),
            conn.transaction(),
            conn.cursor() as cur,
        ):
            # Pipeline mode: a batch's statements go out without waiting for each answer.
            # Shared with rebuild's swap, which takes it exclusively to switch tables safely.
            cur.execute("SELECT pg_advisory_xact_lock_shared(%s)", (self._lock_key,))
            versions = self._lock_versions(cur, ids)
            start = dict(versions)
            to_apply: list[EventEnvelope] = []
            for env in followed:
                done = versions.get(env.originator_id, 0)
                if env.originator_version <= done:
                    outcome.duplicates += 1
                    continue
                if env.originator_version > done + 1:
                    missing = self.log.between(
                        env.originator_id,
                        after_version=done,
                        before_version=env.originator_version,
                    )
                    self._check_contiguous(env, done, missing)
                    to_apply.extend(missing)
                    outcome.position = max([outcome.position, *(m.position for m in missing)])
                    outcome.healed += len(missing)
                    log.info(
                        "projection.gap_healed",
                        projector=self.tracking_name,
                        originator_id=str(env.originator_id),
                        from_version=done + 1,
                        to_version=env.originator_version - 1,
                    )
                to_apply.append(env)
                versions[env.originator_id] = env.originator_version
                outcome.applied += 1
                outcome.position = max(outcome.position, env.position)
            self._apply(cur, to_apply, outcome.changes)
            last = max((env.position for env in envelopes), default=0)
            outcome.position = max(outcome.position, last, through or 0)
            changed = [(i, v) for i, v in versions.items() if start.get(i) != v]
            if changed:
                cur.execute(
                    "UPDATE projection_versions AS t SET version = v.version "
                    "FROM unnest(%s::uuid[], %s::bigint[]) AS v(id, version) "
                    "WHERE t.projector = %s AND t.originator_id = v.id",
                    ([i for i, _ in changed], [v for _, v in changed], self.tracking_name),
                )
            cur.execute(
                "INSERT INTO projection_positions (projector, position, swept_through, healed) "
                "VALUES (%(name)s, %(position)s, CASE WHEN %(after)s = 0 THEN %(position)s "
                "ELSE 0 END, %(healed)s) ON CONFLICT (projector) DO UPDATE SET "
                "position = GREATEST(projection_positions.position, EXCLUDED.position), "
                "swept_through = CASE WHEN projection_positions.swept_through >= %(after)s "
                "THEN GREATEST(projection_positions.swept_through, %(position)s) "
                "ELSE projection_positions.swept_through END, "
                "healed = projection_positions.healed + EXCLUDED.healed, "
                "updated_at = clock_timestamp()",
                {
                    "name": self.tracking_name,
                    "position": outcome.position,
                    "after": read_after,
                    "healed": outcome.healed,
                },
            )
        return outcome

    def _process_exclusively(
        self, envelopes: Sequence[EventEnvelope], through: int | None, exclusive: _Exclusive
    ) -> BatchOutcome:
        """:meth:`_process_once` for an exclusive runner: versions from memory, no locks."""
        outcome = BatchOutcome()
        known = exclusive.versions
        applied: dict[int, int] = {}
        to_apply: list[EventEnvelope] = []
        follows = self.projector.follows
        for env in envelopes:
            if not follows(env):
                continue
            key = env.originator_id.int
            done = applied.get(key) or known.get(key, 0)
            version = env.originator_version
            if version <= done:
                outcome.duplicates += 1
                continue
            if version > done + 1:
                missing = self.log.between(
                    env.originator_id, after_version=done, before_version=version
                )
                self._check_contiguous(env, done, missing)
                to_apply.extend(missing)
                outcome.healed += len(missing)
            to_apply.append(env)
            applied[key] = version
        outcome.applied = len(to_apply) - outcome.healed
        last = max((env.position for env in envelopes), default=0)
        outcome.position = max(last, through or 0, *(env.position for env in to_apply[-1:]))
        with (
            self.pool.connection() as conn,
            conn.transaction(),
            conn.cursor() as cur,
        ):
            cur.execute("SET LOCAL synchronous_commit = off")
            cur.execute("SELECT pg_advisory_xact_lock_shared(%s)", (self._lock_key,))
            self._apply(cur, to_apply, outcome.changes)
            cur.execute(
                "INSERT INTO projection_positions (projector, position) VALUES (%s, %s) "
                "ON CONFLICT (projector) DO UPDATE SET "
                "position = GREATEST(projection_positions.position, EXCLUDED.position), "
                "updated_at = clock_timestamp()",
                (self.tracking_name, outcome.position),
            )
        known.update(applied)
        return outcome

    def _apply(
        self, cur: Cursor[DictRow], envelopes: list[EventEnvelope], changes: list[Change]
    ) -> None:
        if not envelopes:
            return
        exclusive = self._exclusive
        if self.batched:
            assert isinstance(self.projector, BatchProjector)
            ctx = BatchContext(
                cur,
                self.tables,
                changes=None if exclusive is not None else changes,
                copy=exclusive is not None and exclusive.copy,
                memo=exclusive.memo if exclusive is not None else {},
                exclusive=exclusive is not None,
            )
            self.projector.apply_batch(ctx, envelopes)
            return
        for env in envelopes:
            self.projector.apply(cur, env, self.tables, changes)

    def _lock_versions(self, cur: Cursor[DictRow], ids: list[UUID]) -> dict[UUID, int]:
        """Claim the tracking rows of the batch's aggregates (creating them at version 0).

        Inserting first makes two workers delivered the same new aggregate queue on its row
        instead of both applying its first event.
        """
        if not ids:
            return {}
        cur.execute(
            "INSERT INTO projection_versions (projector, originator_id, version) "
            "SELECT %s, id, 0 FROM unnest(%s::uuid[]) AS id ORDER BY id "
            "ON CONFLICT (projector, originator_id) DO NOTHING",
            (self.tracking_name, ids),
        )
        cur.execute(
            "SELECT originator_id, version FROM projection_versions "
            "WHERE projector = %s AND originator_id = ANY(%s::uuid[]) "
            "ORDER BY originator_id FOR UPDATE",
            (self.tracking_name, ids),
        )
        return {row["originator_id"]: int(row["version"]) for row in cur.fetchall()}

    @staticmethod
    def _check_contiguous(env: EventEnvelope, done: int, missing: list[EventEnvelope]) -> None:
        expected = list(range(done + 1, env.originator_version))
        got = [m.originator_version for m in missing]
        if got != expected:
            raise RuntimeError(
                f"store is missing versions {sorted(set(expected) - set(got))} of aggregate "
                f"{env.originator_id}; cannot heal the gap before version {env.originator_version}"
            )
