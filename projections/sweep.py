"""The sweep: a projector compares its tracking with the log and applies what never reached it.

Gap healing in :class:`~projections.runner.ProjectionRunner` repairs a lost delivery when a later
event of the same aggregate arrives. Nothing arrives after the *last* event of an aggregate, so a
lost tail (a message dropped on the way, a broker that restarted and forgot what its consumers had
not read yet) would stay lost. The sweep closes that hole: it walks the log behind a watermark
(``projection_positions.swept_through``), asks the projector's tracking which of those events it
has not applied, reads them from the store and applies them through the runner, which ignores
whatever a delivery applied in the meantime. Everything at or below the watermark is applied,
or waits behind a parked aggregate (see :mod:`projections.runner`): the runner holds those events
back, on this path as on every other.

The sweep only looks at events published a while ago (the caller passes a ``through`` position
that is one sweep interval old), so in steady state it finds nothing and reads only the log's
small columns, never the event state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from adapters.eventlog import MAX_BATCH_BYTES
from adapters.metrics import SWEEP_HEALED

if TYPE_CHECKING:
    from uuid import UUID

    from domain.envelope import EventEnvelope
    from projections.runner import ProjectionRunner

log = structlog.get_logger(__name__)

PAGE = 5000


@dataclass
class SweepOutcome:
    swept_through: int
    healed: int


class ProjectionSweep:
    """Brings one projector's watermark up to a position, healing what it finds missing."""

    def __init__(self, runner: ProjectionRunner, *, page: int = PAGE) -> None:
        self.runner = runner
        self.page = page
        self.max_batch_bytes = MAX_BATCH_BYTES
        """Most bytes of stored events read from the store for one batch to apply (at least
        one event), as every reader of the log: a lost stretch of large events is read and
        applied a bounded batch at a time."""

    def watermark(self) -> int:
        with self.runner.pool.connection() as conn:
            row = conn.execute(
                "SELECT swept_through FROM projection_positions WHERE projector = %s",
                (self.runner.tracking_name,),
            ).fetchone()
        return int(row["swept_through"]) if row else 0

    def sweep(
        self,
        through: int,
        *,
        heal: bool = True,
        progress: Callable[[int], None] | None = None,
    ) -> SweepOutcome:
        """Apply every followed event up to ``through`` that is not applied yet; advance the
        watermark page by page (a failure keeps what was swept so far). ``progress`` hears the
        watermark after each page.

        Never past the log's readable head: a position beyond it may still be written, and the
        watermark must not pass an event it has not seen.

        ``heal=False`` applies nothing: the watermark (and the position with it) goes up to the
        first event not applied (nor held behind a parked aggregate), and stops there. What a
        worker with sweeps off does: it knows how far it has applied everything, which its
        deliveries alone cannot tell, since they bring its own topics only."""
        through = min(through, self.runner.log.head())
        swept = self.watermark()
        healed = 0
        aggregates = self.runner.projector.aggregates
        while swept < through:
            events, read_up_to = self.runner.log.versions(
                after=swept, through=through, limit=self.page, aggregates=aggregates
            )
            if not heal:
                unapplied = self._first_unapplied(events)
                if unapplied is not None:
                    if unapplied - 1 > swept:
                        self._advance(unapplied - 1)
                        swept = unapplied - 1
                    break
                if read_up_to <= swept:
                    break
                self._advance(read_up_to)
                swept = read_up_to
                continue
            behind = self._behind(events)
            from_store = 0
            while behind:
                read = self.runner.log.within_batch(behind, max_bytes=self.max_batch_bytes)
                if read.envelopes:
                    outcome = self.runner.process(read.envelopes)
                    # The runner counts the gaps it filled itself; what it applied came from here.
                    from_store += outcome.applied
                    healed += outcome.applied + outcome.healed
                if not read.cut:
                    break
                behind = _rest(behind, read.envelopes)  # at once: a cut batch is no end
            if read_up_to <= swept:
                break  # held back by the horizon: the next sweep goes on from here
            self._advance(read_up_to, from_store)
            swept = read_up_to
            if progress is not None:
                progress(swept)
        if healed:
            SWEEP_HEALED.labels(projector=self.runner.projector.name).inc(healed)
            log.warning(
                "projection.sweep_healed",
                projector=self.runner.tracking_name,
                events=healed,
                through=swept,
            )
        return SweepOutcome(swept, healed)

    def _behind(self, events: list[tuple[int, UUID, int]]) -> list[tuple[UUID, int, int]]:
        """The ranges of ``events`` this projector's tracking has not reached, to read from
        the store: each lagging aggregate's versions in the page, from its tracked one (or, if
        that is lower, the one before its first in the page) up to its newest (both bounds
        exclusive).

        Not the versions below the page: they lie below the watermark, applied or held behind
        a parked aggregate. A parked aggregate's tracking stays where it was parked, and its
        held tail, read from there, was read whole again at every sweep that saw one more of
        its events. Should it have been unparked since, the runner reads what lies between as
        a gap before the first event given it, as for any delivery."""
        if not events:
            return []
        newest: dict[UUID, int] = {}
        oldest: dict[UUID, int] = {}
        for _, originator_id, version in events:
            newest[originator_id] = max(version, newest.get(originator_id, 0))
            oldest[originator_id] = min(version, oldest.get(originator_id, version))
        tracked = self._tracked(list(newest))
        return [
            (originator_id, max(done, oldest[originator_id] - 1), version + 1)
            for originator_id, version in newest.items()
            if (done := tracked.get(originator_id, 0)) < version
        ]

    def _first_unapplied(self, events: list[tuple[int, UUID, int]]) -> int | None:
        """The position of the first of ``events`` this projector has not applied, leaving out
        those held behind a parked aggregate (they wait for a retry, not for a delivery)."""
        tracked = self._tracked(list({originator_id for _, originator_id, _ in events}))
        lagging = [(p, oid) for p, oid, version in events if version > tracked.get(oid, 0)]
        if not lagging:
            return None
        with self.runner.pool.connection() as conn:
            rows = conn.execute(
                "SELECT originator_id FROM projection_parked "
                "WHERE projector = %s AND originator_id = ANY(%s::uuid[])",
                (self.runner.tracking_name, list({oid for _, oid in lagging})),
            ).fetchall()
        parked = {row["originator_id"] for row in rows}
        return min((p for p, oid in lagging if oid not in parked), default=None)

    def _tracked(self, originator_ids: list[UUID]) -> dict[UUID, int]:
        """The version this projector has applied of each of ``originator_ids`` it has one of."""
        if not originator_ids:
            return {}
        with self.runner.pool.connection() as conn:
            rows = conn.execute(
                "SELECT originator_id, version FROM projection_versions "
                "WHERE projector = %s AND originator_id = ANY(%s::uuid[])",
                (self.runner.tracking_name, originator_ids),
            ).fetchall()
        return {row["originator_id"]: int(row["version"]) for row in rows}

    def _advance(self, position: int, healed: int = 0) -> None:
        """The watermark to ``position``, and the projector's position with it: everything up
        to there is applied (or waits behind a parked aggregate), which is what the position
        says. A worker is delivered its own topics only, so without this its position stayed
        at the last event of those while the log went on with others (lag, ``/readyz``)."""
        with self.runner.pool.connection() as conn:
            conn.execute(
                "INSERT INTO projection_positions (projector, position, swept_through, healed) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (projector) DO UPDATE SET "
                "position = GREATEST(projection_positions.position, EXCLUDED.position), "
                "swept_through = GREATEST(projection_positions.swept_through, "
                "EXCLUDED.swept_through), healed = projection_positions.healed + EXCLUDED.healed",
                (self.runner.tracking_name, position, position, healed),
            )


def _rest(
    ranges: list[tuple[UUID, int, int]], read: list[EventEnvelope]
) -> list[tuple[UUID, int, int]]:
    """``ranges`` without what a cut read of them took: the first events of each, in log order."""
    reached: dict[UUID, int] = {}
    for env in read:
        reached[env.originator_id] = max(env.originator_version, reached.get(env.originator_id, 0))
    rest = [(oid, max(after, reached.get(oid, after)), before) for oid, after, before in ranges]
    return [(oid, after, before) for oid, after, before in rest if after + 1 < before]
