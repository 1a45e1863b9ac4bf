"""Card rules: edits, moves, assignment, labels, blocking, archive and restore."""

from __future__ import annotations

from collections.abc import Callable
from uuid import uuid4

import pytest
from aw_builders import collect, meta, new_card, state_of

from domain.card import MAX_DESCRIPTION_LENGTH, MAX_LABEL_LENGTH, MAX_LABELS, Card
from domain.errors import InvalidTransition, ValidationFailed
from domain.meta import EventMeta


def make_card(*, lane: str = "Todo") -> Card:
    card = new_card(lane=lane)
    collect(card)
    return card


def m(card: Card) -> EventMeta:
    return meta(card.workspace_id)


def test_new_card_is_live_unassigned_unlabelled_and_unblocked() -> None:
    card = make_card()
    assert card.title == "Write PRD"
    assert (card.lane, card.position) == ("Todo", "V1")
    assert card.assignee is None
    assert card.labels == []
    assert card.blocked is False
    assert card.archived is False


@pytest.mark.parametrize("title", ["", "  ", "t" * 201])
def test_blank_or_overlong_title_is_refused(title: str) -> None:
    workspace_id = uuid4()
    with pytest.raises(ValidationFailed, match="card title"):
        Card.create(
            card_id=uuid4(),
            workspace_id=workspace_id,
            project_id=uuid4(),
            title=title,
            description="",
            lane="Todo",
            position="V1",
            meta=meta(workspace_id),
        )


def test_overlong_description_is_refused() -> None:
    card = make_card()
    with pytest.raises(ValidationFailed, match=str(MAX_DESCRIPTION_LENGTH + 1)):
        card.edit(title=None, description="d" * (MAX_DESCRIPTION_LENGTH + 1), meta=m(card))
    assert card.description == "first draft"


# -- edit -----------------------------------------------------------------------------------------


def test_edit_changes_only_what_is_given() -> None:
    card = make_card()
    card.edit(title=None, description="second draft", meta=m(card))
    (event,) = collect(card)
    assert isinstance(event, Card.Edited)
    assert (event.title, event.description) == ("Write PRD", "second draft")
    card.edit(title=" Ship PRD ", description=None, meta=m(card))
    assert (card.title, card.description) == ("Ship PRD", "second draft")


def test_edit_without_a_change_records_nothing() -> None:
    card = make_card()
    card.edit(title="Write PRD ", description=None, meta=m(card))
    card.edit(title=None, description=None, meta=m(card))
    assert collect(card) == []


Change = Callable[[Card], object]


@pytest.mark.parametrize(
    ("first", "again"),
    [
        pytest.param(
            lambda card: card.assign("bob", meta=m(card)),
            lambda card: card.assign(" bob", meta=m(card)),
            id="assigning-the-same-person",
        ),
        pytest.param(
            lambda card: card.label("api", meta=m(card)),
            lambda card: card.unlabel("nope", meta=m(card)),
            id="unlabelling-an-unknown-label",
        ),
    ],
)
def test_a_change_the_card_already_has_records_nothing(first: Change, again: Change) -> None:
    card = make_card()
    first(card)
    collect(card)
    before = state_of(card)
    again(card)
    assert collect(card) == []
    assert state_of(card) == before


# -- move -----------------------------------------------------------------------------------------


def test_move_records_from_and_to_lane_and_position() -> None:
    card = make_card()
    card.move("Doing", "V5", meta=m(card))
    (event,) = collect(card)
    assert (event.from_lane, event.to_lane, event.position) == ("Todo", "Doing", "V5")
    assert (card.lane, card.position) == ("Doing", "V5")


def test_blocked_card_cannot_change_lane() -> None:
    card = make_card()
    card.block("waiting for API keys", meta=m(card))
    collect(card)
    with pytest.raises(InvalidTransition, match=str(card.id)) as caught:
        card.move("Doing", "V5", meta=m(card))
    assert "waiting for API keys" in caught.value.message
    assert card.lane == "Todo"
    assert collect(card) == []


def test_blocked_card_can_still_be_reordered_within_its_lane() -> None:
    card = make_card()
    card.block("waiting", meta=m(card))
    card.move("Todo", "V0V", meta=m(card))
    assert (card.lane, card.position) == ("Todo", "V0V")


def test_move_takes_the_boards_name_for_the_current_lane() -> None:
    """After a lane rename only the board knows the lane's new name; the card trusts it."""
    card = make_card(lane="Todo")
    card.block("waiting", meta=m(card))
    card.move("Backlog", "V2", from_lane="Backlog", meta=m(card))
    (event,) = collect(card)[-1:]
    assert (event.from_lane, event.to_lane) == ("Backlog", "Backlog")
    with pytest.raises(InvalidTransition, match=str(card.id)):
        card.move("Done", "V3", from_lane="Backlog", meta=m(card))
    with pytest.raises(InvalidTransition, match=str(card.id)):
        card.ensure_movable("Done", from_lane="Backlog")
    card.ensure_movable("Backlog", from_lane="Backlog")


def test_ensure_movable_refuses_an_archived_card() -> None:
    card = make_card()
    card.archive(meta=m(card))
    with pytest.raises(InvalidTransition, match=f"cannot move card {card.id}"):
        card.ensure_movable("Todo", from_lane="Todo")


