"""The embedded fan-out's kept reads: a read kept for the projectors behind says what the log
held when it was read, not what it holds now.

A projector that comes to a position after another read there (it was behind: its last batch
failed, or a rebuild's swap moved it) is handed that read. The read reached the log's head then;
events appended since were never in it. ``drain()`` took such a read, not cut at a bound, for
"nothing more to read" and returned with the projector short of the head: a rebuild whose swap
left the board's projector behind the others lost the cards written meanwhile from the board
until the next write woke the fan-out (tests/integration/test_rls_and_rebuild.py, under load).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from read_side_helpers import ReadSide

from commands import models as m
from domain.envelope import EventEnvelope
from projections.activity import ActivityProjector
from projections.kanban import KanbanProjector
from projections.runner import BatchOutcome, ProjectionRunner
from streams.embedded import EmbeddedFanout


class _FailsOnce(ProjectionRunner):
    """A runner whose first batch fails as a whole (its database away, say)."""

    failed = False

    def process(self, envelopes: Sequence[EventEnvelope], **kwargs: Any) -> BatchOutcome:
        if not self.failed:
            self.failed = True
            raise ConnectionError("the first batch could not be written")
        return super().process(envelopes, **kwargs)


def test_a_projector_handed_a_read_kept_from_before_the_log_grew_is_drained_to_the_head(
    side: ReadSide,
) -> None:
    world = side.new_world(owner="kept-reads")

    def card(title: str) -> None:
        side.app.create_card(m.CreateCard(project_id=world.project_id, title=title), world.owner)

    for title in ("one", "two", "three"):
        card(title)
    side.envelopes()  # the log holds them
    board = _FailsOnce(KanbanProjector(), side.pool, side.log)
    feed = ProjectionRunner(ActivityProjector(), side.pool, side.log)
    fanout = EmbeddedFanout(side.log, [board, feed])
    with pytest.raises(ConnectionError):
        fanout.run_once()  # the feed applies the read; the board's batch fails
    for title in ("four", "five"):
        card(title)
    head = side.envelopes()[-1].position

    fanout.drain()

    assert fanout.positions() == {board.name: head, feed.name: head}
    titles = side.rows("SELECT title FROM rm_cards WHERE project_id = %s", (world.project_id,))
    assert sorted(row["title"] for row in titles) == ["five", "four", "one", "three", "two"]
