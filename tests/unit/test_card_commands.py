"""Card and board commands through the write side: roles, tenancy, versions, WIP and placement."""

from __future__ import annotations

from collections.abc import Callable
from uuid import UUID, uuid4

import pytest
from aw_builders import (
    OWNER,
    Spec,
    World,
    assert_refused,
    assert_role_matrix,
    position_of_log,
    stored_events,
)

from commands import models as m
from commands.handlers import Actor, AgentWorks, CommandResult
from domain.card import Card
from domain.errors import (
    Conflict,
    InvalidTransition,
    NotFound,
    WipLimitExceeded,
)
from domain.project import Project
from domain.roles import Role

ROLES = list(Role)
LANES = [
    m.LaneInput(name="Todo"),
    m.LaneInput(name="Doing", wip_limit=2),
    m.LaneInput(name="Done"),
]


def board(world: World, lane: str) -> list[UUID]:
    project: Project = world.get(world.project_id)
    return [card for _, card in project.cards_in(lane)]


def agree(world: World) -> None:
    """The board's placements and each live card's own lane and position say the same thing."""
    project: Project = world.get(world.project_id)
    for card_id, placement in project.placements.items():
        card: Card = world.get(card_id)
        assert not card.archived
        assert (card.lane, card.position) == (placement.lane, placement.position)


def _block(world: World) -> None:
    world.app.block_card(m.BlockCard(card_id=world.card_id, reason="waiting"), world.owner)


def _archive(world: World) -> None:
    world.app.archive_card(m.ArchiveCard(card_id=world.card_id), world.owner)


def _rename_lane(world: World, lane: str, name: str) -> None:
    cmd = m.RenameLane(project_id=world.project_id, lane=lane, name=name)
    world.app.rename_lane(cmd, world.owner)


def _label(world: World) -> None:
    world.app.label_card(m.LabelCard(card_id=world.card_id, label="api"), world.owner)


SPECS = [
    Spec.of(Role.MEMBER, AgentWorks.create_card, m.CreateCard, title="New"),
    Spec.of(Role.MEMBER, AgentWorks.update_card, m.UpdateCard, title="Edited"),
    Spec.of(Role.MEMBER, AgentWorks.move_card, m.MoveCard, to_lane="Done"),
    Spec.of(Role.MEMBER, AgentWorks.assign_card, m.AssignCard, assignee=OWNER),
    Spec.of(Role.MEMBER, AgentWorks.label_card, m.LabelCard, label="ux"),
    Spec.of(Role.MEMBER, AgentWorks.unlabel_card, m.UnlabelCard, _label, label="api"),
    Spec.of(Role.MEMBER, AgentWorks.block_card, m.BlockCard, reason="why"),
    Spec.of(Role.MEMBER, AgentWorks.unblock_card, m.UnblockCard, _block),
    Spec.of(Role.MEMBER, AgentWorks.archive_card, m.ArchiveCard),
    Spec.of(Role.MEMBER, AgentWorks.restore_card, m.RestoreCard, _archive),
    Spec.of(Role.ADMIN, AgentWorks.set_wip_limit, m.SetWipLimit, lane="Done", wip_limit=5),
    Spec.of(Role.ADMIN, AgentWorks.add_lane, m.AddLane, name="QA"),
    Spec.of(Role.ADMIN, AgentWorks.rename_lane, m.RenameLane, lane="Done", name="Shipped"),
    Spec.of(Role.ADMIN, AgentWorks.reorder_lanes, m.ReorderLanes, order=["Done", "Doing", "Todo"]),
    Spec.of(Role.ADMIN, AgentWorks.remove_lane, m.RemoveLane, lane="Done"),
    Spec.of(Role.ADMIN, AgentWorks.archive_project, m.ArchiveProject),
]


def build() -> World:
    return World.build(lanes=LANES)


