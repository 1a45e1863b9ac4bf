"""Applying envelopes to a projector's read model with exactly-once effect.

A batch is one transaction: the read-model rows and the projector's tracking (per-aggregate
version, highest position) commit together or not at all. Per aggregate, versions are contiguous:
an envelope at or below the tracked version is a duplicate and is skipped; one further ahead
reveals lost or reordered deliveries, and the missing events are read from the store and applied
first. So any mix of duplicates, restarts and lost messages converges on the same rows a rebuild
from scratch produces.

The envelopes a batch leaves to apply go to the projector together, in log order
(``apply_batch``, see :mod:`projections.batch`): a projector has that one way of applying events.

A rebuild makes its runner *exclusive* (:meth:`ProjectionRunner.take_exclusive`): it alone writes
its private tables and tracking, reading the log in order, so per-aggregate versions are kept in
memory and written once at the end, batches commit without waiting for the disk (a crash only
loses a rebuild that is redone anyway; the swap commits durably, and with it everything before),
and plain inserts into the fresh tables may use ``COPY``.

An event the projector cannot apply (a payload it cannot interpret, a value its tables refuse)
must not stop the other aggregates, nor, being applied again and again, every tenant's read
models. The runner *parks* its aggregate: it records the event and the error in
``projection_parked`` and holds that aggregate's later events back (applying them would put its
rows out of order), and applies everything else. A batch is one transaction, so on an error it
is rolled back and applied again event by event (the fold given one event at a time, still in
one transaction), which names the event that fails; that aggregate is parked from there on and
the batch applied once more without it, until it commits. An error that does not come back
event by event is not the events' fault and is raised, as are the database's own failures (a
lost connection, a timeout): those are retried by the caller, and parking on them would park
healthy aggregates. :meth:`ProjectionRunner.retry_parked` applies a
parked aggregate's events again, after a fix.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Collection, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from uuid import UUID

import structlog
from opentelemetry.trace import SpanKind

from adapters import metrics
from adapters.eventlog import MAX_BATCH_BYTES
from adapters.outages import is_infrastructure_failure, is_write_race
from adapters.telemetry import continue_trace
from domain.envelope import UNDECODABLE
from domain.errors import UndecodableEvent
from projections.base import MEMO_DROPPED, BatchContext, Change, Projector, Tables, unread_by
from projections.read_versions import bump as bump_read_versions
from projections.text import protect

if TYPE_CHECKING:
    from psycopg import Connection, Cursor
    from psycopg.rows import DictRow
    from psycopg_pool import ConnectionPool

    from adapters.eventlog import EventHeader, EventLog
    from domain.budget_holds import CountedSpend
    from domain.envelope import EventEnvelope

log = structlog.get_logger(__name__)

MAX_ATTEMPTS = 5

#: Longest error text kept with a parked aggregate.
MAX_ERROR_LENGTH = 2000

#: Most events of one parked aggregate that a retry applies in one transaction.
RETRY_CHUNK = 1000

#: How the error of an aggregate that a retry has applied only part of begins.
RETRY_PENDING = "retry under way"


@dataclass
class BatchOutcome:
    applied: int = 0
    duplicates: int = 0
    healed: int = 0
    position: int = 0
    changes: list[Change] = field(default_factory=list)
    held: int = 0
    """Events not applied because their aggregate is parked (they wait behind it)."""
    parked: list[Parked] = field(default_factory=list)
    """Aggregates this batch parked (or, retrying, parked again)."""
    waiting: list[Parked] = field(default_factory=list)
    """Of :attr:`parked`, those a retry goes on with (:meth:`Parked.waiting`), not failures."""
    spend: list[CountedSpend] = field(default_factory=list)
    """Workspace-months whose usage this batch changed, as committed (billing only)."""
    deferred: int = 0
    """Events left for the pass that follows at once: healing the gap before them would have
    passed the pass's byte bound (see :attr:`ProjectionRunner.max_heal_bytes`)."""

    def followed_by(self, then: BatchOutcome) -> BatchOutcome:
        """This pass's outcome and the next pass's over the same batch, as one: that pass sees
        again every event this one applied, as a duplicate, and every event held as held."""
        return BatchOutcome(
            applied=self.applied + then.applied,
            duplicates=then.duplicates - self.applied,
            healed=self.healed + then.healed,
            position=then.position,
            changes=self.changes + then.changes,
            held=then.held,
            parked=then.parked,
            waiting=then.waiting,
            spend=self.spend + then.spend,
            deferred=then.deferred,
        )


