"""Commands decided on cached aggregates: another write side's changes are never ignored.

Each write side (an API replica, a worker) caches aggregates, and a command's first attempt
decides on them without asking the store whether they moved on; its save has the store check
that everything it read is current. Two write sides on one database play two replicas: what one
changes, the other's stale cache must not override.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import pytest
from board_helpers import Board, add_cards, add_member, fold, stored_rows

from commands import models as m
from domain.errors import NotFound, WipLimitExceeded
from infra.bootstrap import build_write_side

if TYPE_CHECKING:
    from collections.abc import Iterator

    from commands.handlers import AgentWorks


@pytest.fixture
def other(database_url: str) -> Iterator[AgentWorks]:
    """A second replica of the write side on the same database, with a cache of its own."""
    with contextlib.closing(build_write_side(database_url, pool_size=2)) as app:
        yield app


def test_a_member_removed_by_another_replica_is_refused_at_once(
    write_side: AgentWorks, board: Board, other: AgentWorks, database_url: str
) -> None:
    [card] = add_cards(write_side, board, 1)
    bob = add_member(write_side, board, "bob", "MEMBER")
    write_side.move_card(m.MoveCard(card_id=card, to_lane="Doing"), bob)  # bob's reads cached
    assert write_side.cached_reads

    other.remove_member(m.RemoveMember(workspace_id=board.workspace_id, user_id="bob"), board.owner)
    rows = len(stored_rows(database_url))
    with pytest.raises(NotFound):
        write_side.move_card(m.MoveCard(card_id=card, to_lane="Done"), bob)
    assert len(stored_rows(database_url)) == rows


def test_a_move_on_a_stale_cache_lands_after_the_other_replicas_moves(
    write_side: AgentWorks, board: Board, other: AgentWorks
) -> None:
    [card] = add_cards(write_side, board, 1)
    write_side.move_card(m.MoveCard(card_id=card, to_lane="Doing"), board.owner)
    moved = other.move_card(m.MoveCard(card_id=card, to_lane="Done"), board.owner)

    # The version the client read from the other replica is the one this replica checks.
    again = write_side.move_card(
        m.MoveCard(card_id=card, to_lane="Todo", expected_version=moved.version), board.owner
    )
    assert again.version == moved.version + 1
    lanes = [event.to_lane for event, _ in fold(write_side, card) if hasattr(event, "to_lane")]
    assert lanes == ["Doing", "Done", "Todo"]
    board_versions = [project.version for _, project in fold(write_side, board.project_id)]
    assert board_versions == list(range(1, len(board_versions) + 1))


def test_a_wip_limit_filled_by_another_replica_holds(
    write_side: AgentWorks, board: Board, other: AgentWorks
) -> None:
    cards = add_cards(write_side, board, 4)
    write_side.move_card(m.MoveCard(card_id=cards[0], to_lane="Doing"), board.owner)
    # "Doing" takes 3: the other replica fills it while this one's cache shows one card there.
    for card in cards[1:3]:
        other.move_card(m.MoveCard(card_id=card, to_lane="Doing"), board.owner)
    with pytest.raises(WipLimitExceeded):
        write_side.move_card(m.MoveCard(card_id=cards[3], to_lane="Doing"), board.owner)
    _, project = list(fold(write_side, board.project_id))[-1]
    assert sum(p.lane == "Doing" for p in project.placements.values()) == 3


def test_an_assignee_added_by_another_replica_is_accepted(
    write_side: AgentWorks, board: Board, other: AgentWorks
) -> None:
    [card] = add_cards(write_side, board, 1)
    write_side.assign_card(m.AssignCard(card_id=card, assignee="alice"), board.owner)
    add_member(other, board, "carol", "MEMBER")
    # This replica's cached workspace has no carol: a refusal on the cache is decided again.
    write_side.assign_card(m.AssignCard(card_id=card, assignee="carol"), board.owner)
    _, stored = list(fold(write_side, card))[-1]
    assert stored.assignee == "carol"