@pytest.mark.parametrize("role", ROLES, ids=str)
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_role_matrix_of_card_and_board_commands(spec: Spec, role: Role) -> None:
    world = build()
    spec.prepare(world)
    assert_role_matrix(world, role, spec.needed, lambda actor: spec.send(world, actor))


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_user_who_is_not_a_member_gets_not_found(spec: Spec) -> None:
    world = build()
    spec.prepare(world)
    assert_refused(world.app, NotFound, lambda: spec.send(world, world.actor("stranger")))


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_another_workspaces_cards_and_projects_answer_not_found(spec: Spec) -> None:
    world = build()
    spec.prepare(world)
    intruder = World.build(app=world.app, owner="mallory").owner
    error = assert_refused(world.app, NotFound, lambda: spec.send(world, intruder))
    assert "does not exist" in error.message
    assert str(world.card_id) in error.message or str(world.project_id) in error.message


def test_cross_tenant_answer_is_the_same_as_for_an_unknown_id() -> None:
    world = build()
    intruder = World.build(app=world.app, owner="mallory").owner
    ghost = uuid4()
    theirs = world.refuses(
        NotFound, world.app.assign_card, m.AssignCard(card_id=world.card_id), intruder
    )
    unknown = world.refuses(NotFound, world.app.assign_card, m.AssignCard(card_id=ghost), intruder)
    assert theirs.message == f"card {world.card_id} does not exist"
    assert unknown.message == f"card {ghost} does not exist"


def test_an_id_of_the_wrong_aggregate_type_answers_not_found() -> None:
    world = build()
    cases: list[Callable[[], object]] = [
        lambda: world.app.move_card(
            m.MoveCard(card_id=world.project_id, to_lane="Done"), world.owner
        ),
        lambda: world.app.update_card(
            m.UpdateCard(card_id=world.workspace_id, title="X"), world.owner
        ),
        lambda: world.app.create_card(
            m.CreateCard(project_id=world.card_id, title="X"), world.owner
        ),
        lambda: world.app.add_lane(m.AddLane(project_id=world.card_id, name="X"), world.owner),
    ]
    for send in cases:
        error = assert_refused(world.app, NotFound, send)
        assert "does not exist" in error.message


# -- createCard -----------------------------------------------------------------------------------


def test_create_card_saves_card_and_board_in_one_command() -> None:
    world = build()
    before = position_of_log(world.app)
    result = world.app.create_card(
        m.CreateCard(project_id=world.project_id, title="Spec", lane="Doing"), world.owner
    )
    new = stored_events(world.app)[before:]
    assert {e.originator_id for e in new} == {result.id, world.project_id}
    assert len({e.meta["command_id"] for e in new}) == 1
    assert result.position == position_of_log(world.app)
    assert board(world, "Doing") == [result.id]
    agree(world)


def test_create_card_without_a_lane_goes_to_the_first_lane() -> None:
    world = build()
    card_id = world.card("x")
    assert world.get(card_id).lane == "Todo"
    assert board(world, "Todo") == [world.card_id, card_id]


def test_create_card_in_an_unknown_lane_is_not_found() -> None:
    world = build()
    cmd = m.CreateCard(project_id=world.project_id, title="x", lane="Ghost")
    error = world.refuses(NotFound, world.app.create_card, cmd)
    assert "'Ghost'" in error.message


def test_create_card_in_a_full_lane_is_refused_and_writes_nothing() -> None:
    world = build()
    world.card("a", lane="Doing")
    world.card("b", lane="Doing")
    cmd = m.CreateCard(project_id=world.project_id, title="c", lane="Doing")
    error = world.refuses(WipLimitExceeded, world.app.create_card, cmd)
    assert "'Doing'" in error.message
    assert len(board(world, "Doing")) == 2


def test_create_card_in_an_archived_project_is_refused() -> None:
    world = build()
    world.app.archive_project(m.ArchiveProject(project_id=world.project_id), world.owner)
    cmd = m.CreateCard(project_id=world.project_id, title="c")
    error = world.refuses(InvalidTransition, world.app.create_card, cmd)
    assert str(world.project_id) in error.message


# -- moveCard -------------------------------------------------------------------------------------


def test_move_card_updates_card_and_board_together() -> None:
    world = build()
    member = world.member("bob", Role.MEMBER)
    result = world.app.move_card(m.MoveCard(card_id=world.card_id, to_lane="Doing"), member)
    assert result.version == 2
    assert board(world, "Doing") == [world.card_id]
    assert board(world, "Todo") == []
    agree(world)


