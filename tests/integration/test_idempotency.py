"""Commands with a ``command_id`` are idempotent, against the real event store.

The idempotency record is written in the same transaction as the command's events (the
``command_log`` table), scoped to the workspace of the sender's credentials.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any
from uuid import uuid4

import pytest
from board_helpers import add_cards, add_member, bootstrap_board, command_log_count, max_position

from commands import models as m
from commands.handlers import Actor
from domain.errors import Forbidden, NotFound, ValidationFailed, WipLimitExceeded

if TYPE_CHECKING:
    from collections.abc import Callable

    from board_helpers import Board

    from commands.handlers import AgentWorks, CommandResult


def _same(result: CommandResult) -> tuple[object, ...]:
    """What a replay must reproduce: everything but the ``replayed`` flag."""
    return (
        result.kind,
        result.id,
        result.version,
        result.position,
        json.dumps(result.extra, sort_keys=True),
    )


def assert_retry_returns_the_first_result(
    send: Callable[[Any, Actor], CommandResult],
    command: m.Command,
    actor: Actor,
    meanwhile: Callable[[], object],
) -> None:
    """``command`` sent, ``meanwhile`` done, ``command`` sent again: the retry is a replay of
    the first result."""
    first = send(command, actor)
    meanwhile()
    again = send(command, actor)
    assert again.replayed is True
    assert _same(again) == _same(first)


class TestRetry:
    def test_retry_with_same_command_id_returns_first_result_and_appends_nothing(
        self, write_side: AgentWorks, board: Board, database_url: str
    ) -> None:
        (card_id,) = add_cards(write_side, board, 1)
        command = m.MoveCard(card_id=card_id, to_lane="Doing", command_id=uuid4())

        first = write_side.move_card(command, board.owner)
        position = max_position(database_url)
        again = write_side.move_card(command, board.owner)

        assert first.replayed is False
        assert first.position == position
        assert again.replayed is True
        assert _same(again) == _same(first)
        assert max_position(database_url) == position
        assert write_side.card_at(card_id, board.owner).version == first.version

    def test_retried_creation_returns_the_first_card_instead_of_a_second(
        self, write_side: AgentWorks, board: Board, database_url: str
    ) -> None:
        command = m.CreateCard(project_id=board.project_id, title="once", command_id=uuid4())

        first = write_side.create_card(command, board.owner)
        position = max_position(database_url)
        again = write_side.create_card(command, board.owner)

        assert (again.replayed, _same(again)) == (True, _same(first))
        assert max_position(database_url) == position
        assert command_log_count(database_url, command.command_id) == 1

    def test_same_command_id_sent_concurrently_from_8_threads_appends_once(
        self, write_side: AgentWorks, board: Board, database_url: str
    ) -> None:
        command = m.CreateCard(project_id=board.project_id, title="racing", command_id=uuid4())
        position_before = max_position(database_url)
        start = threading.Barrier(8)

        def send() -> CommandResult:
            start.wait(timeout=30)
            return write_side.create_card(command, board.owner)

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: send(), range(8), timeout=60))

        assert len({_same(result) for result in results}) == 1
        assert sorted(result.replayed for result in results) == [False] + [True] * 7
        # One card created and placed on the board: two events, one command record.
        assert max_position(database_url) == results[0].position
        assert results[0].position - position_before == 2
        assert command_log_count(database_url, command.command_id) == 1


class TestReuse:
    def test_same_command_id_with_different_content_is_refused(
        self, write_side: AgentWorks, board: Board, database_url: str
    ) -> None:
        (card_id,) = add_cards(write_side, board, 1)
        command_id = uuid4()
        write_side.move_card(
            m.MoveCard(card_id=card_id, to_lane="Doing", command_id=command_id), board.owner
        )
        position = max_position(database_url)

        with pytest.raises(ValidationFailed, match=str(command_id)):
            write_side.move_card(
                m.MoveCard(card_id=card_id, to_lane="Done", command_id=command_id), board.owner
            )
        with pytest.raises(ValidationFailed, match="MoveCard"):
            write_side.label_card(
                m.LabelCard(card_id=card_id, label="urgent", command_id=command_id), board.owner
            )
        assert max_position(database_url) == position
        assert write_side.card_at(card_id, board.owner).lane == "Doing"

    def test_command_id_of_one_workspace_is_unknown_to_another(
        self, write_side: AgentWorks, board: Board, database_url: str
    ) -> None:
        (card_id,) = add_cards(write_side, board, 1)
        other = bootstrap_board(write_side, owner="bob")
        command_id = uuid4()
        move = m.MoveCard(card_id=card_id, to_lane="Doing", command_id=command_id)
        write_side.move_card(move, board.owner)

        # Bob repeating Alice's command word for word gets no replay of her result: in his
        # workspace the card does not exist.
        with pytest.raises(NotFound):
            write_side.move_card(move, other.owner)

        # In his own workspace the id is simply new: his command runs and is recorded.
        position = max_position(database_url)
        own = write_side.create_card(
            m.CreateCard(project_id=other.project_id, title="bob's", command_id=command_id),
            other.owner,
        )
        assert own.replayed is False
        assert own.position > position
        assert write_side.card_at(own.id, other.owner).project_id == other.project_id
        again = write_side.create_card(
            m.CreateCard(project_id=other.project_id, title="bob's", command_id=command_id),
            other.owner,
        )
        assert (again.replayed, _same(again)) == (True, _same(own))

    def test_bootstrap_command_id_of_one_user_is_not_replayed_to_another(
        self, write_side: AgentWorks
    ) -> None:
        command = m.CreateWorkspace(name="Acme", command_id=uuid4())
        alices = write_side.create_workspace(command, Actor(user_id="alice", workspace_id="*"))

        mallorys = write_side.create_workspace(command, Actor(user_id="mallory", workspace_id="*"))

        assert mallorys.id != alices.id
        assert mallorys.replayed is False


class TestRefusal:
    def test_refused_command_stores_nothing_so_a_retry_after_freeing_the_lane_succeeds(
        self, write_side: AgentWorks, board: Board, database_url: str
    ) -> None:
        *doing, waiting = add_cards(write_side, board, 4)
        for card_id in doing:  # fills Doing, WIP limit 3
            write_side.move_card(m.MoveCard(card_id=card_id, to_lane="Doing"), board.owner)
        command = m.MoveCard(card_id=waiting, to_lane="Doing", command_id=uuid4())
        position = max_position(database_url)

        with pytest.raises(WipLimitExceeded):
            write_side.move_card(command, board.owner)
        assert max_position(database_url) == position
        assert command_log_count(database_url, command.command_id) == 0

        write_side.move_card(m.MoveCard(card_id=doing[0], to_lane="Todo"), board.owner)
        retried = write_side.move_card(command, board.owner)

        assert retried.replayed is False
        assert write_side.card_at(waiting, board.owner).lane == "Doing"
        assert command_log_count(database_url, command.command_id) == 1


def spend_limit_to_replay(board: Board, limit: str) -> m.SetSpendLimit:
    """A spend-limit command with a command id, so that sending it again is a replay."""
    return m.SetSpendLimit(workspace_id=board.workspace_id, monthly_limit=limit, command_id=uuid4())


class TestReplayRechecksTheCaller:
    """API.md, "Tokens": a replayed commandId returns the first result only to a caller who
    could run that command now."""

    def test_viewer_replaying_an_owners_set_spend_limit_is_forbidden(
        self, write_side: AgentWorks, board: Board
    ) -> None:
        viewer = add_member(write_side, board, str(uuid4()), "VIEWER")
        command = spend_limit_to_replay(board, "250.00")
        write_side.set_spend_limit(command, board.owner)

        with pytest.raises(Forbidden):
            write_side.set_spend_limit(command, viewer)

    def test_owner_demoted_since_gets_forbidden_on_replay(
        self, write_side: AgentWorks, board: Board
    ) -> None:
        admin = add_member(write_side, board, str(uuid4()), "ADMIN")
        command = spend_limit_to_replay(board, "10.00")
        first = write_side.set_spend_limit(command, admin)
        assert write_side.set_spend_limit(command, admin).replayed is True
        write_side.change_role(
            m.ChangeRole(workspace_id=board.workspace_id, user_id=admin.user_id, role="MEMBER"),
            board.owner,
        )

        with pytest.raises(Forbidden):
            write_side.set_spend_limit(command, admin)
        assert first.replayed is False

    def test_replay_after_the_state_moved_on_still_returns_the_first_result(
        self, write_side: AgentWorks, board: Board
    ) -> None:
        (card_id,) = add_cards(write_side, board, 1)
        command = m.MoveCard(
            card_id=card_id, to_lane="Doing", expected_version=1, command_id=uuid4()
        )
        assert_retry_returns_the_first_result(
            write_side.move_card,
            command,
            board.owner,
            lambda: write_side.move_card(m.MoveCard(card_id=card_id, to_lane="Done"), board.owner),
        )

    def test_member_of_another_workspace_replaying_an_id_learns_nothing(
        self, write_side: AgentWorks, board: Board
    ) -> None:
        command = spend_limit_to_replay(board, "5.00")
        write_side.set_spend_limit(command, board.owner)
        other = bootstrap_board(write_side, owner="mallory")

        with pytest.raises(NotFound):
            write_side.set_spend_limit(command, other.owner)


class TestReplayAfterTheBoardChanged:
    """A retry returns the first result even when what the command named has gone since: a
    lane renamed or removed is the state moving on, not a refusal of who is asking."""

    def test_retried_creation_in_a_lane_renamed_since_returns_the_first_card(
        self, write_side: AgentWorks, board: Board, database_url: str
    ) -> None:
        command = m.CreateCard(
            project_id=board.project_id, title="once", lane="Doing", command_id=uuid4()
        )
        first = write_side.create_card(command, board.owner)
        rename = m.RenameLane(project_id=board.project_id, lane="Doing", name="In progress")
        write_side.rename_lane(rename, board.owner)
        position = max_position(database_url)

        again = write_side.create_card(command, board.owner)

        assert again.replayed is True
        assert _same(again) == _same(first)
        assert max_position(database_url) == position

    def test_retried_move_into_a_lane_renamed_since_returns_the_first_result(
        self, write_side: AgentWorks, board: Board
    ) -> None:
        (card_id,) = add_cards(write_side, board, 1)
        command = m.MoveCard(card_id=card_id, to_lane="Done", command_id=uuid4())
        rename = m.RenameLane(project_id=board.project_id, lane="Done", name="Shipped")
        assert_retry_returns_the_first_result(
            write_side.move_card,
            command,
            board.owner,
            lambda: write_side.rename_lane(rename, board.owner),
        )

    def test_retried_removal_of_a_member_returns_the_first_result(
        self, write_side: AgentWorks, board: Board
    ) -> None:
        add_member(write_side, board, "bob", "MEMBER")
        command = m.RemoveMember(workspace_id=board.workspace_id, user_id="bob", command_id=uuid4())
        assert_retry_returns_the_first_result(
            write_side.remove_member, command, board.owner, lambda: None
        )

    def test_retried_lane_removal_and_rename_return_their_first_results(
        self, write_side: AgentWorks, board: Board
    ) -> None:
        rename = m.RenameLane(
            project_id=board.project_id, lane="Done", name="Shipped", command_id=uuid4()
        )
        remove = m.RemoveLane(project_id=board.project_id, lane="Shipped", command_id=uuid4())
        firsts = [write_side.rename_lane(rename, board.owner)]
        firsts.append(write_side.remove_lane(remove, board.owner))

        again = [write_side.rename_lane(rename, board.owner)]
        again.append(write_side.remove_lane(remove, board.owner))

        assert [result.replayed for result in again] == [True, True]
        assert [_same(result) for result in again] == [_same(result) for result in firsts]
