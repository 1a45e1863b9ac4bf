"""Applying envelopes to a projector's read model with exactly-once effect.

A batch is one transaction: the read-model rows and the projector's tracking (per-aggregate
version, highest position) commit together or not at all. Per aggregate, versions are contiguous:
an envelope at or below the tracked version is a duplicate and is skipped; one further ahead
reveals lost or reordered deliveries, and the missing events are read from the store and applied
first. So any mix of duplicates, restarts and lost messages converges on the same rows a rebuild
from scratch produces.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from uuid import UUID

import psycopg
import structlog

from projections.base import Change, Projector, Tables

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
    ) -> None:
        self.projector = projector
        self.pool = pool
        self.log = log_reader
        self.tracking_name = tracking_name or projector.name
        self.tables = tables or Tables()
        self.on_commit = on_commit
        self._lock_key = zlib.crc32(f"projector:{self.tracking_name}".encode()) & 0x7FFFFFFF

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

    def process(self, envelopes: Sequence[EventEnvelope]) -> BatchOutcome:
        """Apply a batch (in delivery order) in one transaction; safe to call with repeats."""
        if not envelopes:
            return BatchOutcome()
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                outcome = self._process_once(envelopes)
            except (psycopg.errors.UniqueViolation, psycopg.errors.DeadlockDetected) as error:
                # Another worker applied an overlapping delivery first; what it applied is now a
                # duplicate for us, so a retry converges.
                log.warning(
                    "projection.batch_retry",
                    projector=self.tracking_name,
                    attempt=attempt,
                    error=str(error),
                )
                if attempt == MAX_ATTEMPTS:
                    raise
                continue
            if self.on_commit is not None and outcome.changes:
                self.on_commit(outcome.changes)
            return outcome
        raise AssertionError("unreachable")  # pragma: no cover

    def _process_once(self, envelopes: Sequence[EventEnvelope]) -> BatchOutcome:
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
                    for healed in missing:
                        self.projector.apply(cur, healed, self.tables, outcome.changes)
                        outcome.position = max(outcome.position, healed.position)
                    outcome.healed += len(missing)
                    log.info(
                        "projection.gap_healed",
                        projector=self.tracking_name,
                        originator_id=str(env.originator_id),
                        from_version=done + 1,
                        to_version=env.originator_version - 1,
                    )
                self.projector.apply(cur, env, self.tables, outcome.changes)
                versions[env.originator_id] = env.originator_version
                outcome.applied += 1
                outcome.position = max(outcome.position, env.position)
            outcome.position = max(outcome.position, max(env.position for env in envelopes))
            changed = [(i, v) for i, v in versions.items() if start.get(i) != v]
            if changed:
                cur.execute(
                    "UPDATE projection_versions AS t SET version = v.version "
                    "FROM unnest(%s::uuid[], %s::bigint[]) AS v(id, version) "
                    "WHERE t.projector = %s AND t.originator_id = v.id",
                    ([i for i, _ in changed], [v for _, v in changed], self.tracking_name),
                )
            cur.execute(
                "INSERT INTO projection_positions (projector, position) VALUES (%s, %s) "
                "ON CONFLICT (projector) DO UPDATE SET "
                "position = GREATEST(projection_positions.position, EXCLUDED.position), "
                "updated_at = clock_timestamp()",
                (self.tracking_name, outcome.position),
            )
        return outcome

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
