"""Batches read from the log are bounded by bytes as well as by count.

The relay read 2,000 events per batch and the embedded fan-out 500, whatever their size: a
stretch of large events (agent outputs, log chunks, long descriptions) made one batch of
hundreds of megabytes, held whole in memory, sent as one burst to the broker and applied in one
transaction. Now PostgreSQL cuts a batch where its states pass the byte bound (an event larger
than the bound goes alone), and a cut batch is followed at once by the next, as a full one is.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from board_helpers import add_cards, bootstrap_board
from fanout_helpers import EmbeddedPath, projector_side, rows
from test_undecodable_events import RecordingProducer

from commands import models as m
from orchestrator.service import Orchestrator
from streams.relay import Relay, RelayPositions

if TYPE_CHECKING:
    from uuid import UUID

    from commands.handlers import AgentWorks
    from domain.envelope import EventEnvelope

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
        try:
            while published := relay.publish_once():
                batches.append(producer.sent[-published:])
            assert relay.position == log.head()
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
