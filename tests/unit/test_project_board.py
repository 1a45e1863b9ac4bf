"""Project and board rules: lanes, WIP limits and where each card sits."""

from __future__ import annotations

from collections.abc import Callable
from uuid import UUID, uuid4

import pytest
from aw_builders import collect, meta

from domain import errors
from domain.meta import EventMeta
from domain.positions import is_valid_position
from domain.project import MAX_LANES, MAX_WIP_LIMIT, LaneSpec, Project


def new_project(lanes: list[LaneSpec], name: str = "P") -> Project:
    """``Project.create`` in a fresh workspace, with its events still pending."""
    workspace_id = uuid4()
    return Project.create(
        project_id=uuid4(),
        workspace_id=workspace_id,
        name=name,
        lanes=lanes,
        meta=meta(workspace_id),
    )


def make_project(*lanes: LaneSpec) -> Project:
    default = [LaneSpec("Todo"), LaneSpec("Doing", 2), LaneSpec("Done")]
    project = new_project(list(lanes) or default, name=" Rocket ")
    collect(project)
    return project


def m(project: Project) -> EventMeta:
    return meta(project.workspace_id)


def place(project: Project, lane: str, n: int = 1) -> list[UUID]:
    ids = [uuid4() for _ in range(n)]
    for card_id in ids:
        project.place_card(card_id, lane, meta=m(project))
    return ids


def order(project: Project, lane: str) -> list[UUID]:
    return [card for _, card in project.cards_in(lane)]


# -- creation -----------------------------------------------------------------------------------


def test_new_project_has_its_lanes_in_order_and_an_empty_board() -> None:
    project = make_project()
    assert project.name == "Rocket"
    assert [spec.name for spec in project.lanes] == ["Todo", "Doing", "Done"]
    assert project.lane("Doing").wip_limit == 2
    assert project.placements == {}
    assert project.archived is False


def test_project_without_lanes_is_refused() -> None:
    with pytest.raises(errors.ValidationFailed, match="at least one lane"):
        new_project([])


def test_project_with_too_many_lanes_is_refused() -> None:
    lanes = [LaneSpec(f"L{i}") for i in range(MAX_LANES + 1)]
    with pytest.raises(errors.ValidationFailed, match=str(MAX_LANES + 1)):
        new_project(lanes)


def test_duplicate_lane_names_after_trimming_are_refused() -> None:
    with pytest.raises(errors.Duplicate, match="'Todo'"):
        new_project([LaneSpec("Todo"), LaneSpec(" Todo ")])


@pytest.mark.parametrize("limit", [0, -1, MAX_WIP_LIMIT + 1])
def test_out_of_range_wip_limit_at_creation_is_refused(limit: int) -> None:
    with pytest.raises(errors.ValidationFailed, match=str(limit)):
        new_project([LaneSpec("Todo", limit)])


# -- lanes ----------------------------------------------------------------------------------------


def test_unknown_lane_is_not_found_and_lists_the_lanes() -> None:
    project = make_project()
    with pytest.raises(errors.NotFound, match="'Nope'") as caught:
        project.lane("Nope")
    assert "'Todo', 'Doing', 'Done'" in caught.value.message
    assert str(project.id) in caught.value.message


def test_add_lane_appends_by_default_and_inserts_at_an_index() -> None:
    project = make_project()
    project.add_lane("QA", wip_limit=3, index=None, meta=m(project))
    project.add_lane("Ideas", wip_limit=None, index=0, meta=m(project))
    assert [spec.name for spec in project.lanes] == ["Ideas", "Todo", "Doing", "Done", "QA"]
    assert project.lane("QA").wip_limit == 3


def test_adding_an_existing_lane_is_refused_as_duplicate() -> None:
    project = make_project()
    with pytest.raises(errors.Duplicate, match="'Doing'"):
        project.add_lane(" Doing ", wip_limit=None, index=None, meta=m(project))


@pytest.mark.parametrize("index", [-1, 4])
def test_adding_a_lane_outside_the_lane_range_is_refused(index: int) -> None:
    project = make_project()
    with pytest.raises(errors.ValidationFailed, match=f"lane index {index}"):
        project.add_lane("QA", wip_limit=None, index=index, meta=m(project))
    assert len(project.lanes) == 3


def test_adding_a_lane_beyond_the_maximum_is_refused() -> None:
    project = make_project(*[LaneSpec(f"L{i}") for i in range(MAX_LANES)])
    with pytest.raises(errors.ValidationFailed, match=str(MAX_LANES)):
        project.add_lane("One more", wip_limit=None, index=None, meta=m(project))