def test_move_into_full_lane_is_refused_and_writes_nothing() -> None:
    world = build()
    world.card("a", lane="Doing")
    world.card("b", lane="Doing")
    cmd = m.MoveCard(card_id=world.card_id, to_lane="Doing")
    error = world.refuses(WipLimitExceeded, world.app.move_card, cmd)
    assert str(world.card_id) in error.message
    assert world.get(world.card_id).lane == "Todo"


def test_reordering_inside_a_full_lane_is_fine() -> None:
    world = build()
    a = world.card("a", lane="Doing")
    b = world.card("b", lane="Doing")
    world.app.move_card(m.MoveCard(card_id=b, to_lane="Doing", before_card_id=a), world.owner)
    assert board(world, "Doing") == [b, a]
    agree(world)


def test_move_between_neighbours_places_the_card_between_them() -> None:
    world = build()
    a, b = world.card("a"), world.card("b")
    cmd = m.MoveCard(card_id=b, to_lane="Todo", after_card_id=world.card_id, before_card_id=a)
    world.app.move_card(cmd, world.owner)
    assert board(world, "Todo") == [world.card_id, b, a]


def test_move_with_non_adjacent_neighbours_is_a_conflict_and_writes_nothing() -> None:
    world = build()
    a, b = world.card("a"), world.card("b")
    mover = world.card("c", lane="Done")
    cmd = m.MoveCard(card_id=mover, to_lane="Todo", after_card_id=world.card_id, before_card_id=b)
    error = world.refuses(Conflict, world.app.move_card, cmd)
    assert str(world.card_id) in error.message
    assert str(b) in error.message
    assert board(world, "Todo") == [world.card_id, a, b]


def test_move_with_a_neighbour_from_another_lane_is_a_conflict() -> None:
    world = build()
    elsewhere = world.card("x", lane="Done")
    cmd = m.MoveCard(card_id=world.card_id, to_lane="Doing", after_card_id=elsewhere)
    error = world.refuses(Conflict, world.app.move_card, cmd)
    assert str(elsewhere) in error.message


def test_blocked_card_cannot_change_lane_and_the_board_is_not_saved_either() -> None:
    world = build()
    _block(world)
    cmd = m.MoveCard(card_id=world.card_id, to_lane="Done")
    error = world.refuses(InvalidTransition, world.app.move_card, cmd)
    assert str(world.card_id) in error.message
    assert board(world, "Todo") == [world.card_id]
    agree(world)


def test_blocked_card_restores_only_into_the_lane_it_left_under_its_new_name() -> None:
    world = build()
    _block(world)
    _archive(world)
    _rename_lane(world, "Todo", "Backlog")
    cmd = m.RestoreCard(card_id=world.card_id, lane="Done")
    error = world.refuses(InvalidTransition, world.app.restore_card, cmd)
    assert "blocked" in error.message
    assert "'Backlog'" in error.message
    assert world.get(world.card_id).archived
    assert board(world, "Done") == []
    world.app.restore_card(m.RestoreCard(card_id=world.card_id, lane="Backlog"), world.owner)
    assert board(world, "Backlog") == [world.card_id]
    assert world.get(world.card_id).blocked
    agree(world)


def test_blocked_card_whose_lane_is_gone_restores_into_the_lane_asked_for() -> None:
    world = build()
    _block(world)
    _archive(world)
    world.app.remove_lane(m.RemoveLane(project_id=world.project_id, lane="Todo"), world.owner)
    world.app.restore_card(m.RestoreCard(card_id=world.card_id, lane="Done"), world.owner)
    assert board(world, "Done") == [world.card_id]
    agree(world)


def test_moving_an_archived_card_is_an_invalid_transition() -> None:
    world = build()
    _archive(world)
    cmd = m.MoveCard(card_id=world.card_id, to_lane="Done")
    world.refuses(InvalidTransition, world.app.move_card, cmd)


def test_blocked_card_can_be_reordered_within_its_renamed_lane() -> None:
    world = build()
    other = world.card("other")
    _block(world)
    _rename_lane(world, "Todo", "Backlog")
    cmd = m.MoveCard(card_id=world.card_id, to_lane="Backlog", after_card_id=other)
    world.app.move_card(cmd, world.owner)
    assert board(world, "Backlog") == [other, world.card_id]


