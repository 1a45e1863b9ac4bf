"""Batches read from the log are bounded by bytes as well as by count.

The relay read 2,000 events per batch and the embedded fan-out 500, whatever their size: a
stretch of large events (agent outputs, log chunks, long descriptions) made one batch of
hundreds of megabytes, held whole in memory, sent as one burst to the broker and applied in one
transaction. Now PostgreSQL cuts a batch where its states pass the byte bound (an event larger
than the bound goes alone), and a cut batch is followed at once by the next, as a full one is.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import pytest
from board_helpers import add_cards, bootstrap_board, stored_head, to_the_head, whole_log
from fanout_helpers import EmbeddedPath, projector_side, rows
from test_undecodable_events import RecordingProducer

from commands import models as m
from orchestrator.service import Orchestrator
from projections.kanban import KanbanProjector
from projections.runner import ProjectionRunner
from projections.sweep import ProjectionSweep
from streams.relay import Relay, RelayPositions

if TYPE_CHECKING:
    from collections.abc import Sequence
    from uuid import UUID

    from adapters.eventlog import EventLog, LogBatch
    from commands.handlers import AgentWorks
    from domain.envelope import EventEnvelope
    from projections.runner import BatchOutcome

#: Characters of each large description: a stored event of a little more than this many bytes.
LARGE = 90_000

#: The byte bound the tests set: three large events fit, a fourth does not.
BOUND = 300_000


def large_edits(app: AgentWorks, count: int) -> UUID:
    """A card of a new board, edited ``count`` times with a description of :data:`LARGE`."""
    board = bootstrap_board(app)
    (card,) = add_cards(app, board, 1)
    for n in range(count):
        description = chr(ord("a") + n) * LARGE
        app.update_card(m.UpdateCard(card_id=card, description=description), board.owner)
    return card


def large_in(batch: list[EventEnvelope]) -> int:
    return sum(len(str(e.payload.get("description") or "")) for e in batch)


def test_the_relay_cuts_a_batch_of_large_events_at_its_byte_bound(
    database_url: str, app: AgentWorks
) -> None:
    large_edits(app, 7)
    producer = RecordingProducer()
    with projector_side(database_url) as (_, log):
        relay = Relay(log, lambda: producer, RelayPositions(database_url, role=None))
        relay.max_batch_bytes = BOUND
        batches = []

        def publish() -> None:
            while published := relay.publish_once():
                batches.append(producer.sent[-published:])

        try:
            head = to_the_head(publish, lambda: relay.position, log)
            assert relay.position == head
        finally:
            relay.positions.close()
    assert sum(map(large_in, batches)) == 7 * LARGE
    assert max(map(large_in, batches)) <= 3 * LARGE
    assert len(batches) >= 3


def test_a_batch_stops_before_the_event_that_passes_the_bound_and_a_larger_one_goes_alone(
    database_url: str, app: AgentWorks
) -> None:
    large_edits(app, 2)
    with projector_side(database_url) as (_, log):
        small, more = log.read_batch(0, 1000, max_bytes=LARGE // 2)
        assert more
        assert small
        assert large_in(small) == 0  # the small events before the first large one
        after = small[-1].position
        for _ in range(2):
            (alone,), more = log.read_batch(after, 1000, max_bytes=LARGE // 2)
            assert large_in([alone]) == LARGE
            after = alone.position
        assert log.read_batch(after, 1000, max_bytes=LARGE // 2) == ([], False)
        # Unbounded by bytes, a batch is bounded by its count alone, as before.
        everything, more = log.read_batch(0, 1000, max_bytes=None)
        assert (len(everything), more) == (len(small) + 2, False)


def test_the_embedded_fanout_applies_large_events_a_bounded_batch_at_a_time(
    database_url: str, app: AgentWorks
) -> None:
    path = EmbeddedPath(database_url)
    try:
        path.fanout.drain()
        card = large_edits(app, 7)
        path.fanout.max_batch_bytes = BOUND
        reads: list[int] = []
        run_once = path.fanout.run_once

        def counted() -> int:
            reads.append(run_once())
            return reads[-1]

        path.fanout.run_once = counted  # type: ignore[method-assign]
        path.fanout.drain()
        # The whole backlog in one drain (a cut batch is no end of the log), none past the bound.
        assert set(path.fanout.positions().values()) == {path.log.head()}
        assert max(reads) <= 3 + 4  # three large events, and the small ones of the new board
        assert len(reads) >= 3
        ((description,),) = rows(
            database_url, "SELECT description FROM rm_cards WHERE card_id = %s", card
        )
        assert description == "g" * LARGE
    finally:
        path.stop()


def test_the_orchestrator_follows_the_log_a_bounded_batch_at_a_time(
    database_url: str, app: AgentWorks
) -> None:
    """The orchestrator reads the whole log from its start (for the runs it may execute), every
    event's stored state included: 1,000 at a time whatever their size, until today. It is cut
    at the byte bound too, and a cut batch is no end of the log: it goes on at once and starts
    scheduling only once it has read up to the head."""
    large_edits(app, 7)
    with projector_side(database_url) as (_, log):
        orchestrator = Orchestrator(app, log, {})
        orchestrator.max_batch_bytes = BOUND
        reads = []
        try:
            while not orchestrator.caught_up:
                asyncio.run(orchestrator._tail())
                reads.append(orchestrator.position)
        finally:
            orchestrator._executor.shutdown()
        assert orchestrator.position == log.head()
    assert len(reads) >= 3  # seven large events, at most three a batch


def _kanban_without_the_edits(
    pool: Any, log: EventLog, card: UUID
) -> tuple[ProjectionRunner, list[EventEnvelope]]:
    """A kanban runner delivered every event but ``card``'s large edits; and those edits."""
    runner = ProjectionRunner(KanbanProjector(), pool, log)
    everything = whole_log(log)
    edits = [e for e in everything if e.originator_id == card and e.type == "Card.Edited"]
    runner.process([e for e in everything if e not in edits])
    return runner, edits


