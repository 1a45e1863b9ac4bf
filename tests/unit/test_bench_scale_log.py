"""``bench._scale_log`` stores what the product decides: its lane index gives every card the
position ``Project`` itself computes, and the workspace it generates is one tenant's."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING
from uuid import uuid4

from bench._scale_log import WorkspaceGenerator, index_lanes
from domain.meta import EventMeta
from domain.project import LaneSpec, Project

if TYPE_CHECKING:
    from uuid import UUID


def _events(generator: WorkspaceGenerator) -> list[object]:
    return [event for group in generator.groups() for a in group for event in a.collect_events()]


def test_the_lane_index_decides_the_positions_project_decides() -> None:
    generator = WorkspaceGenerator(5, cards=120, events=0, hot_card_events=40, verify=True)

    events = _events(generator)  # verify=True compares every position with Project's own

    assert generator.emitted == len(events)
    for project in generator.tenant.projects:
        for lane in ("Backlog", "Todo", "In progress", "Review", "Done"):
            assert project.placements.lanes.get(lane, []) == project.cards_in(lane)  # type: ignore[attr-defined]


def test_the_index_follows_moves_and_lifts() -> None:
    workspace = uuid4()
    meta = EventMeta.for_command(workspace_id=workspace, actor="u")
    project = Project.create(
        project_id=uuid4(),
        workspace_id=workspace,
        name="p",
        lanes=[LaneSpec("a"), LaneSpec("b")],
        meta=meta,
    )
    index_lanes(project, verify=True)
    cards: list[UUID] = [uuid4() for _ in range(6)]
    for card in cards:
        project.place_card(card, "a", meta=meta)
    project.move_card(cards[0], "b", meta=meta)
    project.move_card(cards[5], "a", meta=meta)  # the last card of its lane, to the end again
    project.move_card(cards[1], "a", before_card_id=cards[2], meta=meta)
    project.lift_card(cards[3], meta=meta)
    project.move_card(cards[4], "b", meta=meta)

    for lane in ("a", "b"):
        assert project.placements.lanes[lane] == project.cards_in(lane)  # type: ignore[attr-defined]


def test_one_workspace_holds_every_card_and_the_hot_card_has_its_events() -> None:
    generator = WorkspaceGenerator(9, cards=60, events=4_000, hot_card_events=30)

    events = _events(generator)

    workspaces = {getattr(e, "workspace_id", None) for e in events} - {None}
    assert workspaces == {generator.tenant.workspace.id}
    assert len(events) >= 4_000
    described = generator.describe()
    assert described["hot_card_events"] == 30
    per_card = Counter(e.originator_id for e in events)  # type: ignore[attr-defined]
    assert per_card[generator.tenant.projects[0].id] > 0
    assert generator.hot is not None
    assert per_card[generator.hot.card.id] == 30