def test_restore_without_a_lane_returns_the_card_to_its_renamed_lane() -> None:
    world = build()
    _archive(world)
    _rename_lane(world, "Todo", "Backlog")
    world.app.restore_card(m.RestoreCard(card_id=world.card_id), world.owner)
    assert board(world, "Backlog") == [world.card_id]


def test_a_card_archived_before_a_rename_restores_into_the_renamed_lane() -> None:
    world = build()
    _archive(world)
    _rename_lane(world, "Todo", "Backlog")
    _rename_lane(world, "Backlog", "Icebox")
    world.app.restore_card(m.RestoreCard(card_id=world.card_id), world.owner)
    assert board(world, "Icebox") == [world.card_id]


def test_moves_after_a_rename_record_the_lanes_current_name() -> None:
    world = build()
    _rename_lane(world, "Todo", "Backlog")
    before = position_of_log(world.app)
    world.app.move_card(m.MoveCard(card_id=world.card_id, to_lane="Done"), world.owner)
    moved = [e for e in stored_events(world.app)[before:] if e.originator_id == world.card_id]
    assert [(e.from_lane, e.to_lane) for e in moved] == [("Backlog", "Done")]


def reuse_old_name(world: World, how: str) -> None:
    """Rename Todo to Backlog, then give the freed name Todo to another lane."""
    _rename_lane(world, "Todo", "Backlog")
    if how == "add":
        world.app.add_lane(m.AddLane(project_id=world.project_id, name="Todo"), world.owner)
    else:
        _rename_lane(world, "Done", "Todo")


@pytest.mark.parametrize("how", ["add", "rename"])
def test_blocked_card_in_a_lane_that_reuses_an_old_name_can_be_reordered_in_it(how: str) -> None:
    world = build()
    reuse_old_name(world, how)
    first, second = world.card("a", lane="Todo"), world.card("b", lane="Todo")
    world.app.block_card(m.BlockCard(card_id=second, reason="r"), world.owner)
    cmd = m.MoveCard(card_id=second, to_lane="Todo", before_card_id=first)
    world.app.move_card(cmd, world.owner)
    assert board(world, "Todo") == [second, first]


@pytest.mark.parametrize("how", ["add", "rename"])
def test_card_of_a_lane_that_reuses_an_old_name_restores_into_that_lane(how: str) -> None:
    world = build()
    reuse_old_name(world, how)
    card = world.card("a", lane="Todo")
    world.app.archive_card(m.ArchiveCard(card_id=card), world.owner)
    world.app.restore_card(m.RestoreCard(card_id=card), world.owner)
    assert board(world, "Todo") == [card]


# -- expected versions ----------------------------------------------------------------------------

VERSIONED: dict[str, Callable[[World, int], Callable[[], CommandResult]]] = {
    "updateCard": lambda w, v: (
        lambda: w.app.update_card(
            m.UpdateCard(card_id=w.card_id, title="T2", expected_version=v), w.owner
        )
    ),
    "moveCard": lambda w, v: (
        lambda: w.app.move_card(
            m.MoveCard(card_id=w.card_id, to_lane="Done", expected_version=v), w.owner
        )
    ),
    "assignCard": lambda w, v: (
        lambda: w.app.assign_card(
            m.AssignCard(card_id=w.card_id, assignee=w.owner.user_id, expected_version=v),
            w.owner,
        )
    ),
    "archiveCard": lambda w, v: (
        lambda: w.app.archive_card(m.ArchiveCard(card_id=w.card_id, expected_version=v), w.owner)
    ),
}


@pytest.mark.parametrize("name", list(VERSIONED))
def test_stale_expected_version_is_a_conflict_and_writes_nothing(name: str) -> None:
    world = build()
    world.app.label_card(m.LabelCard(card_id=world.card_id, label="x"), world.owner)  # v2
    for stale in (1, 3):
        error = assert_refused(world.app, Conflict, VERSIONED[name](world, stale))
        assert str(world.card_id) in error.message
        assert error.details == {"expected": stale, "actual": 2}
    result = VERSIONED[name](world, 2)()
    assert result.version == 3