def _description(database_url: str, card: UUID) -> str:
    ((found,),) = rows(database_url, "SELECT description FROM rm_cards WHERE card_id = %s", card)
    return str(found)


def test_the_sweep_reads_a_lost_stretch_of_large_events_a_bounded_batch_at_a_time(
    database_url: str, app: AgentWorks
) -> None:
    """The sweep read every lagging aggregate's missing events in one query and applied them in
    one transaction, whatever their size."""
    card = large_edits(app, 7)
    with projector_side(database_url) as (pool, log):
        runner, _ = _kanban_without_the_edits(pool, log, card)
        applied: list[list[EventEnvelope]] = []
        process = runner.process

        def recording(envelopes: Sequence[EventEnvelope], **kwargs: Any) -> BatchOutcome:
            applied.append(list(envelopes))
            return process(envelopes, **kwargs)

        runner.process = recording  # type: ignore[method-assign]
        sweep = ProjectionSweep(runner)
        sweep.max_batch_bytes = BOUND
        outcomes = []
        head = to_the_head(
            lambda: outcomes.append(sweep.sweep(stored_head(log))), sweep.watermark, log
        )
    assert outcomes[-1].swept_through == head
    assert sum(outcome.healed for outcome in outcomes) == 7
    assert sum(map(large_in, applied)) == 7 * LARGE
    assert max(map(large_in, applied)) <= 3 * LARGE
    assert len(applied) >= 3
    assert _description(database_url, card) == "g" * LARGE


@pytest.mark.parametrize("exclusive", [False, True], ids=["shared", "exclusive"])
def test_healing_a_gap_of_large_events_reads_a_bounded_batch_per_transaction(
    database_url: str, app: AgentWorks, exclusive: bool
) -> None:
    """Healing read the whole gap before a delivered event in one query, into one transaction.
    Now a pass heals what fits in its bound, commits, and the next pass follows at once (as a
    rebuild's exclusive runner does too)."""
    card = large_edits(app, 7)
    with projector_side(database_url) as (pool, log):
        runner, edits = _kanban_without_the_edits(pool, log, card)
        runner.max_heal_bytes = BOUND
        reads: list[list[EventEnvelope]] = []
        between_batch = log.between_batch

        def recording(*args: Any, **kwargs: Any) -> LogBatch:
            read = between_batch(*args, **kwargs)
            reads.append(read.envelopes)
            return read

        log.between_batch = recording  # type: ignore[method-assign]
        if exclusive:
            runner.take_exclusive(copy=False)
        outcome = runner.process(edits[-1:])
        if exclusive:
            runner.release_exclusive()
        assert runner.position() >= edits[-1].position
    assert sum(map(large_in, reads)) == 6 * LARGE
    assert max(map(large_in, reads)) <= 3 * LARGE
    assert len(reads) >= 2
    assert (outcome.applied, outcome.healed, outcome.deferred, outcome.duplicates) == (1, 6, 0, 0)
    assert _description(database_url, card) == "g" * LARGE