def test_rename_lane_moves_its_cards_with_it() -> None:
    project = make_project()
    (card,) = place(project, "Todo")
    project.rename_lane("Todo", "Backlog", meta=m(project))
    assert project.lanes[0].name == "Backlog"
    assert project.placements[card].lane == "Backlog"
    assert project.count("Todo") == 0


def test_archived_card_is_restored_to_its_lane_under_the_lanes_new_name() -> None:
    project = make_project()
    (card,) = place(project, "Todo")
    project.lift_card(card, meta=m(project))
    project.rename_lane("Todo", "Backlog", meta=m(project))
    project.rename_lane("Backlog", "Icebox", meta=m(project))
    assert project.lane_to_restore(card) == "Icebox"


def test_archived_card_of_a_removed_lane_is_restored_to_the_first_lane() -> None:
    project = make_project()
    (card,) = place(project, "Doing")
    project.lift_card(card, meta=m(project))
    project.remove_lane("Doing", meta=m(project))
    assert project.lane_to_restore(card) == project.lanes[0].name


def test_lane_of_a_card_not_on_the_board_is_not_found() -> None:
    project = make_project()
    ghost = uuid4()
    with pytest.raises(errors.NotFound, match=str(ghost)):
        project.lane_of(ghost)


def test_renaming_a_lane_onto_another_lane_name_is_refused() -> None:
    project = make_project()
    with pytest.raises(errors.Duplicate, match="'Done'"):
        project.rename_lane("Todo", "Done", meta=m(project))


def test_renaming_an_unknown_lane_is_not_found() -> None:
    project = make_project()
    with pytest.raises(errors.NotFound, match="'Ghost'"):
        project.rename_lane("Ghost", "Other", meta=m(project))


def test_renaming_a_lane_to_its_own_name_records_nothing() -> None:
    project = make_project()
    project.rename_lane("Todo", " Todo ", meta=m(project))
    assert collect(project) == []


def test_reorder_lanes_records_the_new_order() -> None:
    project = make_project()
    project.reorder_lanes(["Done", "Todo", "Doing"], meta=m(project))
    assert [spec.name for spec in project.lanes] == ["Done", "Todo", "Doing"]
    assert project.lane("Doing").wip_limit == 2


@pytest.mark.parametrize(
    "new_order",
    [["Done", "Todo"], ["Done", "Todo", "Doing", "Extra"], ["Done", "Done", "Todo"], []],
)
def test_reorder_that_does_not_name_each_lane_once_is_refused(new_order: list[str]) -> None:
    project = make_project()
    with pytest.raises(errors.ValidationFailed, match="exactly once"):
        project.reorder_lanes(new_order, meta=m(project))
    assert [spec.name for spec in project.lanes] == ["Todo", "Doing", "Done"]


def test_removing_an_empty_lane_is_recorded() -> None:
    project = make_project()
    project.remove_lane("Done", meta=m(project))
    assert [spec.name for spec in project.lanes] == ["Todo", "Doing"]


def test_removing_a_lane_that_holds_cards_is_refused() -> None:
    project = make_project()
    place(project, "Doing", 2)
    with pytest.raises(errors.InvalidTransition, match="'Doing'") as caught:
        project.remove_lane("Doing", meta=m(project))
    assert "2 card(s)" in caught.value.message
    assert project.count("Doing") == 2


def test_a_lane_emptied_by_archiving_can_be_removed() -> None:
    project = make_project()
    (card,) = place(project, "Done")
    project.lift_card(card, meta=m(project))
    project.remove_lane("Done", meta=m(project))
    assert "Done" not in [spec.name for spec in project.lanes]


def test_removing_the_last_lane_is_refused() -> None:
    project = make_project(LaneSpec("Only"))
    with pytest.raises(errors.InvalidTransition, match="last lane"):
        project.remove_lane("Only", meta=m(project))


# -- WIP limits -----------------------------------------------------------------------------------


def test_placing_into_a_full_lane_is_refused() -> None:
    project = make_project()
    place(project, "Doing", 2)
    newcomer = uuid4()
    with pytest.raises(errors.WipLimitExceeded, match="'Doing'") as caught:
        project.place_card(newcomer, "Doing", meta=m(project))
    assert str(newcomer) in caught.value.message
    assert caught.value.details == {"lane": "Doing", "wip_limit": 2}
    assert newcomer not in project.placements


def test_move_into_full_lane_is_refused() -> None:
    project = make_project()
    place(project, "Doing", 2)
    (card,) = place(project, "Todo")
    with pytest.raises(errors.WipLimitExceeded, match=str(card)):
        project.move_card(card, "Doing", meta=m(project))
    assert project.placements[card].lane == "Todo"
    assert project.count("Doing") == 2