# -- archive and restore --------------------------------------------------------------------------


def test_archive_lifts_the_card_off_the_board_and_frees_its_slot() -> None:
    world = build()
    a = world.card("a", lane="Doing")
    world.card("b", lane="Doing")
    world.app.archive_card(m.ArchiveCard(card_id=a), world.owner)
    assert world.get(a).archived is True
    assert a not in world.get(world.project_id).placements
    world.card("c", lane="Doing")
    assert len(board(world, "Doing")) == 2


def test_archiving_an_archived_card_is_refused() -> None:
    world = build()
    _archive(world)
    error = world.refuses(
        InvalidTransition, world.app.archive_card, m.ArchiveCard(card_id=world.card_id)
    )
    assert str(world.card_id) in error.message


def test_archived_card_refuses_edits() -> None:
    world = build()
    _archive(world)
    cid = world.card_id
    for send in (
        lambda: world.app.update_card(m.UpdateCard(card_id=cid, title="x"), world.owner),
        lambda: world.app.assign_card(m.AssignCard(card_id=cid, assignee="b"), world.owner),
        lambda: world.app.label_card(m.LabelCard(card_id=cid, label="l"), world.owner),
        lambda: world.app.block_card(m.BlockCard(card_id=cid, reason="r"), world.owner),
        lambda: world.app.start_agent_run(m.StartAgentRun(card_id=cid, agent="a"), world.owner),
    ):
        error = assert_refused(world.app, InvalidTransition, send)
        assert str(cid) in error.message


def test_restore_puts_the_card_at_the_end_of_the_chosen_lane() -> None:
    world = build()
    other = world.card("other", lane="Done")
    _archive(world)
    world.app.restore_card(m.RestoreCard(card_id=world.card_id, lane="Done"), world.owner)
    assert board(world, "Done") == [other, world.card_id]
    assert world.get(world.card_id).archived is False
    agree(world)


def test_restore_without_a_lane_returns_the_card_to_its_old_lane() -> None:
    world = build()
    _archive(world)
    world.app.restore_card(m.RestoreCard(card_id=world.card_id), world.owner)
    assert board(world, "Todo") == [world.card_id]
    agree(world)


def test_restore_into_a_full_lane_is_refused_and_writes_nothing() -> None:
    world = build()
    _archive(world)
    world.card("a", lane="Doing")
    world.card("b", lane="Doing")
    cmd = m.RestoreCard(card_id=world.card_id, lane="Doing")
    world.refuses(WipLimitExceeded, world.app.restore_card, cmd)
    assert world.get(world.card_id).archived is True


def test_restoring_a_live_card_is_refused() -> None:
    world = build()
    cmd = m.RestoreCard(card_id=world.card_id)
    error = world.refuses(InvalidTransition, world.app.restore_card, cmd)
    assert f"card {world.card_id} is not archived" in error.message


# -- editing --------------------------------------------------------------------------------------


def test_update_card_replaces_the_label_set() -> None:
    world = build()
    for label in ("a", "b"):
        world.app.label_card(m.LabelCard(card_id=world.card_id, label=label), world.owner)
    world.app.update_card(
        m.UpdateCard(card_id=world.card_id, labels=["b", " c "], description="d"), world.owner
    )
    card: Card = world.get(world.card_id)
    assert card.labels == ["b", "c"]
    assert (card.title, card.description) == ("First", "d")


def test_unblock_of_an_unblocked_card_is_refused() -> None:
    world = build()
    cmd = m.UnblockCard(card_id=world.card_id)
    world.refuses(InvalidTransition, world.app.unblock_card, cmd)


def test_card_history_can_be_read_at_any_version() -> None:
    world = build()
    world.app.update_card(m.UpdateCard(card_id=world.card_id, title="Second"), world.owner)
    world.app.update_card(m.UpdateCard(card_id=world.card_id, title="Third"), world.owner)
    viewer = world.member("vic", Role.VIEWER)
    assert world.app.card_at(world.card_id, viewer, version=1).title == "First"
    assert world.app.card_at(world.card_id, viewer, version=2).title == "Second"
    assert world.app.card_at(world.card_id, viewer).title == "Third"
    with pytest.raises(NotFound):
        world.app.card_at(world.card_id, world.actor("stranger"))