def test_unblocked_card_can_change_lane_again() -> None:
    card = make_card()
    card.block("waiting", meta=m(card))
    card.unblock(meta=m(card))
    card.move("Doing", "V2", meta=m(card))
    assert card.lane == "Doing"


# -- assign ---------------------------------------------------------------------------------------


def test_assign_trims_and_unassign_records_none() -> None:
    card = make_card()
    card.assign(" bob ", meta=m(card))
    assert card.assignee == "bob"
    card.assign(None, meta=m(card))
    assert card.assignee is None
    assert [type(e) for e in collect(card)] == [Card.Assigned, Card.Assigned]


@pytest.mark.parametrize("assignee", ["   ", "a" * 201])
def test_blank_or_overlong_assignee_is_refused(assignee: str) -> None:
    card = make_card()
    with pytest.raises(ValidationFailed, match="assignee"):
        card.assign(assignee, meta=m(card))
    assert card.assignee is None


# -- labels ---------------------------------------------------------------------------------------


def test_labels_are_trimmed_sorted_and_unique() -> None:
    card = make_card()
    for label in ["ux", " api ", "api", "backend"]:
        card.label(label, meta=m(card))
    assert card.labels == ["api", "backend", "ux"]
    assert len(collect(card)) == 3


def test_unlabel_removes_a_label() -> None:
    card = make_card()
    card.label("api", meta=m(card))
    collect(card)
    card.unlabel("api", meta=m(card))
    assert card.labels == []
    assert isinstance(collect(card)[0], Card.Unlabelled)


@pytest.mark.parametrize("label", ["", "  ", "l" * (MAX_LABEL_LENGTH + 1)])
def test_blank_or_overlong_label_is_refused(label: str) -> None:
    card = make_card()
    with pytest.raises(ValidationFailed, match="label"):
        card.label(label, meta=m(card))


def test_more_than_the_maximum_number_of_labels_is_refused() -> None:
    card = make_card()
    for i in range(MAX_LABELS):
        card.label(f"l{i:02d}", meta=m(card))
    with pytest.raises(ValidationFailed, match=str(card.id)):
        card.label("one-too-many", meta=m(card))
    card.label("l00", meta=m(card))  # an existing label is still fine
    assert len(card.labels) == MAX_LABELS


def test_unlabel_trims_the_label_like_label_does() -> None:
    card = make_card()
    card.label(" api ", meta=m(card))
    card.unlabel(" api ", meta=m(card))
    assert card.labels == []
    assert collect(card)[-1].label == "api"


# -- block ----------------------------------------------------------------------------------------


def test_block_records_the_trimmed_reason() -> None:
    card = make_card()
    card.block("  needs design  ", meta=m(card))
    assert card.blocked_reason == "needs design"
    assert card.blocked is True


def test_block_reason_is_capped() -> None:
    card = make_card()
    card.block("r" * 5000, meta=m(card))
    assert card.blocked_reason == "r" * 1000


def test_blocking_without_a_reason_is_refused() -> None:
    card = make_card()
    with pytest.raises(ValidationFailed, match=str(card.id)):
        card.block("   ", meta=m(card))


def test_blocking_a_blocked_card_is_refused() -> None:
    card = make_card()
    card.block("first", meta=m(card))
    with pytest.raises(InvalidTransition, match=str(card.id)) as caught:
        card.block("second", meta=m(card))
    assert "first" in caught.value.message
    assert card.blocked_reason == "first"


def test_unblocking_a_card_that_is_not_blocked_is_refused() -> None:
    card = make_card()
    with pytest.raises(InvalidTransition, match=str(card.id)):
        card.unblock(meta=m(card))


# -- archive and restore --------------------------------------------------------------------------


def test_archived_card_refuses_edits() -> None:
    card = make_card()
    card.label("api", meta=m(card))
    card.block("x", meta=m(card))
    card.archive(meta=m(card))
    collect(card)
    attempts: dict[str, Callable[[], object]] = {
        "edit": lambda: card.edit(title="New", description=None, meta=m(card)),
        "move": lambda: card.move("Doing", "V2", meta=m(card)),
        "assign": lambda: card.assign("bob", meta=m(card)),
        "label": lambda: card.label("ux", meta=m(card)),
        "unlabel": lambda: card.unlabel("api", meta=m(card)),
        "block": lambda: card.block("y", meta=m(card)),
        "unblock": lambda: card.unblock(meta=m(card)),
    }
    for action, attempt in attempts.items():
        with pytest.raises(InvalidTransition, match=f"cannot {action} card {card.id}"):
            attempt()
    assert collect(card) == []
    assert (card.title, card.labels, card.lane) == ("Write PRD", ["api"], "Todo")


def test_archiving_an_archived_card_is_refused() -> None:
    card = make_card()
    card.archive(meta=m(card))
    with pytest.raises(InvalidTransition, match=str(card.id)):
        card.archive(meta=m(card))


def test_restore_puts_the_card_back_live_at_the_given_place() -> None:
    card = make_card()
    card.archive(meta=m(card))
    card.restore("Done", "V9", from_lane=None, meta=m(card))
    assert card.archived is False
    assert (card.lane, card.position) == ("Done", "V9")
    card.edit(title="Back", description=None, meta=m(card))
    assert card.title == "Back"


def test_restoring_a_live_card_is_refused() -> None:
    card = make_card()
    with pytest.raises(InvalidTransition, match=f"card {card.id} is not archived"):
        card.restore("Todo", "V2", from_lane=None, meta=m(card))
