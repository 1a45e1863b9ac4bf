"""Commands with a ``command_id`` are idempotent, against the real event store.

The idempotency record is written in the same transaction as the command's events (the
``command_log`` table), scoped to the workspace of the sender's credentials.
"""

from __future__ import annotations

import contextlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any
from uuid import UUID, uuid4

import psycopg
import pytest
from board_helpers import add_cards, add_member, bootstrap_board, command_log_count
from pg import log_head
from recorder_helpers import advisory_locks, transaction_waits, until

from commands import models as m
from commands.handlers import Actor
from domain.errors import Forbidden, NotFound, ValidationFailed, WipLimitExceeded
from infra.bootstrap import build_write_side

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

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
        position = log_head(database_url)
        again = write_side.move_card(command, board.owner)

        assert first.replayed is False
        assert first.position == position
        assert again.replayed is True
        assert _same(again) == _same(first)
        assert log_head(database_url) == position
        assert write_side.card_at(card_id, board.owner).version == first.version

    def test_retried_creation_returns_the_first_card_instead_of_a_second(
        self, write_side: AgentWorks, board: Board, database_url: str
    ) -> None:
        command = m.CreateCard(project_id=board.project_id, title="once", command_id=uuid4())

        first = write_side.create_card(command, board.owner)
        position = log_head(database_url)
        again = write_side.create_card(command, board.owner)

        assert (again.replayed, _same(again)) == (True, _same(first))
        assert log_head(database_url) == position
        assert command_log_count(database_url, command.command_id) == 1

    def test_same_command_id_sent_concurrently_from_8_threads_appends_once(
        self, write_side: AgentWorks, board: Board, database_url: str
    ) -> None:
        command = m.CreateCard(project_id=board.project_id, title="racing", command_id=uuid4())
        position_before = log_head(database_url)
        start = threading.Barrier(8)

        def send() -> CommandResult:
            start.wait(timeout=30)
            return write_side.create_card(command, board.owner)

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: send(), range(8), timeout=60))

        assert len({_same(result) for result in results}) == 1
        assert sorted(result.replayed for result in results) == [False] + [True] * 7
        # One card created and placed on the board: two events, one command record.
        assert log_head(database_url) == results[0].position
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
        position = log_head(database_url)

        with pytest.raises(ValidationFailed, match=str(command_id)):
            write_side.move_card(
                m.MoveCard(card_id=card_id, to_lane="Done", command_id=command_id), board.owner
            )
        with pytest.raises(ValidationFailed, match="MoveCard"):
            write_side.label_card(
                m.LabelCard(card_id=card_id, label="urgent", command_id=command_id), board.owner
            )
        assert log_head(database_url) == position
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
        position = log_head(database_url)
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
        position = log_head(database_url)

        with pytest.raises(WipLimitExceeded):
            write_side.move_card(command, board.owner)
        assert log_head(database_url) == position
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

    def test_an_id_reused_for_another_command_tells_a_caller_who_may_not_run_it_nothing(
        self, write_side: AgentWorks, board: Board
    ) -> None:
        """The id's first command (its type) is told only to a caller who may run the command
        sent: a viewer gets FORBIDDEN and a removed member NOT_FOUND, as a new command would.
        Both were told VALIDATION "already used for a different command (SetSpendLimit)"."""
        viewer = add_member(write_side, board, str(uuid4()), "VIEWER")
        gone = add_member(write_side, board, str(uuid4()), "ADMIN")
        write_side.remove_member(
            m.RemoveMember(workspace_id=board.workspace_id, user_id=gone.user_id), board.owner
        )
        command = spend_limit_to_replay(board, "250.00")
        write_side.set_spend_limit(command, board.owner)
        other_limit = command.model_copy(update={"monthly_limit": "1.00"})
        rename = m.RenameWorkspace(
            workspace_id=board.workspace_id, name="Theirs", command_id=command.command_id
        )
        for sent, send in ((other_limit, write_side.set_spend_limit),
                           (rename, write_side.rename_workspace)):  # fmt: skip
            with pytest.raises(Forbidden) as refused:
                send(sent, viewer)
            assert "SetSpendLimit" not in refused.value.message
            with pytest.raises(NotFound) as refused:
                send(sent, gone)
            assert "SetSpendLimit" not in refused.value.message
            # Its owner, who may run either, is told the id is taken.
            with pytest.raises(ValidationFailed, match="SetSpendLimit"):
                send(sent, board.owner)


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
        position = log_head(database_url)

        again = write_side.create_card(command, board.owner)

        assert again.replayed is True
        assert _same(again) == _same(first)
        assert log_head(database_url) == position

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


@contextlib.contextmanager
def record_held(database_url: str, scope: str, command_id: UUID) -> Iterator[None]:
    """A command record of ``command_id`` inserted and not committed until the block ends: a
    write side's own record of that id waits on it (its transaction paused inside its commit,
    its events written), and is then written when this one is rolled back."""
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO command_log (scope, command_id, command_type, fingerprint, actor, result)"
            " VALUES (%s, %s, 'AssignCard', 'held', 'test', '{}')",
            (scope, command_id),
        )
        try:
            yield
        finally:
            conn.rollback()


class TestTwoReplicas:
    """A retried commandId returns the first result whichever API replica (each a write side
    of its own on the one database) each sending reaches."""

    def test_retry_refused_by_a_third_change_while_the_first_run_commits_gets_its_result(
        self, write_side: AgentWorks, board: Board, database_url: str
    ) -> None:
        """The first sending assigns a member on replica one and is inside its commit; a third
        command removes that member; the retry reaches replica two. Deciding there now, it would
        be refused (no longer a member: VALIDATION) while the first run commits the assignment a
        moment later. It waits for the first run and answers its result."""
        (card,) = add_cards(write_side, board, 1)
        member = str(uuid4())
        add_member(write_side, board, member, "MEMBER")
        command = m.AssignCard(card_id=card, assignee=member, command_id=uuid4())
        assert command.command_id is not None
        removal = m.RemoveMember(workspace_id=board.workspace_id, user_id=member)
        with contextlib.closing(build_write_side(database_url, pool_size=2)) as replica_one:
            # Replica one caches the card; replica two then changes it. The first run's cached
            # decision loses that race and it decides again on the store's state: reads the
            # save does not check (a third command may change them until the commit).
            replica_one.label_card(m.LabelCard(card_id=card, label="seen"), board.owner)
            write_side.update_card(m.UpdateCard(card_id=card, title="renamed"), board.owner)
            with ThreadPoolExecutor(max_workers=2) as pool:
                with record_held(database_url, board.owner.workspace_id, command.command_id):
                    first = pool.submit(replica_one.assign_card, command, board.owner)
                    until(
                        lambda: transaction_waits(database_url) == 1,
                        "the first run's commit waits on the held record",
                    )
                    write_side.remove_member(removal, board.owner)
                    again = pool.submit(write_side.assign_card, command, board.owner)
                    until(
                        lambda: again.done() or advisory_locks(database_url, granted=False) == 1,
                        "the retry answered or waits for the first run",
                    )
                answers = [first.result(timeout=60), again.result(timeout=60)]

        assert [answer.replayed for answer in answers] == [False, True]
        assert _same(answers[1]) == _same(answers[0])
        assert command_log_count(database_url, command.command_id) == 1
        assert write_side.card_at(card, board.owner).assignee == member
