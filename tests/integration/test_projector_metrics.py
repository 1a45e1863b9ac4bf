"""What a projector tells ``/metrics`` about its batches: how long each took, how many events it
applied, and how often a batch was rolled back and applied again event by event."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prometheus_client import REGISTRY
from read_side_helpers import ReadSide

from commands import models as m
from domain.envelope import EventEnvelope
from projections.kanban import KanbanProjector


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_batch_is_timed_and_its_applied_events_counted(side: ReadSide) -> None:
    world = side.new_world(owner="measured")
    for title in ("one", "two", "three"):
        side.app.create_card(m.CreateCard(project_id=world.project_id, title=title), world.owner)
    envelopes = side.envelopes()
    followed = sum(KanbanProjector().follows(env) for env in envelopes)
    before = (
        sample("agentworks_projector_batch_seconds_count", projector="kanban"),
        sample("agentworks_projector_events_applied_total", projector="kanban"),
    )
    side.runner(KanbanProjector()).process(envelopes)
    side.runner(KanbanProjector()).process(envelopes)  # every one a duplicate now
    after = (
        sample("agentworks_projector_batch_seconds_count", projector="kanban"),
        sample("agentworks_projector_events_applied_total", projector="kanban"),
    )
    assert followed > 3
    assert (after[0] - before[0], after[1] - before[1]) == (2, followed)


class _FailsWhole(KanbanProjector):
    """A fold that fails on any batch of more than one event (as one holding an event it cannot
    apply would), so that the runner applies them one at a time."""

    def apply_batch(self, ctx: Any, envelopes: Sequence[EventEnvelope]) -> None:
        if len(envelopes) > 1:
            raise ValueError("a batch this fold cannot apply whole")
        super().apply_batch(ctx, envelopes)


def test_a_batch_applied_again_event_by_event_is_counted(side: ReadSide) -> None:
    world = side.new_world(owner="fallback")
    side.app.create_card(m.CreateCard(project_id=world.project_id, title="one"), world.owner)
    retried = "agentworks_projector_batch_retries_total"
    before = sample(retried, projector="kanban", reason="one_by_one")
    outcome = side.runner(_FailsWhole()).process(side.envelopes())
    assert outcome.applied > 1
    assert not outcome.parked
    assert sample(retried, projector="kanban", reason="one_by_one") - before == 1
