"""Which workspaces' read-model versions a projector batch bumps (``projections.read_versions``):
every workspace an applied event may change rows of, and the global epoch for an event of none."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import UUID, uuid4

from domain.envelope import EventEnvelope
from projections.read_versions import touched


def envelope(
    aggregate: str, workspace: UUID | None, originator: UUID | None = None
) -> EventEnvelope:
    return EventEnvelope(
        position=1,
        originator_id=originator or uuid4(),
        originator_version=1,
        aggregate=aggregate,
        type=f"{aggregate}.Changed",
        event_version=1,
        timestamp=datetime.now(UTC),
        workspace_id=workspace,
        metadata={},
        payload={},
    )


def test_each_workspace_of_the_batch_once_in_lock_order() -> None:
    a, b = uuid4(), uuid4()
    batch = [envelope("Card", b), envelope("Card", a), envelope("Project", b)]
    assert touched(batch) == (sorted([a, b]), False)


def test_a_workspace_event_bumps_the_workspace_it_is_even_without_metadata() -> None:
    workspace = uuid4()
    assert touched([envelope("Workspace", None, workspace)]) == ([workspace], False)


def test_an_event_of_no_workspace_bumps_the_epoch() -> None:
    a = uuid4()
    assert touched([envelope("Card", a), envelope("UsageCharge", None)]) == ([a], True)


def test_an_empty_batch_bumps_nothing() -> None:
    assert touched([]) == ([], False)