def test_moves_within_a_full_lane_are_fine() -> None:
    project = make_project()
    first, second = place(project, "Doing", 2)
    project.move_card(second, "Doing", before_card_id=first, meta=m(project))
    assert order(project, "Doing") == [second, first]
    project.move_card(second, "Doing", meta=m(project))
    assert order(project, "Doing") == [first, second]


def test_moving_out_of_a_full_lane_makes_room() -> None:
    project = make_project()
    first, _ = place(project, "Doing", 2)
    project.move_card(first, "Done", meta=m(project))
    place(project, "Doing")
    assert project.count("Doing") == 2


def test_archived_cards_do_not_count_against_the_wip_limit() -> None:
    project = make_project()
    first, _ = place(project, "Doing", 2)
    project.lift_card(first, meta=m(project))
    assert project.count("Doing") == 1
    place(project, "Doing")


def test_setting_a_wip_limit_below_the_current_count_is_refused() -> None:
    project = make_project()
    place(project, "Todo", 3)
    with pytest.raises(errors.WipLimitExceeded, match="'Todo'") as caught:
        project.set_wip_limit("Todo", 2, meta=m(project))
    assert "holds 3 cards" in caught.value.message
    assert project.lane("Todo").wip_limit is None


def test_setting_a_wip_limit_equal_to_the_current_count_is_allowed() -> None:
    project = make_project()
    place(project, "Todo", 3)
    project.set_wip_limit("Todo", 3, meta=m(project))
    assert project.lane("Todo").wip_limit == 3
    with pytest.raises(errors.WipLimitExceeded):
        place(project, "Todo")


def test_clearing_a_wip_limit_lets_cards_in_again() -> None:
    project = make_project()
    place(project, "Doing", 2)
    project.set_wip_limit("Doing", None, meta=m(project))
    place(project, "Doing")
    assert project.count("Doing") == 3


@pytest.mark.parametrize("limit", [0, -3, MAX_WIP_LIMIT + 1])
def test_out_of_range_wip_limit_is_refused(limit: int) -> None:
    project = make_project()
    with pytest.raises(errors.ValidationFailed, match=str(limit)):
        project.set_wip_limit("Todo", limit, meta=m(project))


def test_setting_the_same_wip_limit_records_nothing() -> None:
    project = make_project()
    project.set_wip_limit("Doing", 2, meta=m(project))
    assert collect(project) == []


def test_wip_limit_of_an_unknown_lane_is_not_found() -> None:
    project = make_project()
    with pytest.raises(errors.NotFound, match="'Ghost'"):
        project.set_wip_limit("Ghost", 3, meta=m(project))


# -- placements and neighbours ----------------------------------------------------------------


def test_cards_placed_without_neighbours_go_to_the_end_in_order() -> None:
    project = make_project()
    cards = place(project, "Todo", 5)
    assert order(project, "Todo") == cards
    assert all(is_valid_position(p.position) for p in project.placements.values())


def test_placing_a_card_already_on_the_board_is_a_duplicate() -> None:
    project = make_project()
    (card,) = place(project, "Todo")
    with pytest.raises(errors.Duplicate, match=str(card)):
        project.place_card(card, "Done", meta=m(project))


def test_placing_into_an_unknown_lane_is_not_found() -> None:
    project = make_project()
    with pytest.raises(errors.NotFound, match="'Ghost'"):
        project.place_card(uuid4(), "Ghost", meta=m(project))


def test_move_between_adjacent_neighbours_lands_between_them() -> None:
    project = make_project()
    a, b, c = place(project, "Todo", 3)
    project.move_card(c, "Todo", after_card_id=a, before_card_id=b, meta=m(project))
    assert order(project, "Todo") == [a, c, b]


def test_move_after_only_lands_right_after_that_card() -> None:
    project = make_project()
    a, b, c = place(project, "Todo", 3)
    project.move_card(c, "Todo", after_card_id=a, meta=m(project))
    assert order(project, "Todo") == [a, c, b]


def test_move_before_only_lands_right_before_that_card() -> None:
    project = make_project()
    a, b, c = place(project, "Todo", 3)
    project.move_card(c, "Todo", before_card_id=a, meta=m(project))
    assert order(project, "Todo") == [c, a, b]


def test_move_to_another_lane_records_from_and_to_lane() -> None:
    project = make_project()
    (card,) = place(project, "Todo")
    (target,) = place(project, "Done")
    collect(project)
    position = project.move_card(card, "Done", before_card_id=target, meta=m(project)).position
    (event,) = collect(project)
    assert isinstance(event, Project.CardMoved)
    assert (event.card_id, event.from_lane, event.to_lane) == (card, "Todo", "Done")
    assert event.position == position < project.placements[target].position