@dataclass(frozen=True)
class Parked:
    """An aggregate a projector could not apply an event of, and that event."""

    originator_id: UUID
    originator_version: int
    position: int
    event_type: str
    workspace_id: UUID | None
    error: str

    @classmethod
    def of(cls, envelope: EventEnvelope, error: BaseException | str) -> Parked:
        """Parked at ``envelope`` because of ``error`` (an exception, or what to say)."""
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        return cls(
            envelope.originator_id,
            envelope.originator_version,
            envelope.position,
            envelope.type,
            envelope.workspace_id,
            text[:MAX_ERROR_LENGTH],
        )

    @classmethod
    def waiting(cls, event: EventHeader) -> Parked:
        """Where a retry that applied its events up to ``event`` leaves its aggregate to go on
        from (see :meth:`ProjectionRunner.retry_parked`): not an error of the event."""
        return cls(
            event.originator_id,
            event.originator_version,
            event.position,
            event.type,
            event.workspace_id,
            f"{RETRY_PENDING}: the events before this one are applied; `agentworks parked retry`"
            " applies the rest",
        )

    def row(self, projector: str) -> tuple[Any, ...]:
        return (
            projector,
            self.originator_id,
            self.originator_version,
            self.position,
            self.event_type,
            self.workspace_id,
            self.error,
        )


@dataclass(frozen=True)
class Retried:
    """A parked aggregate tried again: how many of its events applied, and, when one failed
    again, where it is parked now."""

    originator_id: UUID
    applied: int
    parked: Parked | None


class _Poisoned(Exception):
    """Applying one event, on its own, failed: its aggregate is to be parked."""

    def __init__(self, envelope: EventEnvelope, error: BaseException) -> None:
        super().__init__(str(error))
        self.envelope = envelope
        self.error = error


@dataclass
class _Attempt:
    """How the next try at a batch goes: which aggregates it parks, and whether it applies the
    events one by one (which tells which one fails)."""

    one_by_one: bool
    parking: dict[UUID, Parked] = field(default_factory=dict)
    unpark: frozenset[UUID] = frozenset()
    waiting: tuple[Parked, ...] = ()
    """Of ``parking``, where retries stop for now (:meth:`Parked.waiting`), not failures."""


@dataclass
class _Healing:
    """One pass's budget of bytes for healing gaps, and the first event it left for the next."""

    left: int
    deferred_at: int | None = None

    def defer(self, env: EventEnvelope, outcome: BatchOutcome) -> None:
        outcome.deferred += 1
        if self.deferred_at is None or env.position < self.deferred_at:
            self.deferred_at = env.position

    def covered(self, position: int) -> int:
        """The position a pass covers: not up to an event it left for the next pass."""
        return position if self.deferred_at is None else min(position, self.deferred_at - 1)


@dataclass
class _Exclusive:
    versions: dict[int, int]
    """Aggregate (its UUID as an int, which hashes in C) → the version applied."""
    copy: bool
    memo: dict[str, Any] = field(default_factory=dict)
    parked: dict[int, Parked] = field(default_factory=dict)
    """Aggregates parked during the replay, written to ``projection_parked`` at the end."""

    def drop_memo(self) -> None:
        self.memo.clear()
        self.memo[MEMO_DROPPED] = True


_UPSERT_PARKED = (
    "INSERT INTO projection_parked (projector, originator_id, originator_version, position,"
    " event_type, workspace_id, error) VALUES (%s, %s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (projector, originator_id) DO UPDATE SET"
    " originator_version = EXCLUDED.originator_version, position = EXCLUDED.position,"
    " event_type = EXCLUDED.event_type, workspace_id = EXCLUDED.workspace_id,"
    " error = EXCLUDED.error, attempts = projection_parked.attempts + 1,"
    " failed_at = clock_timestamp()"
)