# -- board commands -------------------------------------------------------------------------------


def test_wip_limit_below_the_current_count_is_refused_and_writes_nothing() -> None:
    world = build()
    world.card("a")
    world.card("b")
    cmd = m.SetWipLimit(project_id=world.project_id, lane="Todo", wip_limit=2)
    error = world.refuses(WipLimitExceeded, world.app.set_wip_limit, cmd)
    assert "holds 3 cards" in error.message


def test_removing_a_lane_that_holds_cards_is_refused() -> None:
    world = build()
    cmd = m.RemoveLane(project_id=world.project_id, lane="Todo")
    error = world.refuses(InvalidTransition, world.app.remove_lane, cmd)
    assert "'Todo'" in error.message


def test_renaming_a_lane_keeps_its_cards_on_the_board() -> None:
    world = build()
    _rename_lane(world, "Todo", "Backlog")
    assert board(world, "Backlog") == [world.card_id]


def test_service_actor_acts_without_membership_but_only_in_its_workspace() -> None:
    world = build()
    other = World.build(app=world.app, owner="mallory")
    service = Actor.service("orchestrator", world.workspace_id)
    world.app.label_card(m.LabelCard(card_id=world.card_id, label="bot"), service)
    assert world.get(world.card_id).labels == ["bot"]
    world.refuses(
        NotFound, world.app.label_card, m.LabelCard(card_id=other.card_id, label="x"), service
    )
    assert world.get(other.card_id).labels == []


def test_every_event_of_one_command_bears_the_command_s_one_instant() -> None:
    """A command is one decision, committed at once: its events (a card's creation and its
    placement on the board, a move and the neighbours it re-spread) were stamped one by one as
    they were triggered, so a board or an export as of an instant between two of them saw the
    command half done (a card placed before it existed). They now bear one instant, the
    decision's; commands stay apart in time."""
    world = World.build()
    for n in range(12):
        world.card(f"Card {n}")
    doing = world.card("Elsewhere", lane="Review")
    world.app.move_card(
        m.MoveCard(card_id=doing, to_lane="Backlog", after_card_id=world.card_id), world.owner
    )
    by_command: dict[str, set[object]] = {}
    for event in stored_events(world.app):
        by_command.setdefault(event.meta["command_id"], set()).add(event.timestamp)
    assert len(by_command) >= 15
    assert all(len(instants) == 1 for instants in by_command.values()), by_command


def test_a_decision_is_stamped_no_earlier_than_the_state_it_decided_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A command takes its instant, then loads what it decides on. Another request's command on
    the same card, committed in between, is in what it loads, yet bore a later instant: the card's
    next version was stamped before the one it followed. Histories and boards as of an instant
    (and export windows) rest on an aggregate's times rising with its versions: at an instant
    between the two, ``cardHistory`` showed the later version with the earlier one folded in,
    and ``board(asOf:)`` neither."""
    import threading

    from aw_builders import stored_events as events_of

    world = World.build()
    app, card_id = world.app, world.card_id
    load = type(app).aggregate
    raced = False

    def aggregate(self: AgentWorks, cls: type, aggregate_id: UUID, **kwargs: object) -> object:
        nonlocal raced
        if not raced:
            raced = True
            edit = m.UpdateCard(card_id=card_id, title="edited meanwhile")
            other = threading.Thread(target=app.update_card, args=(edit, world.owner))
            other.start()
            other.join()
        return load(self, cls, aggregate_id, **kwargs)

    monkeypatch.setattr(type(app), "aggregate", aggregate)
    app.label_card(m.LabelCard(card_id=card_id, label="urgent"), world.owner)
    monkeypatch.undo()

    history = [e for e in events_of(app) if e.originator_id == card_id]
    assert [type(e).__name__ for e in history][-2:] == ["Edited", "Labelled"]
    stamps = [e.timestamp for e in history]
    assert stamps == sorted(set(stamps)), stamps  # rising: each command's state has an instant