def test_neighbours_that_are_not_adjacent_are_a_conflict() -> None:
    project = make_project()
    a, _b, c, d = place(project, "Todo", 4)
    with pytest.raises(errors.Conflict, match="not adjacent") as caught:
        project.move_card(d, "Todo", after_card_id=a, before_card_id=c, meta=m(project))
    assert str(a) in caught.value.message
    assert str(c) in caught.value.message


def test_one_card_named_as_both_neighbours_is_a_validation_error() -> None:
    """Going both after and before one card says nothing a board could do, now or after a
    refresh: the input is wrong (a CONFLICT told the client to refresh and retry)."""
    project = make_project()
    a, _b, c = place(project, "Todo", 3)
    collect(project)
    with pytest.raises(errors.ValidationFailed, match=str(a)):
        project.move_card(c, "Todo", after_card_id=a, before_card_id=a, meta=m(project))
    assert collect(project) == []


def test_neighbours_in_the_wrong_order_are_a_conflict() -> None:
    project = make_project()
    a, b, c = place(project, "Todo", 3)
    with pytest.raises(errors.Conflict, match="not adjacent"):
        project.move_card(c, "Todo", after_card_id=b, before_card_id=a, meta=m(project))


def test_neighbour_from_another_lane_is_a_conflict() -> None:
    project = make_project()
    (card,) = place(project, "Todo")
    (elsewhere,) = place(project, "Done")
    with pytest.raises(errors.Conflict, match=str(elsewhere)) as caught:
        project.move_card(card, "Doing", after_card_id=elsewhere, meta=m(project))
    assert "'Doing'" in caught.value.message
    assert project.placements[card].lane == "Todo"


def test_unknown_neighbour_is_a_conflict() -> None:
    project = make_project()
    (card,) = place(project, "Todo")
    ghost = uuid4()
    with pytest.raises(errors.Conflict, match=str(ghost)):
        project.move_card(card, "Todo", before_card_id=ghost, meta=m(project))


def test_placing_next_to_itself_is_refused() -> None:
    project = make_project()
    _, b = place(project, "Todo", 2)
    with pytest.raises(errors.ValidationFailed, match=str(b)):
        project.move_card(b, "Todo", after_card_id=b, meta=m(project))


def test_moving_a_card_that_is_not_on_the_board_is_not_found() -> None:
    project = make_project()
    ghost = uuid4()
    with pytest.raises(errors.NotFound, match=str(ghost)):
        project.move_card(ghost, "Todo", meta=m(project))


def test_lifting_a_card_that_is_not_on_the_board_is_not_found() -> None:
    project = make_project()
    ghost = uuid4()
    with pytest.raises(errors.NotFound, match=str(ghost)):
        project.lift_card(ghost, meta=m(project))


def test_a_lifted_card_can_be_placed_again() -> None:
    project = make_project()
    (card,) = place(project, "Todo")
    project.lift_card(card, meta=m(project))
    assert card not in project.placements
    project.place_card(card, "Done", meta=m(project))
    assert project.placements[card].lane == "Done"


# -- archived project -----------------------------------------------------------------------------


def test_archived_project_refuses_board_changes() -> None:
    project = make_project()
    (card,) = place(project, "Todo")
    project.archive(meta=m(project))
    pid = str(project.id)
    attempts: list[Callable[[], object]] = [
        lambda: project.rename("New", meta=m(project)),
        lambda: project.add_lane("X", wip_limit=None, index=None, meta=m(project)),
        lambda: project.rename_lane("Todo", "X", meta=m(project)),
        lambda: project.reorder_lanes(["Done", "Doing", "Todo"], meta=m(project)),
        lambda: project.remove_lane("Done", meta=m(project)),
        lambda: project.set_wip_limit("Todo", 5, meta=m(project)),
        lambda: project.place_card(uuid4(), "Todo", meta=m(project)),
        lambda: project.move_card(card, "Done", meta=m(project)),
    ]
    collect(project)
    for attempt in attempts:
        with pytest.raises(errors.InvalidTransition, match=pid):
            attempt()
    assert collect(project) == []


def test_archiving_twice_records_once() -> None:
    project = make_project()
    project.archive(meta=m(project))
    project.archive(meta=m(project))
    assert len(collect(project)) == 1


def test_rename_project_trims_and_skips_no_change() -> None:
    project = make_project()
    project.rename(" Rocket ", meta=m(project))
    assert collect(project) == []
    project.rename(" Moon ", meta=m(project))
    assert project.name == "Moon"