_MOVE_PARKED = (
    "UPDATE projection_parked SET originator_version = %s, position = %s, event_type = %s,"
    " workspace_id = %s, error = %s WHERE projector = %s AND originator_id = %s"
)


def _clash_of(error: BaseException) -> tuple[str, ...]:
    """What a write race met: its kind, the constraint and the key (PostgreSQL's detail names
    the key's values; a deadlock's names the processes, which differ every time)."""
    diag = getattr(error, "diag", None)
    if diag is None:
        return (type(error).__name__, str(error))
    return (type(error).__name__, diag.constraint_name or "", diag.message_detail or "")


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
        on_spend: Callable[[list[CountedSpend]], None] | None = None,
    ) -> None:
        self.projector = projector
        self.pool = pool
        self.log = log_reader
        self.tracking_name = tracking_name or projector.name
        self.tables = tables or Tables()
        self.on_commit = on_commit
        self.on_spend = on_spend
        """Told, after each commit, the usage totals the batch committed (the spend counter)."""
        self._lock_key = zlib.crc32(f"projector:{self.tracking_name}".encode()) & 0x7FFFFFFF
        self._exclusive: _Exclusive | None = None
        self._ignored = unread_by([projector])
        """The event types the projector ignores: one of them that cannot be decoded parks
        nothing (its payload is nothing to the projector)."""
        self.max_heal_bytes = MAX_BATCH_BYTES
        """Most bytes of stored events one pass reads to heal gaps (at least one event): what
        a pass leaves waits for the next, which follows at once in the same :meth:`process`."""
        self.max_retry_bytes = MAX_BATCH_BYTES
        """Most bytes of stored events a retry of a parked aggregate reads per transaction (at
        least one event; see :meth:`retry_parked`)."""

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

    # -- parked aggregates -------------------------------------------------------------------------

    def retry_parked(self, originator_ids: Collection[UUID] | None = None) -> list[Retried]:
        """Apply the events of parked aggregates again (all of them, or ``originator_ids``),
        after a fix: each aggregate on its own, its events in order from the one it stopped
        at, at most :data:`RETRY_CHUNK` (and :attr:`max_retry_bytes` of stored state) per
        transaction. One that fails again stays parked, with the new error (and the event it
        now stops at, if the fix got it further)."""
        return [self.retry_from(oid, version) for oid, version in self.parked(originator_ids)]

    def parked(self, originator_ids: Collection[UUID] | None = None) -> list[tuple[UUID, int]]:
        """The parked aggregates (all, or those of ``originator_ids``), each with the version
        it stopped at, in the order they were parked: what :meth:`retry_parked` retries, for a
        caller that shows its progress one aggregate at a time (:meth:`retry_from`)."""
        with self.pool.connection() as conn:
            rows = conn.execute(
                "SELECT originator_id, originator_version FROM projection_parked"
                " WHERE projector = %s AND (%s::uuid[] IS NULL OR originator_id = ANY(%s::uuid[]))"
                " ORDER BY position",
                (
                    self.tracking_name,
                    None if originator_ids is None else list(originator_ids),
                    None if originator_ids is None else list(originator_ids),
                ),
            ).fetchall()
        return [(row["originator_id"], int(row["originator_version"])) for row in rows]

    def retry_from(self, oid: UUID, version: int) -> Retried:
        """Apply one parked aggregate's events from ``version`` on, a chunk per transaction.

        A long-parked busy aggregate has a long tail: applied in one transaction it would be
        read whole into memory and hold its locks and rows until the end; a few large events
        (agent outputs) do the same at any count, so a chunk also stops at a byte bound (an
        event larger than it goes alone), as gap healing and the sweep do. Each chunk commits
        with the aggregate still parked at the first event after it (:meth:`Parked.waiting`,
        named by its header: its state is the next chunk's to read), so live deliveries keep
        waiting behind it, and a retry stopped half-way (a crash, a lost database) leaves it
        parked there for the next retry to go on from; the last chunk unparks it."""
        applied = 0
        while True:
            read = self.log.between_batch(
                oid,
                after_version=version - 1,
                before_version=version + RETRY_CHUNK,
                max_bytes=self.max_retry_bytes,
            )
            events = read.envelopes
            full = read.cut or len(events) == RETRY_CHUNK
            rest = (
                self.log.following(oid, after_version=events[-1].originator_version)
                if events and full
                else None
            )
            waiting = [Parked.waiting(rest)] if rest else []
            outcome = self.process(events, unpark=[oid], park=waiting)
            applied += outcome.applied + outcome.healed
            again = next((p for p in outcome.parked if p.originator_id == oid), None)
            if again is None or again not in outcome.waiting:
                break
            version = again.originator_version
        log.info(
            "projection.parked_retried",
            projector=self.tracking_name,
            originator_id=str(oid),
            applied=applied,
            parked=again is not None,
        )
        return Retried(oid, applied, again)

    # -- exclusive mode (rebuilds) -----------------------------------------------------------------

    def take_exclusive(self, *, copy: bool) -> None:
        """From now on this runner alone writes its tables and tracking (see the module's
        docstring); ``copy``: its tables are fresh and not yet under row-level security."""
        with self.pool.connection() as conn:
            rows = conn.execute(
                "SELECT originator_id, version FROM projection_versions WHERE projector = %s",
                (self.tracking_name,),
            ).fetchall()
            parked = conn.execute(
                "SELECT originator_id, originator_version, position, event_type, workspace_id,"
                " error FROM projection_parked WHERE projector = %s",
                (self.tracking_name,),
            ).fetchall()
        self._exclusive = _Exclusive(
            {r["originator_id"].int: int(r["version"]) for r in rows},
            copy,
            parked={r["originator_id"].int: Parked(**r) for r in parked},
        )

    def release_exclusive(self, *, persist: bool = True) -> None:
        """Back to shared mode, writing the versions kept in memory (and the aggregates parked)
        to the tracking tables (``persist=False``: dropping them, for a rebuild that is given
        up)."""
        exclusive, self._exclusive = self._exclusive, None
        if exclusive is None or not persist:
            return
        if not exclusive.versions and not exclusive.parked:
            return
        with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            protect(cur)
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
            if exclusive.parked:
                cur.executemany(
                    _UPSERT_PARKED,
                    [parked.row(self.tracking_name) for parked in exclusive.parked.values()],
                )

    # -- batches -----------------------------------------------------------------------------------

    def process(
        self,
        envelopes: Sequence[EventEnvelope],
        *,
        through: int | None = None,
        read_after: int | None = None,
        unpark: Collection[UUID] = (),
        park: Sequence[Parked] = (),
    ) -> BatchOutcome:
        """Apply a batch (in delivery order) in one transaction; safe to call with repeats.

        ``through``: the log position the batch covers, when that is past its last envelope
        (a reader that left out events this projector does not follow). ``read_after``: the
        caller read the log itself, in order, from this position on, so if everything up to it
        was applied (the sweep watermark of :mod:`projections.sweep` is there), everything up to
        the batch's position now is, and the watermark moves with it. ``unpark``: parked
        aggregates to try again (their rows in ``projection_parked`` go when they apply).

        An event that cannot be applied parks its aggregate instead of failing the batch (see
        the module's docstring); the outcome names what was parked.
        """
        if not envelopes and not through and not unpark:
            return BatchOutcome()
        started = time.time_ns()
        attempt = _Attempt(
            one_by_one=False,
            unpark=frozenset(unpark),
            parking={parked.originator_id: parked for parked in park},
            waiting=tuple(park),
        )
        races = 0
        clashes: set[tuple[str, ...]] = set()
        done: BatchOutcome | None = None
        while True:
            try:
                outcome = self._process_once(envelopes, through, read_after, attempt)
            except _Poisoned as poisoned:
                if self._exclusive is not None:
                    # The events applied before it in this transaction were rolled back with it.
                    self._exclusive.drop_memo()
                if self._may_retry_race(races, poisoned.error, clashes):
                    races += 1
                    continue
                self._park(attempt, Parked.of(poisoned.envelope, poisoned.error))
                continue
            except Exception as error:
                if self._may_retry_race(races, error, clashes):
                    races += 1
                    continue
                if attempt.one_by_one or is_infrastructure_failure(error):
                    raise  # not the fault of any one event
                self._one_by_one(attempt, error)
                continue
            if self.on_commit is not None and outcome.changes:
                self.on_commit(outcome.changes)
            if self.on_spend is not None and outcome.spend:
                self.on_spend(outcome.spend)
            done = outcome if done is None else done.followed_by(outcome)
            if outcome.deferred:
                races = 0
                continue  # committed; the events it left follow at once
            if self._exclusive is None:
                self._trace(envelopes, started)
                self._measure(done, started)
            return done

    def _measure(self, done: BatchOutcome, started_ns: int) -> None:
        name = self.tracking_name
        metrics.PROJECTOR_BATCH_SECONDS.labels(name).observe((time.time_ns() - started_ns) / 1e9)
        if done.applied or done.healed:
            metrics.PROJECTOR_EVENTS_APPLIED.labels(name).inc(done.applied + done.healed)

    def _park(self, attempt: _Attempt, parked: Parked) -> None:
        """The next try parks ``parked``'s aggregate. Logged as an error without a traceback:
        the error's text is what is kept, the traceback would only show the runner."""
        attempt.parking[parked.originator_id] = parked
        log.error(
            "projection.aggregate_parked",
            projector=self.tracking_name,
            originator_id=str(parked.originator_id),
            originator_version=parked.originator_version,
            position=parked.position,
            event_type=parked.event_type,
            error=parked.error,
        )

    def _may_retry_race(
        self, races: int, error: BaseException, clashes: set[tuple[str, ...]]
    ) -> bool:
        """Whether ``error`` is a write race to try again: another worker applied an overlapping
        delivery first; what it applied is now a duplicate for us, so a retry converges. (An
        exclusive runner has no such rival, and what its projector remembers across batches may
        no longer hold: no retry.)

        The same clash again after a retry (``clashes``: those met so far) is no race but the
        data's (two events with one natural key): it would meet every retry the same way, so it
        is given up at once."""
        if not is_write_race(error) or self._exclusive is not None or races + 1 >= MAX_ATTEMPTS:
            return False
        clash = _clash_of(error)
        if clash in clashes:
            return False
        clashes.add(clash)
        metrics.PROJECTOR_BATCH_RETRIES.labels(self.tracking_name, "race").inc()
        log.warning(
            "projection.batch_retry",
            projector=self.tracking_name,
            attempt=races + 1,
            error=str(error),
        )
        return True

    def _one_by_one(self, attempt: _Attempt, error: BaseException) -> None:
        """The batch failed as a whole: next, event by event, to find the event at fault."""
        log.warning(
            "projection.batch_failed",
            projector=self.tracking_name,
            error=f"{type(error).__name__}: {error}",
            next="applying its events one by one",
        )
        attempt.one_by_one = True
        metrics.PROJECTOR_BATCH_RETRIES.labels(self.tracking_name, "one_by_one").inc()
        if self._exclusive is not None:
            # What the projector remembered of the rolled-back batch was never written.
            self._exclusive.drop_memo()

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
        self,
        envelopes: Sequence[EventEnvelope],
        through: int | None,
        read_after: int | None,
        attempt: _Attempt,
    ) -> BatchOutcome:
        if self._exclusive is not None:
            return self._process_exclusively(envelopes, through, self._exclusive, attempt)
        outcome = BatchOutcome()
        followed = [env for env in envelopes if self.projector.follows(env)]
        # The aggregates to unpark too: their rows locked, no delivery of theirs slips by.
        ids = sorted({env.originator_id for env in followed} | attempt.unpark)
        with (
            self.pool.connection() as conn,
            # Pipeline mode: a batch's statements go out without waiting for each answer. Not
            # event by event: there an error must surface at the statement that caused it.
            nullcontext() if attempt.one_by_one else conn.pipeline(),
            conn.transaction(),
            conn.cursor() as cur,
        ):
            protect(cur)
            # Shared with rebuild's swap, which takes it exclusively to switch tables safely.
            cur.execute("SELECT pg_advisory_xact_lock_shared(%s)", (self._lock_key,))
            versions, parked = self._lock_versions(cur, ids)
            held = parked - attempt.unpark
            start = dict(versions)
            to_apply: list[EventEnvelope] = []
            healing = _Healing(self.max_heal_bytes)
            for env in followed:
                oid = env.originator_id
                if oid in held:
                    outcome.held += 1
                    continue
                done = versions.get(oid, 0)
                if env.originator_version <= done:
                    outcome.duplicates += 1
                    continue
                limit = attempt.parking.get(oid)
                whole = True
                if env.originator_version > done + 1:
                    missing, whole = self._missing(
                        env, done, None if limit is None else limit.originator_version, healing
                    )
                    if missing:
                        to_apply.extend(missing)
                        versions[oid] = missing[-1].originator_version
                        outcome.position = max([outcome.position, *(m.position for m in missing)])
                        outcome.healed += len(missing)
                        log.info(
                            "projection.gap_healed",
                            projector=self.tracking_name,
                            originator_id=str(oid),
                            from_version=done + 1,
                            to_version=missing[-1].originator_version,
                        )
                if not whole:
                    healing.defer(env, outcome)
                    continue
                if limit is not None and env.originator_version >= limit.originator_version:
                    outcome.held += 1
                    continue
                to_apply.append(env)
                versions[oid] = env.originator_version
                outcome.applied += 1
                outcome.position = max(outcome.position, env.position)
            self._apply(
                cur, to_apply, outcome.changes, outcome.spend, one_by_one=attempt.one_by_one
            )
            bump_read_versions(cur, self.projector.name, to_apply)
            last = max((env.position for env in envelopes), default=0)
            outcome.position = healing.covered(max(outcome.position, last, through or 0))
            changed = [(i, v) for i, v in versions.items() if start.get(i) != v]
            if changed:
                cur.execute(
                    "UPDATE projection_versions AS t SET version = v.version "
                    "FROM unnest(%s::uuid[], %s::bigint[]) AS v(id, version) "
                    "WHERE t.projector = %s AND t.originator_id = v.id",
                    ([i for i, _ in changed], [v for _, v in changed], self.tracking_name),
                )
            self._record_parking(cur, attempt, outcome, self._still_behind(attempt, versions))
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

    def _still_behind(self, attempt: _Attempt, versions: dict[UUID, int]) -> list[Parked]:
        """Of the aggregates this attempt unparks (a retry's last chunk), those the store holds
        events of after the ones applied, each parked to go on from the first of them.

        Asked once their tracking rows are locked: a delivery of such an event from now on
        waits for this transaction and finds the aggregate unparked. One made between the
        retry's read of the store and this transaction held its event back, the aggregate
        being parked still, and moved its position (and the embedded path's watermark) past
        it: unparked without it, the aggregate was left without that event for good."""
        behind = []
        for oid in sorted(attempt.unpark - attempt.parking.keys()):
            header = self.log.following(oid, after_version=versions.get(oid, 0))
            if header is not None:
                behind.append(Parked.waiting(header))
        return behind

    def _record_parking(
        self,
        cur: Cursor[DictRow],
        attempt: _Attempt,
        outcome: BatchOutcome,
        behind: Sequence[Parked] = (),
    ) -> None:
        """Park what this attempt found unappliable; forget what was retried and applied, but
        for the aggregates still ``behind`` (see :meth:`_still_behind`)."""
        if attempt.parking or behind:
            outcome.parked = [*attempt.parking.values(), *behind]
            outcome.waiting = [p for p in outcome.parked if p in attempt.waiting or p in behind]
            failed = [p for p in outcome.parked if p not in outcome.waiting]
            if failed:
                cur.executemany(_UPSERT_PARKED, [p.row(self.tracking_name) for p in failed])
            moved = outcome.waiting
            if moved:
                # A retry's progress: no failure, so no attempt counted.
                cur.executemany(
                    _MOVE_PARKED,
                    [
                        (*p.row(self.tracking_name)[2:], self.tracking_name, p.originator_id)
                        for p in moved
                    ],
                )
        released = sorted(
            attempt.unpark - attempt.parking.keys() - {p.originator_id for p in behind}
        )
        if released:
            cur.execute(
                "DELETE FROM projection_parked WHERE projector = %s"
                " AND originator_id = ANY(%s::uuid[])",
                (self.tracking_name, released),
            )

    def _process_exclusively(
        self,
        envelopes: Sequence[EventEnvelope],
        through: int | None,
        exclusive: _Exclusive,
        attempt: _Attempt,
    ) -> BatchOutcome:
        """:meth:`_process_once` for an exclusive runner: versions from memory, no locks."""
        outcome = BatchOutcome()
        known = exclusive.versions
        held = exclusive.parked
        parking = {oid.int: parked.originator_version for oid, parked in attempt.parking.items()}
        applied: dict[int, int] = {}
        to_apply: list[EventEnvelope] = []
        follows = self.projector.follows
        healing = _Healing(self.max_heal_bytes)
        for env in envelopes:
            if not follows(env):
                continue
            key = env.originator_id.int
            if held and key in held:
                outcome.held += 1
                continue
            done = applied.get(key) or known.get(key, 0)
            version = env.originator_version
            if version <= done:
                outcome.duplicates += 1
                continue
            limit = parking.get(key) if parking else None
            if version > done + 1:
                missing, whole = self._missing(env, done, limit, healing)
                if missing:
                    to_apply.extend(missing)
                    applied[key] = missing[-1].originator_version
                    outcome.healed += len(missing)
                if not whole:
                    healing.defer(env, outcome)
                    continue
            if limit is not None and version >= limit:
                outcome.held += 1
                continue
            to_apply.append(env)
            applied[key] = version
        outcome.applied = len(to_apply) - outcome.healed
        last = max((env.position for env in envelopes), default=0)
        outcome.position = healing.covered(
            max(last, through or 0, *(env.position for env in to_apply[-1:]))
        )
        with (
            self.pool.connection() as conn,
            conn.transaction(),
            conn.cursor() as cur,
        ):
            protect(cur)
            cur.execute("SET LOCAL synchronous_commit = off")
            cur.execute("SELECT pg_advisory_xact_lock_shared(%s)", (self._lock_key,))
            self._apply(cur, to_apply, outcome.changes, None, one_by_one=attempt.one_by_one)
            cur.execute(
                "INSERT INTO projection_positions (projector, position) VALUES (%s, %s) "
                "ON CONFLICT (projector) DO UPDATE SET "
                "position = GREATEST(projection_positions.position, EXCLUDED.position), "
                "updated_at = clock_timestamp()",
                (self.tracking_name, outcome.position),
            )
        known.update(applied)
        if attempt.parking:
            outcome.parked = list(attempt.parking.values())
            held.update({parked.originator_id.int: parked for parked in outcome.parked})
        return outcome

    def _apply(
        self,
        cur: Cursor[DictRow],
        envelopes: list[EventEnvelope],
        changes: list[Change],
        spend: list[CountedSpend] | None,
        *,
        one_by_one: bool = False,
    ) -> None:
        """Hand ``envelopes`` to the projector: all at once, or (``one_by_one``) each in a
        batch of its own, so that the event an error comes from is known."""
        if not envelopes:
            return
        ignored = self._ignored
        for env in envelopes:
            if UNDECODABLE in env.metadata and env.type not in ignored:
                # Parked as it is, in any mode: a projector would take its empty payload for
                # an event it has nothing to do with, and pass over it for good. (Of a type it
                # ignores, the payload is nothing to it: passed over as decoded ones are.)
                raise _Poisoned(env, UndecodableEvent(env.metadata[UNDECODABLE]))
        if not one_by_one:
            self.projector.apply_batch(self._context(cur, changes, spend), envelopes)
            return
        for env in envelopes:
            try:
                self.projector.apply_batch(self._context(cur, changes, spend), [env])
            except Exception as error:
                if is_infrastructure_failure(error):
                    raise
                raise _Poisoned(env, error) from error

    def _context(
        self, cur: Cursor[DictRow], changes: list[Change], spend: list[CountedSpend] | None
    ) -> BatchContext:
        exclusive = self._exclusive
        if exclusive is None:
            return BatchContext(cur, self.tables, changes=changes, spend=spend)
        return BatchContext(
            cur,
            self.tables,
            changes=None,
            copy=exclusive.copy,
            memo=exclusive.memo,
            exclusive=True,
        )

    def _lock_versions(
        self, cur: Cursor[DictRow], ids: list[UUID]
    ) -> tuple[dict[UUID, int], set[UUID]]:
        """Claim the tracking rows of the batch's aggregates (creating them at version 0); and
        which of them are parked.

        Inserting first makes two workers delivered the same new aggregate queue on its row
        instead of both applying its first event.
        """
        if not ids:
            return {}, set()
        cur.execute(
            "INSERT INTO projection_versions (projector, originator_id, version) "
            "SELECT %s, id, 0 FROM unnest(%s::uuid[]) AS id ORDER BY id "
            "ON CONFLICT (projector, originator_id) DO NOTHING",
            (self.tracking_name, ids),
        )
        # Locked, then asked which are parked, each statement on a cursor of its own (see
        # projections.batch.fetch_all), both sent in one round trip when pipelined: the server
        # runs the second once the rows are locked. Asked in the locking statement, it was
        # answered as of that statement's snapshot, taken before waiting: a retry that unparked
        # an aggregate meanwhile (and held its row) left it parked there, and its event
        # delivered meanwhile was held back for nothing.
        conn = cur.connection
        with conn.cursor(row_factory=cur.row_factory) as locked, conn.cursor() as parked:
            locked.execute(
                "SELECT originator_id, version FROM projection_versions "
                "WHERE projector = %s AND originator_id = ANY(%s::uuid[]) "
                "ORDER BY originator_id FOR UPDATE",
                (self.tracking_name, ids),
            )
            parked.execute(
                "SELECT originator_id FROM projection_parked "
                "WHERE projector = %s AND originator_id = ANY(%s::uuid[])",
                (self.tracking_name, ids),
            )
            rows = locked.fetchall()
            held = {row["originator_id"] for row in parked.fetchall()}
        return {row["originator_id"]: int(row["version"]) for row in rows}, held

    def _missing(
        self, env: EventEnvelope, done: int, limit: int | None, healing: _Healing
    ) -> tuple[list[EventEnvelope], bool]:
        """The events of ``env``'s aggregate after ``done`` and before it (and ``limit``), as
        far as the pass's byte budget goes; and whether that was all of them (if not, ``env``
        waits for the next pass, which reads on from there)."""
        if healing.left <= 0:
            return [], False
        upto = env.originator_version if limit is None else min(limit, env.originator_version)
        read = self.log.between_batch(
            env.originator_id, after_version=done, before_version=upto, max_bytes=healing.left
        )
        healing.left = 0 if read.cut else healing.left - read.size
        missing = read.envelopes
        read_to = missing[-1].originator_version + 1 if read.cut else None
        self._check_contiguous(env, done, missing, limit, read_to=read_to)
        return missing, not read.cut

    @staticmethod
    def _check_contiguous(
        env: EventEnvelope,
        done: int,
        missing: list[EventEnvelope],
        limit: int | None = None,
        *,
        read_to: int | None = None,
    ) -> None:
        """The store gave every version between ``done`` and ``env``'s (or ``limit``, where
        the aggregate is being parked, or ``read_to``, where a read was cut). If it lacks one (a
        message from another deployment's store, topics that outlived a database restored to
        an earlier point), that is this aggregate's problem alone: it is parked at the first
        missing version."""
        upto = env.originator_version if limit is None else min(limit, env.originator_version)
        if read_to is not None:
            upto = min(upto, read_to)
        expected = list(range(done + 1, upto))
        got = [m.originator_version for m in missing if m.originator_version < upto]
        if got != expected:
            absent = sorted(set(expected) - set(got)) or [done + 1]
            error = RuntimeError(
                f"store is missing versions {absent} of aggregate {env.originator_id}; cannot"
                f" heal the gap before version {env.originator_version} (delivered at position"
                f" {env.position})"
            )
            raise _Poisoned(env.model_copy(update={"originator_version": absent[0]}), error)
