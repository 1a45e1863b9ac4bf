"""A batch is applied whole in pipeline mode, whenever the server's answers arrive.

In pipeline mode psycopg hands a statement's answer to its cursor when it reads it, which can
be while a later statement of that cursor is under way: a statement whose answer overflows the
server's send buffer flushes the answers queued before it, and whatever is sent next reads
them. A cursor that ran a command and then a query could so hold the command's answer when its
rows were fetched ("the last operation didn't produce records"), and the batch fell back to
applying its events one by one. Here each statement sent is followed by a pause, as a worker
thread descheduled between two statements would be, which lets every answer arrive early.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest
from read_side_helpers import ReadSide

from commands import models as m
from projections.registry import all_projectors
from projections.runner import ProjectionRunner

CARDS = 300
"""Enough aggregates that locking their tracking rows answers more than the server buffers."""


@pytest.fixture
def descheduled_after_each_send(monkeypatch: pytest.MonkeyPatch) -> None:
    sent = psycopg.Cursor.execute

    def execute(self: psycopg.Cursor[Any], *args: Any, **kwargs: Any) -> Any:
        result = sent(self, *args, **kwargs)
        if self.connection.pgconn.pipeline_status != psycopg.pq.PipelineStatus.OFF:
            time.sleep(0.01)
        return result

    monkeypatch.setattr(psycopg.Cursor, "execute", execute)


def test_a_batch_of_many_aggregates_is_applied_whole_when_answers_come_early(
    side: ReadSide, monkeypatch: pytest.MonkeyPatch, descheduled_after_each_send: None
) -> None:
    world = side.new_world(owner="pipelined")
    for n in range(CARDS):
        side.app.create_card(
            m.CreateCard(project_id=world.project_id, title=f"card {n}"), world.owner
        )
    envelopes = side.envelopes()
    fallbacks: list[str] = []
    one_by_one = ProjectionRunner._one_by_one

    def spied(runner: ProjectionRunner, attempt: Any, error: BaseException) -> None:
        fallbacks.append(f"{runner.tracking_name}: {type(error).__name__}: {error}")
        one_by_one(runner, attempt, error)

    monkeypatch.setattr(ProjectionRunner, "_one_by_one", spied)
    for projector in all_projectors():
        side.runner(projector).process(envelopes)
    assert fallbacks == []
    cards = side.rows("SELECT count(*) AS n FROM rm_cards WHERE project_id = %s",
                      (world.project_id,))  # fmt: skip
    assert cards[0]["n"] == CARDS
